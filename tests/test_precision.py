"""Master weights (precision.mode=master_weights): 16-bit params and gradients with an fp32 master copy placed
like the Adam moments. Held to a run with fp32 params and the same compute dtype on the same layout; the master
is split where the rules say; kill-and-resume is bit-exact; export and HF loading go through the master."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import checkpoint as ckpt
from neox_jax import convert, train, trainer, weights
from neox_jax.config import ConfigError, from_spec, validate
from neox_jax.pytree import path_name

from layout_checks import build, comparable, rel_err, run_steps
from test_trainer import TINY, _config, _train_losses
from tiny_configs import tiny_config

LAYOUTS = {  # name: (data, fsdp, tensor, zero_stage, compute dtype, loss scale)
    "fsdp8_zero3_bf16": (1, 8, 1, 3, "bfloat16", "none"),
    "data4_tensor2_zero1_fp16_loss_scaled": (4, 1, 2, 1, "float16", "dynamic"),
}


def precision_config(data, fsdp, tensor, zero_stage, dtype, loss_scale, mode):
    """The tiny run in a compute dtype and precision mode (the loss scale grows every 2 good steps)."""
    return tiny_config(data, fsdp, tensor, zero_stage, model=dict(dtype=dtype),
                       precision=dict(mode=mode, loss_scale=loss_scale, initial_scale_power=12, loss_scale_window=2))


def _is_matrix(path) -> bool:
    return path_name(path).endswith("kernel") or "embed" in path_name(path)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_master_weights_follow_the_fp32_params_run(layout):
    """Same init, batches and compute dtype: the fp32 master tracks the fp32 params, and the losses agree. They
    are not bit-equal because the 16-bit run also stores LayerNorm parameters and biases in 16 bits (LayerNorm
    applies its parameters in fp32, so the fp32 run uses unrounded ones), and sums its embedding gradient in 16 bits."""
    runs = {}
    for mode in ("fp32_params", "master_weights"):
        run = build(precision_config(*LAYOUTS[layout], mode))
        state = train.init_train_state(run, jax.random.PRNGKey(0))
        step, state, losses = run_steps(run, state)
        assert step._cache_size() == 1
        runs[mode] = (run, state, losses)
    _, reference, ref_losses = runs["fp32_params"]
    run, state, losses = runs["master_weights"]
    config = run.config
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-4)
    assert int(state.skipped_steps) == int(reference.skipped_steps)
    master = comparable(jax.device_get(state.master))
    want = comparable(jax.device_get(reference.params))
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(master)[0], jax.tree.leaves(want)):
        assert rel_err(got, ref) <= (2e-3 if _is_matrix(path) else 3e-2), path_name(path)

    # The 16-bit params are exactly the cast of the master, stored where the params go; the master and moments
    # are fp32 and split where the ZeRO stage puts the optimizer state.
    dtype = jnp.dtype(config.model.dtype)
    for p, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.master)):
        assert p.dtype == dtype and w.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(p), np.asarray(w.astype(dtype)))
    expected = train.state_shardings(run)
    for (path, arr), want in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(expected)):
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (path_name(path), arr.sharding, want)
    kernel = state.master["layers"]["mlp"]["dense_h_to_4h"]["kernel"]  # [layers, embed 64, mlp 256]
    split = {1: config.mesh.data * config.mesh.fsdp, 3: config.mesh.fsdp}[config.zero_stage]
    assert kernel.addressable_shards[0].data.size * split * config.mesh.tensor == kernel.size
    assert state.params["layers"]["mlp"]["dense_h_to_4h"]["kernel"].addressable_shards[0].data.size * \
        (config.mesh.fsdp if config.zero_stage == 3 else 1) * config.mesh.tensor == kernel.size


def test_master_weights_need_a_16bit_compute_dtype():
    c = precision_config(1, 1, 1, 0, "float32", "none", "master_weights")
    with pytest.raises(ConfigError, match="model.dtype: precision.mode=master_weights stores the params in"):
        validate(c)
    c.model.dtype, c.precision.mode = "bfloat16", "fp16_master"
    with pytest.raises(ConfigError, match="precision.mode: 'fp16_master' is not one of fp32_params, master_weights"):
        validate(c)


def _random_master(run, seed):
    """Host fp32 weights of the run's master shapes, drawn here (the model's random init compiles for seconds, and
    what these tests check is how given weights are stored, not how they were drawn)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), train.state_shapes(run).master)


def test_initial_weights_fill_the_master_exactly():
    """Weights loaded from a 16-bit checkpoint (here bf16-rounded values in fp32 arrays, as convert.load_hf
    returns them) become the fp32 master bit for bit, and the params their exact 16-bit cast."""
    run = build(precision_config(2, 1, 2, 1, "bfloat16", "none", "master_weights"), jax.devices()[:4])
    random = _random_master(run, 3)
    loaded = jax.tree.map(lambda w: np.asarray(w.astype(jnp.bfloat16).astype(np.float32)), random)
    state = train.init_train_state(run, jax.random.PRNGKey(0), params=loaded)
    for got, want, p in zip(jax.tree.leaves(state.master), jax.tree.leaves(loaded), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(got), want)
        np.testing.assert_array_equal(np.asarray(p).astype(np.float32), want)


def test_bf16_hf_checkpoint_loads_into_the_master_exactly(tmp_path):
    config = precision_config(1, 1, 1, 0, "bfloat16", "none", "master_weights")
    run = build(config, jax.devices()[:1])
    weights = _random_master(run, 1)
    convert.save_hf(config, weights, tmp_path / "hf", dtype="bfloat16")
    hf_config, loaded = convert.load_hf(tmp_path / "hf")
    state = train.init_train_state(run, jax.random.PRNGKey(0), params=loaded)
    rounded = jax.tree.map(lambda w: np.asarray(jnp.asarray(w).astype(jnp.bfloat16).astype(jnp.float32)), weights)
    for got, want in zip(jax.tree.leaves(state.master), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.slow
def test_master_weights_resume_bit_exact_and_export_reads_the_master(tmp_path):
    """Stopped after 3 steps and resumed, a master-weights run logs the uninterrupted run's losses exactly and ends
    with the same master; export reads that fp32 master."""
    extra = {"model.dtype": "bfloat16", "precision.mode": "master_weights", "train.eval_every": 0}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train(_config(**extra), str(straight))
    trainer.train(_config(**extra), str(resumed), stop_after=3)
    trainer.train(_config(**extra), str(resumed))
    want, got = _train_losses(straight), _train_losses(resumed)
    assert {s: v[-1] for s, v in got.items()} == {s: v[0] for s, v in want.items()}
    (_, a), (_, b) = weights.load_workdir_params(str(straight)), weights.load_workdir_params(str(resumed))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == np.float32
        np.testing.assert_array_equal(x, y)
    saved = ckpt.Checkpointer(str(straight), create=False).stored_metadata(8)["train"]
    assert saved["params"]["embed_in"].dtype == jnp.bfloat16 and saved["master"]["embed_in"].dtype == np.float32


def test_default_precision_stays_fp32_params():
    assert from_spec(TINY, {}).precision.mode == "fp32_params"
