"""Context parallelism (`mesh.context`): the sequence split over devices, K/V all-gathered for attention. Train
steps on the 8 simulated devices against the one-device run (losses, then every parameter after the steps: the
gradients' effect), with XLA and splash attention; and the one-line errors."""

import jax
import numpy as np
import pytest

from neox_jax import config as C
from neox_jax import context, sharding, train
from neox_jax.config import ConfigError

from layout_checks import build, comparable, rel_err
from tiny_configs import tiny_config

T = 256
STEPS = 4
SPLASH = dict(attention_impl="splash", splash_interpret=True, splash_block_q=128, splash_block_kv=128)


def run_steps(layout: dict, devices: int, model: dict | None = None):
    config = tiny_config(**layout, model=dict(max_position_embeddings=T, **(model or {})),
                         train=dict(seq_len=T, batch_size=4, micro_batches=2))
    run = build(config, jax.devices()[:devices])
    state = train.init_train_state(run, jax.random.PRNGKey(0))
    step = train.make_train_step(run)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(STEPS):
        tokens = rng.integers(0, 500, (4, T + 1), dtype=np.int32)
        state, metrics = step(state, sharding.global_batch({"tokens": tokens}, run.mesh))
        losses.append(float(metrics["loss"]))
    return losses, comparable(jax.device_get(state.params))


@pytest.fixture(scope="module")
def one_device():
    return run_steps({}, 1)


def assert_same_run(got, want):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    reference = dict(jax.tree_util.tree_flatten_with_path(want[1])[0])
    for path, value in jax.tree_util.tree_flatten_with_path(got[1])[0]:
        assert rel_err(value, reference[path]) < 1e-5, path


# the fast tier keeps the layout that mixes the context axis with fsdp, tensor and ZeRO-3 (context8 alone: ~9 s)
@pytest.mark.parametrize("layout", [pytest.param(dict(context=8), id="context8", marks=pytest.mark.slow),
                                    pytest.param(dict(fsdp=2, context=2, tensor=2, zero_stage=3),
                                                 id="fsdp2_context2_tensor2_zero3")])
def test_context_parallel_matches_one_device(layout, one_device, monkeypatch):
    calls = []
    original = context.causal_attention
    monkeypatch.setattr(context, "causal_attention", lambda *a: calls.append(1) or original(*a))
    assert_same_run(run_steps(layout, 8), one_device)
    assert calls  # the split attention was traced, not XLA's whole-sequence one
    if layout.get("zero_stage") == 3:  # the params split over fsdp x context, not copied over context
        spec = build(tiny_config(**layout), jax.devices()[:8]).placement.params["embed_in"]
        assert spec == jax.sharding.PartitionSpec("tensor", ("fsdp", "context")), spec


@pytest.mark.slow
def test_context_parallel_with_splash_matches_one_device(one_device):
    """context 2: each device's 128 queries through the kernel at its offset, against all 256 keys."""
    assert_same_run(run_steps(dict(data=2, context=2), 4, SPLASH), one_device)


@pytest.mark.parametrize("mesh, model, needle", [
    (dict(context=3, data=1), {}, r"mesh.context: 3 does not divide train.seq_len=256"),
    (dict(context=4, data=2), SPLASH, r"model.splash_block_q: block 128 must be a multiple of 128 that divides "
                                      r"the sequence length 64"),
])
def test_context_that_does_not_divide_the_sequence_is_one_error(mesh, model, needle):
    c = tiny_config(model=dict(max_position_embeddings=T, **model), train=dict(seq_len=T))
    c.mesh.update(mesh)
    with pytest.raises(ConfigError, match=needle):
        C.validate(c)
