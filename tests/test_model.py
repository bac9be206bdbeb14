"""Model properties that need no HF reference: causality, KV-cache decoding equal to the full forward pass,
remat policies and bf16 compute against the plain fp32 model, and the NeoX init formulas."""

import math

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax import config as C
from neox_jax import model as M

import tiny_configs


def tiny_model(**changes):
    """The tests' tiny model with half of each head's 16 dims rotary (the default 0.25 rotates 4)."""
    m = tiny_configs.tiny_model(**{"rotary_pct": 0.5, **changes})
    C.validate_model(m)
    return m


@pytest.fixture(scope="module")
def tiny():
    """Random params of the model's shapes (init would leave LayerNorms at (1, 0) and biases at 0, hiding terms)."""
    m = tiny_model()
    shapes = flax.linen.meta.unbox(M.param_shapes(m))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: ((1.0 if path[-1].key == "scale" else 0.0) + 0.2 * rng.normal(size=s.shape)).astype(np.float32),
        shapes)
    ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, 64)
    return m, params, ids


def logits_fn(m):
    return jax.jit(lambda p, ids: M.GPTNeoX(m).apply({"params": p}, ids))


@pytest.mark.parametrize("parallel", [True, False])
def test_causal(tiny, parallel):
    m, params, ids = tiny
    m = tiny_model(use_parallel_residual=parallel)
    f = logits_fn(m)
    t = 7
    changed = ids.at[:, t].set((ids[:, t] + 1) % 64)
    a, b = np.asarray(f(params, ids)), np.asarray(f(params, changed))
    np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 1e-3  # every later position sees the change


@pytest.mark.slow
@pytest.mark.parametrize("stacked", [True, False])
def test_kv_cache_decode_equals_full_forward(tiny, stacked):
    m, params, ids = tiny
    full = np.asarray(logits_fn(m)(params, ids))
    if not stacked:  # per-layer weights and caches, unrolled layer loop: the full forward too
        params = M.unstack_layers(params)
        unrolled = jax.jit(lambda p, ids: M.for_params(m, p).apply({"params": p}, ids))(params, ids)
        np.testing.assert_allclose(unrolled, full, rtol=0, atol=1e-5)
    step = jax.jit(lambda p, ids, cache: M.for_params(m, p).apply({"params": p}, ids, cache=cache))
    prefill = 5
    cache = M.init_cache(m, batch=ids.shape[0], max_len=16, stacked=stacked)
    logits, cache = step(params, ids[:, :prefill], cache)
    decoded = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(params, ids[:, t:t + 1], cache)
        decoded.append(logits)
    assert int(cache["index"]) == ids.shape[1]
    np.testing.assert_allclose(np.concatenate(decoded, axis=1), full, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_remat_policies_give_same_logits_and_grads(tiny):
    m, params, ids = tiny

    def loss_and_grad(policy):
        mm = tiny_model(remat_policy=policy)

        def loss(p):
            logits = M.GPTNeoX(mm).apply({"params": p}, ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = loss_and_grad("none")
    for policy in ("full", "dots", "dots_no_batch", "attention_out"):
        value, grad = loss_and_grad(policy)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6, err_msg=policy)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=policy),
                     grad, ref_grad)


@pytest.mark.slow
def test_chunked_attention_equals_xla_attention(tiny):
    """attention_impl=chunked (query blocks, each rematerialised) gives XLA attention's loss and gradients, and
    runs in bf16 and (on CPU, through fp32) fp16."""
    m, params, ids = tiny

    def loss_and_grad(**changes):
        mm = tiny_model(**changes)

        def loss(p):
            logits = M.GPTNeoX(mm).apply({"params": p}, ids)
            return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref_grad = loss_and_grad(attention_impl="xla")
    value, grad = loss_and_grad(attention_impl="chunked", attention_chunk=4)  # 12 tokens: 3 blocks
    np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grad, ref_grad)
    for dtype in ("bfloat16", "float16"):
        half, _ = loss_and_grad(attention_impl="chunked", attention_chunk=4, dtype=dtype)
        np.testing.assert_allclose(half, ref_loss, rtol=2e-2, err_msg=dtype)
    with pytest.raises(ValueError, match="attention_chunk=5 does not divide the sequence length 12"):
        loss_and_grad(attention_impl="chunked", attention_chunk=5)


@pytest.mark.slow
def test_bf16_compute_close_to_fp32(tiny):
    m, params, ids = tiny
    fp32 = np.asarray(logits_fn(m)(params, ids))
    bf16 = np.asarray(logits_fn(tiny_model(dtype="bfloat16"))(params, ids))
    assert bf16.dtype == np.float32  # logits are accumulated in fp32 whatever the compute dtype
    rel = np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32)
    assert rel < 2e-2, rel
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.9


@pytest.mark.slow
@pytest.mark.parametrize("init", ["small_init", "normal"])
def test_init_std_follows_neox_formulas(init):
    h, layers = 128, 2
    m = tiny_model(hidden_size=h, num_layers=layers, num_heads=4, vocab_size=512, padded_vocab_size=512,
                   init=init, init_std=0.02)
    p = jax.jit(lambda key: M.init_params(m, key))(jax.random.PRNGKey(0))  # compiled: op by op takes longer
    if init == "small_init":  # small_init sqrt(2/5H); wang_init 2/(L sqrt H) for the output projections
        std, out_std = math.sqrt(2 / (5 * h)), 2 / (layers * math.sqrt(h))
    else:  # normal(0.02); scaled_normal 0.02/sqrt(2L)
        std, out_std = 0.02, 0.02 / math.sqrt(2 * layers)
    a, mlp = p["layers"]["attention"], p["layers"]["mlp"]
    for name, w, expected in [("embed_in", p["embed_in"], std), ("embed_out", p["embed_out"], std),
                              ("query_key_value", a["query_key_value"]["kernel"], std),
                              ("dense_h_to_4h", mlp["dense_h_to_4h"]["kernel"], std),
                              ("attention.dense", a["dense"]["kernel"], out_std),
                              ("dense_4h_to_h", mlp["dense_4h_to_h"]["kernel"], out_std)]:
        w = np.asarray(w)
        assert abs(w.mean()) < 0.05 * expected, name
        assert abs(w.std() / expected - 1) < 0.03, (name, w.std(), expected)
    zeros = [("qkv bias", a["query_key_value"]["bias"]), ("mlp bias", mlp["dense_4h_to_h"]["bias"]),
             ("LN bias", p["layers"]["input_layernorm"]["bias"]), ("final LN bias", p["final_layer_norm"]["bias"])]
    for name, b in zeros:
        assert not np.asarray(b).any(), name
    assert (np.asarray(p["layers"]["post_attention_layernorm"]["scale"]) == 1).all()
