"""TrainState and the sharded train / eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function of pytrees; `make_train_step(run)` compiles it
once with explicit in/out shardings (from the logical rules and the ZeRO stage) and donates the state. Everything
derived from the config (model, optimizer, schedule, placement) comes built in `run`, a `neox_jax.setup.RunSetup`.
The step accumulates fp32 gradients over `train.micro_batches` with `lax.scan`, scales the loss when fp16
dynamic loss scaling is on, and skips the update (params and optimizer state unchanged) whenever the loss
or the gradients are not finite.

With a `stage` mesh axis the micro-batches instead flow through a GPipe pipeline (neox_jax.pipeline) inside
one gradient computation: `train.micro_batches` is then the number of micro-batches in flight, a multiple of
the stage count, and the loss and gradients are the same sums as the accumulation computes.

Batch format: {"tokens": int32 [global_batch, seq_len + 1]}, split over ("data", "fsdp") on its first axis;
inputs are tokens[:, :-1], targets tokens[:, 1:], loss the mean next-token cross-entropy in fp32.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from neox_jax import loss as loss_lib
from neox_jax import model as model_lib
from neox_jax import optim
from neox_jax import pipeline
from neox_jax import sharding, targets
from neox_jax.setup import RunSetup


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # i32: train steps taken, skipped ones included
    params: Any  # what the model computes with: fp32 (precision.mode=fp32_params) or model.dtype (master_weights)
    master: Any  # master_weights: the fp32 weights AdamW updates, placed like the Adam moments; fp32_params: None
    opt_state: Any
    loss_scale: optim.LossScale
    skipped_steps: jax.Array  # i32: steps whose update was skipped (non-finite loss or gradients)
    nonfinite_in_a_row: jax.Array  # i32: consecutive skipped steps, 0 after a good one


def weights(state: TrainState):
    """The fp32 weights the optimizer updates (and checkpoints export): the master copy if there is one."""
    return state.params if state.master is None else state.master


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype), tree)


def _init_state(m, optimizer, precision, rng, initial=None) -> TrainState:
    """The step-0 state from a random init, or from `initial` weights (any float dtype: converted exactly)."""
    w = model_lib.init_params(m, rng) if initial is None else _cast(initial, jnp.dtype(m.param_dtype))
    params, master = w, None
    if precision.mode == "master_weights":
        params, master = _cast(w, jnp.dtype(m.dtype)), w
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, master=master, opt_state=optimizer.init(w),
                      loss_scale=optim.init_loss_scale(precision), skipped_steps=zero, nonfinite_in_a_row=zero)


def state_specs(run: RunSetup) -> TrainState:
    """A TrainState of PartitionSpecs: what the rules and the ZeRO stage say (`run.placement`)."""
    place, scalar = run.placement, P()
    master = place.master if run.config.precision.mode == "master_weights" else None
    return TrainState(step=scalar, params=place.params, master=master, opt_state=place.opt_state,
                      loss_scale=optim.LossScale(scalar, scalar, scalar), skipped_steps=scalar,
                      nonfinite_in_a_row=scalar)


def state_shardings(run: RunSetup) -> TrainState:
    return sharding.to_shardings(state_specs(run), run.mesh)


def state_shapes(run: RunSetup) -> TrainState:
    """ShapeDtypeStructs of the train state with their shardings (for AOT compilation and restoring; nothing
    allocated). Derived from the params' shapes, so the model is not traced again."""
    weights = jax.tree.map(lambda b: b.value, run.param_shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    init = functools.partial(_init_state, run.model_config, run.optimizer, run.config.precision)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0), weights)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(run))


def init_train_state(run: RunSetup, rng, params=None) -> TrainState:
    """The initial state created directly in its sharded layout (no host-side full copy). `params`: start from
    these weights (host or device arrays of the model's shapes, e.g. a converted HF checkpoint) instead of a random
    init (e.g. pretrained weights, `neox_jax.weights`; each device receives only its shard of them, and the
    optimizer state starts fresh); with master weights the fp32 master holds them exactly and the params are
    their 16-bit cast."""
    if params is None:
        return _jitted_init(run, given=False)(rng)
    shardings = state_shardings(run)
    target = shardings.params if shardings.master is None else shardings.master
    params = jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), params, target)
    return _jitted_init(run, given=True)(rng, params)


_INITS: dict = {}  # (run config, mesh, given params) -> the jitted init


def _jitted_init(run: RunSetup, given: bool):
    """One jitted init per config and mesh: a run set up again from the same config (a resumed session, a sweep
    in one process, the tests) reuses its compile (a random init takes seconds to compile even for a tiny model)."""
    key = (run.config.to_json(), run.mesh, given)
    if key not in _INITS:
        init = functools.partial(_init_state, run.model_config, run.optimizer, run.config.precision)
        _INITS[key] = jax.jit(init, out_shardings=state_shardings(run), donate_argnums=1 if given else ())
    return _INITS[key]


def _micro_batches(tokens, count: int, mesh):
    """[B, S+1] -> [count, B/count, S+1] taking every count-th row, so each device keeps its own rows."""
    b = tokens.shape[0]
    micro = tokens.reshape(b // count, count, tokens.shape[1]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))


def _accumulated_grad_sum(params, micro, scale, net, grad_shardings, loss_chunks=1, batch_shards=1):
    """Sums over micro-batches, one after another, of (scaled-loss gradients, loss)."""
    def scaled_loss(params, tokens):
        loss = loss_lib.next_token_loss(net, params, tokens, loss_chunks, batch_shards)
        return loss * scale, loss

    def grads_and_loss(tokens):
        (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params, tokens)
        return _placed_fp32(grads, grad_shardings), loss

    if micro.shape[0] == 1:  # nothing to accumulate: no zeroed fp32 buffer to add into
        return grads_and_loss(micro[0])

    def accumulate(carry, tokens):
        grad_sum, loss_sum = carry
        grads, loss = grads_and_loss(tokens)
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        return (jax.lax.with_sharding_constraint(grad_sum, grad_shardings), loss_sum + loss), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    zeros = jax.lax.with_sharding_constraint(zeros, grad_shardings)
    (grad_sum, loss_sum), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)), micro)
    return grad_sum, loss_sum


def _pipelined_grad_sum(params, micro, scale, run: RunSetup):
    """The same sums with the micro-batches in flight together through the pipeline stages."""
    def scaled_loss_sum(params):
        loss_sum = pipeline.loss_sum(run.net, params, micro, run.mesh, loss_lib.cross_entropy,
                                     grad_specs=run.placement.grads)
        return loss_sum * scale, loss_sum

    (_, loss_sum), grad_sum = jax.value_and_grad(scaled_loss_sum, has_aux=True)(params)
    return _placed_fp32(grad_sum, run.shardings.grads), loss_sum


def _placed_fp32(grads, grad_shardings):
    """Gradients moved to their placement (reduced across the batch) in their own dtype, then made fp32: with
    16-bit params the reduction moves half the bytes, as DeepSpeed's fp16 all-reduce does."""
    grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    return _cast(grads, jnp.float32)


def _gathered_cast(w, p, where: NamedSharding):
    """The master's shard `w` cast to the params' 16-bit dtype and moved to their placement `where`, the move made
    on pairs of 16-bit values bit-cast to 32-bit words: XLA:CPU widens 16-bit collectives to fp32, which for the
    gather of updated params held fp32 copies of the largest arrays (26.6 GB per device, 20B at data 48 x
    tensor 2). Bit-exact; only on CPU (on TPU the reshape costs relayout copies of whole arrays) and for a last dim
    of even size whose halves the mesh still divides."""
    half = w.astype(p.dtype)
    spec = tuple(where.spec) + (None,) * (w.ndim - len(where.spec))
    last = spec[-1] if w.ndim else None
    if (targets.target_platform() != "cpu" or not w.ndim
            or w.shape[-1] % (2 * sharding.axis_size(where.mesh, last))):
        return jax.lax.with_sharding_constraint(half, where)
    words = jax.lax.bitcast_convert_type(half.reshape(*w.shape[:-1], w.shape[-1] // 2, 2), jnp.uint32)
    words = jax.lax.with_sharding_constraint(words, NamedSharding(where.mesh, P(*spec)))
    return jax.lax.bitcast_convert_type(words, p.dtype).reshape(w.shape)


def train_step(state: TrainState, batch: dict, *, run: RunSetup):
    """One optimizer step over the whole global batch. Pure; see make_train_step for the compiled form.

    gradients (params' dtype) -> reduced to their placement -> fp32 -> unscaled (loss scale) -> non-finite check
    -> global-norm clip -> AdamW on the fp32 weights (the master with master weights) -> params (cast to the
    compute dtype with master weights). The update runs where the optimizer state lives (`run.shardings.master`:
    the ZeRO-1 split), so no whole-model fp32 temporaries exist; the new params are then gathered to their
    placement."""
    config, mesh = run.config, run.mesh
    precision = config.precision
    count = config.train.micro_batches
    with sharding.activation_rules(mesh, config.zero_stage):
        micro = _micro_batches(batch["tokens"], count, mesh)
        scale = state.loss_scale.scale
        if run.stages > 1:
            grad_sum, loss_sum = _pipelined_grad_sum(state.params, micro, scale, run)
        else:
            grad_sum, loss_sum = _accumulated_grad_sum(state.params, micro, scale, run.net, run.shardings.grads,
                                                       config.train.loss_chunks, sharding.batch_split(mesh))

    grads = jax.tree.map(lambda g: g / (count * scale), grad_sum)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
    # A skipped step leaves the weights as they were; the 16-bit params are always the cast of the master, so
    # recasting the kept master reproduces them exactly.
    w = jax.lax.with_sharding_constraint(weights(state), run.shardings.master)
    updates, new_opt_state = run.optimizer.update(grads, state.opt_state, w)
    # Materialise the new moments and the update before the selects below: otherwise XLA recomputes them inside
    # each select, two fusions then read the donated old state, and copy insertion keeps a full copy of it alive
    # for the whole step (1.9 GB per device for the 20B paper layout).
    updates, new_opt_state = jax.lax.optimization_barrier((updates, new_opt_state))
    new_w = keep(optax.apply_updates(w, updates), w)
    if state.master is None:
        new_params, new_master = new_w, None
    else:
        new_params, new_master = jax.tree.map(_gathered_cast, new_w, state.params, run.shardings.params), new_w
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        master=new_master,
        opt_state=keep(new_opt_state, state.opt_state),
        loss_scale=optim.update_loss_scale(state.loss_scale, finite, precision),
        skipped_steps=state.skipped_steps + skipped,
        nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        # the optimizer's own count: applied updates so far
        "lr": run.schedule(state.step - state.skipped_steps),
        "loss_scale": scale,
        "skipped": skipped,
        "skipped_steps": new_state.skipped_steps,
        "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
    }
    return new_state, metrics


def make_train_step(run: RunSetup):
    """jit(train_step) with the state's shardings in and out, the batch split over data x fsdp, the state donated."""
    state_sh = state_shardings(run)
    replicated = NamedSharding(run.mesh, P())
    return jax.jit(functools.partial(train_step, run=run), in_shardings=(state_sh, {"tokens": run.batch_sharding}),
                   out_shardings=(state_sh, replicated), donate_argnums=(0,))


def eval_step(params, batch, *, run: RunSetup):
    config, mesh = run.config, run.mesh
    with sharding.activation_rules(mesh, config.zero_stage):
        tokens = batch["tokens"]
        if run.stages > 1:  # the eval batch is cut into train.micro_batches for the pipeline
            count = config.train.micro_batches
            micro = _micro_batches(tokens, count, mesh)
            loss = pipeline.loss_sum(run.net, params, micro, mesh, loss_lib.cross_entropy) / count
        else:
            loss = loss_lib.next_token_loss(run.net, params, tokens, config.train.loss_chunks,
                                            sharding.batch_split(mesh))
    return {"loss": loss, "tokens": jnp.asarray(tokens[:, 1:].size, jnp.int32)}


def make_eval_step(run: RunSetup):
    """jit(eval_step): (params, batch) -> {"loss": mean cross-entropy, "tokens": count}."""
    return jax.jit(functools.partial(eval_step, run=run),
                   in_shardings=(run.shardings.params, {"tokens": run.batch_sharding}),
                   out_shardings=NamedSharding(run.mesh, P()))


_STEPS: dict = {}  # (run config, mesh) -> the compiled train step, the latest _KEEP_STEPS of them
_KEEP_STEPS = 4  # a sweep or the layout report compiles dozens of configs in one process: keep few executables


def compile_train_step(run: RunSetup, compiler_options: dict | None = None):
    """AOT-compile the train step from shapes only (no weights allocated); `.memory_analysis()` on the result.
    `compiler_options`: XLA debug options for this compile only (e.g. `{"xla_dump_to": DIR}`). Without them the
    executable is kept per config and mesh, as the init is (`_jitted_init`): a run set up again in one process
    reuses it."""
    key = (run.config.to_json(), run.mesh)
    if compiler_options or key not in _STEPS:
        t = run.config.train
        tokens = jax.ShapeDtypeStruct((t.batch_size, t.seq_len + 1), jnp.int32, sharding=run.batch_sharding)
        compiled = make_train_step(run).lower(state_shapes(run), {"tokens": tokens}).compile(compiler_options)
        if compiler_options:
            return compiled
        _STEPS[key] = compiled
        while len(_STEPS) > _KEEP_STEPS:
            del _STEPS[next(iter(_STEPS))]
    return _STEPS[key]
