"""The sharded train step: every layout reproduces the 1-device run, arrays sit where the rules say, the step
compiles once, and non-finite steps are skipped with DeepSpeed's loss-scale bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import loss, sharding, train
from neox_jax.pytree import path_name

from layout_checks import STEPS, batches, build, comparable, rel_err, run_steps  # noqa: F401
from tiny_configs import tiny_config

LAYOUTS = {  # name: (data, fsdp, tensor, zero_stage[, loss_chunks[, micro_batches]])
    "data8": (8, 1, 1, 0),
    "data8_one_micro_batch": (8, 1, 1, 0, 1, 1),
    "data2_tensor4_zero1_loss_chunks4": (2, 1, 4, 1, 4),
    "fsdp8_zero3": (1, 8, 1, 3),
    "data2_tensor4": (2, 1, 4, 0),
    "data4_tensor2_zero1": (4, 1, 2, 1),
    "fsdp2_tensor4_zero3": (1, 2, 4, 3),
}


@pytest.fixture(scope="module")
def reference():
    """Initial state, losses and final params of the same steps on a 1x1x1 mesh over one device."""
    run = build(tiny_config(), jax.devices()[:1])
    state = train.init_train_state(run, jax.random.PRNGKey(0))
    initial = jax.device_get(state)
    _, state, losses = run_steps(run, state)
    return initial, comparable(jax.device_get(state.params)), losses


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(layout, reference):
    data, fsdp, tensor, zero, chunks, micro = (*LAYOUTS[layout], 1, 2)[:6]
    config = tiny_config(data, fsdp, tensor, zero)
    config.train.loss_chunks = chunks  # the chunked loss must give the same steps
    config.train.micro_batches = micro  # and so must one micro-batch instead of the reference's two
    run = build(config)
    initial, ref_params, ref_losses = reference
    if zero == 3:  # created sharded: same values as on one device
        state = train.init_train_state(run, jax.random.PRNGKey(0))
        for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(initial)):
            np.testing.assert_array_equal(a, b)
    else:
        state = jax.device_put(initial, train.state_shardings(run))
    if layout in ("data2_tensor4", "data2_tensor4_zero1_loss_chunks4"):
        evaluate = train.make_eval_step(run)
        metrics = evaluate(state.params, sharding.global_batch({"tokens": batches(1)[0]}, run.mesh))
        assert float(metrics["loss"]) == pytest.approx(ref_losses[0], rel=1e-5)
        assert int(metrics["tokens"]) == 16 * 16
    step, state, losses = run_steps(run, state)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    params = comparable(jax.device_get(state.params))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(ref_params)):
        assert rel_err(got, want) <= 1e-5, path_name(path)

    # No recompilation: one compiled executable after STEPS calls.
    assert step._cache_size() == 1

    # Every array's actual sharding is what the rules + ZeRO stage say.
    expected = train.state_shardings(run)
    for (path, arr), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (path_name(path), arr.sharding, want)

    # And what that means, written out independently of the rules table: per-device shard shapes.
    qkv = state.params["layers"]["attention"]["query_key_value"]["kernel"]  # [layers, embed, heads, 3, head_dim]
    mu = state.opt_state[1][0].mu["layers"]["attention"]["query_key_value"]["kernel"]
    embed_split = fsdp if zero == 3 else 1
    assert qkv.addressable_shards[0].data.shape == (2, 64 // embed_split, 4 // tensor, 3, 16)
    moment_split = tensor * {0: 1, 1: data * fsdp, 3: fsdp}[zero]  # ZeRO-1: moments split, params not
    assert mu.addressable_shards[0].data.size * moment_split == mu.size


def test_one_step_on_one_device_is_autodiff_then_the_optimizer():
    """The compiled step (two micro-batches accumulated) against its definition written out: the mean
    cross-entropy of the whole batch, its gradient by plain autodiff, the run's optimizer applied once."""
    import optax

    run = build(tiny_config(), jax.devices()[:1])
    state = train.init_train_state(run, jax.random.PRNGKey(0))
    params, opt_state = jax.device_get((state.params, state.opt_state))
    tokens = batches(1)[0]

    def plain_loss(p):
        return loss.cross_entropy(run.net.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])

    def reference_step(p, o):
        value, grads = jax.value_and_grad(plain_loss)(p)
        return value, optax.tree.norm(grads), optax.apply_updates(p, run.optimizer.update(grads, o, p)[0])

    want_loss, want_norm, want = jax.device_get(jax.jit(reference_step)(params, opt_state))
    want = comparable(want)

    state, metrics = train.make_train_step(run)(state, {"tokens": tokens})
    assert float(metrics["loss"]) == pytest.approx(float(want_loss), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(want_norm), rel=1e-4)
    assert int(state.step) == 1 and int(state.skipped_steps) == 0
    got = comparable(jax.device_get(state.params))
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert rel_err(g, w) <= 1e-5, path_name(path)


@pytest.mark.slow
def test_state_shapes_are_those_of_the_initial_state():
    """state_shapes derives the state from the params' shapes (the model is traced once, in setup.build): the
    state init_train_state creates has exactly those shapes, dtypes and shardings (master weights, ZeRO-1)."""
    run = build(tiny_config(2, 1, 2, 1, model=dict(dtype="bfloat16"), precision=dict(mode="master_weights")),
                jax.devices()[:4])
    shapes, state = train.state_shapes(run), train.init_train_state(run, jax.random.PRNGKey(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    for s, x in zip(jax.tree.leaves(shapes), jax.tree.leaves(state)):
        assert (s.shape, s.dtype) == (x.shape, x.dtype) and s.sharding.is_equivalent_to(x.sharding, x.ndim)


@pytest.mark.slow  # the fast tier's loss is the one-device step's above
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunked_head_loss_matches_full_logits(dtype):
    """The sliced head + loss (gradient formed in the forward pass) against autodiff of the whole-batch
    logits and optax's cross-entropy, for the loss, a scaled loss's gradients, and without differentiation."""
    import optax

    from neox_jax import model

    kx, kw, ky = jax.random.split(jax.random.PRNGKey(0), 3)
    hidden = jax.random.normal(kx, (4, 32, 16)).astype(dtype)
    embed_out = jax.random.normal(kw, (16, 96)) * 0.5
    targets = jax.random.randint(ky, (4, 32), 0, 96)

    def full(h, w):
        return optax.softmax_cross_entropy_with_integer_labels(model.head_logits(h, w), targets).mean()

    want, want_grads = jax.value_and_grad(lambda h, w: 8.0 * full(h, w), argnums=(0, 1))(hidden, embed_out)
    tol = 1e-6 if dtype == "float32" else 2e-2
    for chunks in (2, 8):
        assert float(jax.jit(loss.chunked_head_loss, static_argnums=(3, 4))(hidden, embed_out, targets, chunks, 1)) \
            == pytest.approx(float(want) / 8, rel=tol)
        got, grads = jax.jit(jax.value_and_grad(lambda h, w: 8.0 * loss.chunked_head_loss(h, w, targets, chunks, 2),
                                                argnums=(0, 1)))(hidden, embed_out)
        assert float(got) == pytest.approx(float(want), rel=tol)
        for g, w in zip(grads, want_grads):
            assert g.dtype == w.dtype and g.shape == w.shape
            assert rel_err(np.asarray(g, np.float32), np.asarray(w, np.float32)) <= 10 * tol


@pytest.mark.slow
def test_chunked_loss_adds_no_collectives_under_data_parallelism():
    """Per-slice sums stay per batch shard: the compiled data-parallel step communicates exactly as much as
    with the whole-batch loss (no all-reduce of the head gradient or the loss inside the slice loop)."""
    import re

    def collectives(chunks):
        config = tiny_config(data=8)
        config.train.update(dict(loss_chunks=chunks, micro_batches=1))
        text = train.compile_train_step(build(config)).as_text()
        return {op: len(re.findall(rf"\b{op}(-start)?\(", text)) for op in ("all-reduce", "reduce-scatter", "all-gather")}

    whole = collectives(1)
    assert whole["all-reduce"] > 0 and collectives(4) == whole


@pytest.mark.slow
def test_overflow_skips_step_and_drives_loss_scale():
    """Dynamic loss scaling (hysteresis 2, window 2): an injected inf parameter makes every gradient non-finite."""
    config = tiny_config(data=2)
    config.model.dtype = "bfloat16"  # fp32 master params, half-precision compute
    config.precision.update(dict(loss_scale="dynamic", initial_scale_power=12, loss_scale_window=2, hysteresis=2))
    run = build(config, jax.devices()[:2])
    mesh = run.mesh
    state = train.init_train_state(run, jax.random.PRNGKey(0))
    step = train.make_train_step(run)
    tokens = batches(6)

    good_bias = state.params["final_layer_norm"]["bias"]
    bad_bias = jax.device_put(good_bias.at[0].set(jnp.inf), good_bias.sharding)
    state = state.replace(params={**state.params, "final_layer_norm": {**state.params["final_layer_norm"], "bias": bad_bias}})
    before = jax.device_get((state.params, state.opt_state))
    seen = []
    for t in tokens[:3]:
        state, m = step(state, sharding.global_batch({"tokens": t}, mesh))
        seen.append((float(m["loss_scale"]), int(m["skipped"]), int(m["nonfinite_in_a_row"])))
    # overflow 1: hysteresis absorbs it; overflow 2: scale halves; overflow 3: halves again
    assert seen == [(4096.0, 1, 1), (4096.0, 1, 2), (2048.0, 1, 3)]
    assert float(state.loss_scale.scale) == 1024.0 and int(state.skipped_steps) == 3
    after = jax.device_get((state.params, state.opt_state))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)

    # Repair the parameter: good steps reset the streak and, after `window` of them, double the scale.
    state = state.replace(params={**state.params, "final_layer_norm": {**state.params["final_layer_norm"],
                                                                        "bias": jax.device_put(good_bias, good_bias.sharding)}})
    scales, lrs = [], []
    for t in tokens[3:]:
        state, m = step(state, sharding.global_batch({"tokens": t}, mesh))
        assert int(m["skipped"]) == 0 and int(m["nonfinite_in_a_row"]) == 0 and np.isfinite(float(m["loss"]))
        scales.append(float(m["loss_scale"]))
        lrs.append(float(m["lr"]))
    assert scales == [1024.0, 1024.0, 2048.0] and float(state.loss_scale.scale) == 2048.0
    assert int(state.skipped_steps) == 3 and int(state.step) == 6
    # Skipped steps do not advance the schedule: the third good step is optimizer step 2 (1 into the cosine).
    peak, floor = 1e-3, 1e-4
    assert lrs[2] == pytest.approx(floor + (peak - floor) / 2 * (np.cos(np.pi * 1 / 9) + 1), rel=1e-5)
    assert step._cache_size() == 1


@pytest.mark.slow
def test_two_slices_match_single_device_and_checkpoints_move_between_slice_counts(reference, tmp_path):
    """data 4 (2 per slice, simulated) x tensor 2: the 1-device steps; its checkpoint resumes on one slice."""
    from neox_jax import checkpoint

    initial, ref_params, ref_losses = reference
    config = tiny_config(4, 1, 2, 1)
    config.mesh.slices = 2
    run = build(config)
    assert sharding.mesh_device_slices(run.mesh, jax.devices(), 2) == [0] * 4 + [1] * 4  # data splits the slices
    step = train.make_train_step(run)
    state = jax.device_put(initial, train.state_shardings(run))
    tokens = batches(STEPS)
    state, metrics = step(state, sharding.global_batch({"tokens": tokens[0]}, run.mesh))
    losses = [float(metrics["loss"])]
    saver = checkpoint.Checkpointer(str(tmp_path))
    saver.save(1, {"train": state}, {}, {})
    saver.close()

    config.mesh.slices = 1  # the same layout on one slice: only the device order differs
    one = build(config)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                            train.state_shardings(one))
    restored, _, _ = checkpoint.Checkpointer(str(tmp_path)).restore({"train": abstract})
    state = restored["train"]
    step = train.make_train_step(one)
    for batch in tokens[1:]:
        state, metrics = step(state, sharding.global_batch({"tokens": batch}, one.mesh))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
