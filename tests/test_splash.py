"""Splash attention (the Pallas TPU kernel, in Pallas interpret mode on these CPUs) against XLA attention: the
kernel's output and q/k/v gradients, a tiny model's logits, train steps on a data x tensor mesh (the shard_map
path), HF's logits; and the one-line errors where it cannot run. The kernel tiles 128 tokens at a time, so these
sequences are 256 tokens: 2 x 2 blocks, the one above the diagonal skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES
from neox_jax import config as C
from neox_jax import convert, model as M, sharding, splash, targets, train
from neox_jax.config import ConfigError

from layout_checks import build, comparable, rel_err
from tiny_configs import tiny_config, tiny_model

T = 256
SPLASH = dict(attention_impl="splash", splash_interpret=True, splash_block_q=128, splash_block_kv=128)


def attention(impl):
    m = tiny_model(max_position_embeddings=T, **(SPLASH if impl == "splash" else dict(attention_impl=impl)))
    if impl == "splash":
        return lambda q, k, v: splash.causal_attention(q, k, v, m)
    return lambda q, k, v: M.dot_product_attention(q, k, v, "xla", is_causal=True)


def test_kernel_matches_xla_forward_and_gradients():
    q, k, v = (jax.random.normal(key, (2, T, 4, 32)) for key in jax.random.split(jax.random.PRNGKey(0), 3))
    cotangent = jax.random.normal(jax.random.PRNGKey(1), q.shape)
    results = {}
    for impl in ("xla", "splash"):
        f = attention(impl)
        out, vjp = jax.vjp(f, q, k, v)
        results[impl] = (out, *vjp(cotangent))
    for name, got, want in zip(("out", "dq", "dk", "dv"), results["splash"], results["xla"]):
        tol = 1e-5 if name == "out" else 1e-4
        np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)


def test_tiny_model_logits_match_xla():
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, T), 0, 500)
    m_xla = tiny_model(max_position_embeddings=T)
    params = M.GPTNeoX(m_xla).init(jax.random.PRNGKey(0), ids)["params"]
    logits = {impl: jax.jit(M.GPTNeoX(m).apply)({"params": params}, ids)
              for impl, m in (("xla", m_xla), ("splash", tiny_model(max_position_embeddings=T, **SPLASH)))}
    np.testing.assert_allclose(logits["splash"], logits["xla"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(data=2, tensor=2), dict(stage=2, data=2)], ids=["data2_tensor2", "stage2_data2"])
def test_train_steps_match_xla(layout):
    """The train step through shard_map (rows over data, heads over tensor; under the pipeline's vmap over
    stages): XLA attention's losses and params (but the key bias, whose gradient is rounding noise on any path:
    `comparable`)."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 500, (4, T + 1), dtype=np.int32) for _ in range(2)]
    results = {}
    for impl in ("xla", "splash"):
        model = dict(max_position_embeddings=T, **(SPLASH if impl == "splash" else {}))
        config = tiny_config(**layout, model=model, train=dict(seq_len=T, batch_size=4, micro_batches=2))
        run = build(config, jax.devices()[:4])
        state = train.init_train_state(run, jax.random.PRNGKey(0))
        step = train.make_train_step(run)
        losses = []
        for batch in tokens:
            state, metrics = step(state, sharding.global_batch({"tokens": batch}, run.mesh))
            losses.append(float(metrics["loss"]))
        results[impl] = losses, comparable(jax.device_get(state.params))
    np.testing.assert_allclose(results["splash"][0], results["xla"][0], rtol=1e-5)
    want = dict(jax.tree_util.tree_flatten_with_path(results["xla"][1])[0])
    for path, got in jax.tree_util.tree_flatten_with_path(results["splash"][1])[0]:
        assert rel_err(got, want[path]) < 1e-5, path


@pytest.mark.slow
def test_hf_logits_with_splash():
    """HF's GPT-NeoX (eager attention) on the stored tiny checkpoint, 256 tokens, against ours through splash."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = FIXTURES / "hf_reference" / "tiny-gpt-neox-parallel"
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = np.random.default_rng(3).integers(0, 512, (2, T)).astype(np.int32)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    config, params = convert.load_hf(d)
    config.model.update(dict(max_position_embeddings=T, **SPLASH))
    got = jax.jit(M.GPTNeoX(config.model).apply)({"params": params}, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


# ---- where splash is picked, and where it cannot run -------------------------------------------------------

def test_auto_picks_splash_on_tpu_for_whole_blocks():
    m = tiny_model()
    assert M.attention_impl_for(m, "tpu", seq_len=2048) == "splash"
    assert M.attention_impl_for(m, "tpu", seq_len=64) == "xla"  # below one 128-token block
    assert M.attention_impl_for(m, "tpu", decoding=True) == "xla"
    assert M.attention_impl_for(m, "cpu", seq_len=2048) == "xla"
    assert M.attention_impl_for(tiny_model(**SPLASH), "cpu", decoding=True) == "xla"


def test_splash_off_tpu_without_interpret_is_one_error():
    m = tiny_model(max_position_embeddings=T, attention_impl="splash")
    q = jnp.zeros((1, T, 4, 16))
    with targets.compiling_for("cpu"), pytest.raises(ConfigError, match="compiles only for TPU.*splash_interpret=true"):
        splash.causal_attention(q, q, q, m)


@pytest.mark.parametrize("fields, seq_len, needle", [
    (dict(splash_block_q=100), 200, r"model.splash_block_q: block 100 must be a multiple of 128"),
    (dict(splash_block_kv=256), 384, r"model.splash_block_kv: block 256 must be a multiple of 128 that divides "
                                     r"the sequence length 384"),
    ({}, 64, r"model.splash_block_q: block 64 must be a multiple of 128 .* use attention_impl=xla"),
    (dict(splash_block_q=-1), 256, r"model.splash_block_q: must be >= 0"),
])
def test_blocks_that_do_not_tile_the_sequence_are_one_error(fields, seq_len, needle):
    c = tiny_config(model=dict(attention_impl="splash", max_position_embeddings=512, **fields),
                    train=dict(seq_len=seq_len))
    with pytest.raises(ConfigError, match=needle):
        C.validate(c)
