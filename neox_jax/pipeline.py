"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule written as a vmapped stage dimension.

The block params stay stacked [L, ...] as in every other layout (same checkpoints, same optimizer state); the
logical rules split their `layers` dim over `stage`, so stage s holds layers s*L/S .. (s+1)*L/S - 1 and the
[S, L/S, ...] view taken here is a free reshape. The residual stream of the stages is one [S, mb, T, H]
buffer, slot s on stage s. Each tick, every stage applies its layers to its slot (one `jax.vmap` over the
stage dim with `spmd_axis_name="stage"`, which GSPMD runs as S concurrent stages), then the buffer rotates one
slot (`jnp.roll` on the stage-sharded dim: a collective-permute) and stage 0 embeds the next micro-batch.
M micro-batches take M + S - 1 ticks; the S - 1 extra ones are the bubble. Autodiff of that scan is the
GPipe backward: all forwards, then all backwards in reverse tick order, the stage-to-stage cotangents
rotating the other way.

The final LayerNorm, head and loss of the micro-batch leaving the last stage run in the same tick, its
sequence cut into S slices, one per stage, so every device shares the head's work and the backward pass
keeps only each stage's [mb, T/S, H] slice per tick: no [M, mb, T, H] buffer of pipeline outputs (or of their
gradients) ever exists. The embedding and head weights enter the loop as one copy per stage, so each stage
sums its own gradient for them over the ticks and the stages are summed once, after the loop. With any
`model.remat_policy` each stage's tick is checkpointed too, keeping one [mb, T, H] input per stage per tick;
the policy still applies layer by layer inside.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neox_jax import model as model_lib
from neox_jax import sharding
from neox_jax.sharding import BATCH_AXES, STAGE_AXIS


def stage_view(layer_params, stages: int):
    """[L, ...] -> [S, L/S, ...]: row s holds the contiguous layers of stage s."""
    return jax.tree.map(lambda p: p.reshape(stages, p.shape[0] // stages, *p.shape[1:]), layer_params)


def _per_stage(tree, mesh: Mesh):
    """One copy of each (replicated-over-stage) weight per stage: [S, ...], slot s on stage s."""
    stages = sharding.num_stages(mesh)

    def copy(x):
        spec = P(STAGE_AXIS, *[P.UNCONSTRAINED] * x.ndim)  # the other dims stay where the rules put them
        return jax.lax.with_sharding_constraint(jnp.broadcast_to(x, (stages, *x.shape)), NamedSharding(mesh, spec))

    return jax.tree.map(copy, tree)


def _grads_placed(tree, shardings):
    """Identity whose gradient is moved to `shardings`: applied inside the tick loop, each tick's gradient is
    reduced (scattered) to its placement as it is produced, so the loop accumulates only this device's part."""
    @jax.custom_vjp
    def place(t):
        return t

    place.defvjp(lambda t: (t, None), lambda _, ct: (jax.lax.with_sharding_constraint(ct, shardings),))
    return place(tree)


def _with_stage_dim(spec: P, mesh: Mesh, stacked: bool) -> NamedSharding:
    """A param's spec seen on its per-stage form: [S, L/S, ...] for stacked layers, [S, ...] for a copy."""
    dims = list(spec)
    return NamedSharding(mesh, P(STAGE_AXIS, None, *dims[1:]) if stacked else P(STAGE_AXIS, *dims))


def loss_sum(net, params, micro_tokens, mesh: Mesh, loss_fn: Callable, grad_specs=None) -> jax.Array:
    """Sum over micro-batches of `loss_fn(logits, targets)` (a per-token mean) through the pipeline.

    micro_tokens: int [M, mb, T + 1] with M a multiple of the stage count and T of the stage count too
    (config.check_pipeline). `grad_specs` (PartitionSpecs like params): where each tick's gradients go as they
    are produced (the ZeRO placement of the accumulated gradients); None leaves it to the compiler."""
    m, stages = net.config, sharding.num_stages(mesh)
    ids, targets = micro_tokens[..., :-1], micro_tokens[..., 1:]
    count, mb, t = ids.shape
    layers = stage_view(params["layers"], stages)
    outer = _per_stage({k: v for k, v in params.items() if k != "layers"}, mesh)
    if grad_specs is not None:
        is_spec = lambda x: isinstance(x, P)  # noqa: E731
        layers = _grads_placed(layers, jax.tree.map(lambda s: _with_stage_dim(s, mesh, True), grad_specs["layers"],
                                                    is_leaf=is_spec))
        outer = _grads_placed(outer, {k: jax.tree.map(lambda s: _with_stage_dim(s, mesh, False), v, is_leaf=is_spec)
                                      for k, v in grad_specs.items() if k != "layers"})
    body = model_lib.LayerStack(m, m.num_layers // stages)

    def stage(p, x):
        return body.apply({"params": {"layers": p}}, x)

    if m.remat_policy != "none":
        stage = jax.checkpoint(stage, prevent_cse=False)  # the tick scan already keeps recomputation apart
    all_stages = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)
    embed = jax.vmap(lambda p, i: net.apply({"params": p}, i, method="embed"), in_axes=(0, None),
                     spmd_axis_name=STAGE_AXIS)

    @jax.checkpoint  # keep only each stage's slice of the hidden states for the backward, not its logits
    def head_loss(p, h, y):
        return loss_fn(net.apply({"params": p}, h, method="head"), y)

    all_heads = jax.vmap(head_loss, spmd_axis_name=STAGE_AXIS)
    buffer = NamedSharding(mesh, P(STAGE_AXIS, BATCH_AXES))
    is_first = (jnp.arange(stages) == 0).reshape(stages, 1, 1, 1)

    def slices(a):
        """[mb, T, ...] -> [S, mb, T/S, ...]: slice s of the sequence on stage s."""
        a = a.reshape(mb, stages, t // stages, *a.shape[2:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(STAGE_AXIS, BATCH_AXES)))

    def tick(carry, xs):
        previous, total = carry
        entering, leaving_targets, valid = xs
        # stage s takes what stage s-1 produced last tick; stage 0 takes the next micro-batch
        x = jnp.where(is_first, embed(outer, entering), jnp.roll(previous, 1, axis=0))
        out = all_stages(layers, jax.lax.with_sharding_constraint(x, buffer))
        # the last stage's output is micro-batch t - (S - 1): its loss, spread over the stages (a mean of equal
        # slices' means), counts from tick S - 1 on
        loss = all_heads(outer, slices(out[-1]), slices(leaving_targets)).mean()
        return (out, total + jnp.where(valid, loss, 0.0)), None

    pad = jnp.zeros((stages - 1, mb, t), ids.dtype)
    entering = jnp.concatenate([ids, pad])  # zeros fed while the last micro-batches drain
    leaving = jnp.concatenate([pad, targets])  # dummies while the pipeline fills
    valid = jnp.arange(count + stages - 1) >= stages - 1
    start = jax.lax.with_sharding_constraint(jnp.zeros((stages, mb, t, m.hidden_size), jnp.dtype(m.dtype)), buffer)
    (_, total), _ = jax.lax.scan(tick, (start, jnp.zeros((), jnp.float32)), (entering, leaving, valid))
    return total
