"""The GPT-NeoX model in Flax Linen.

    x = embed_in[ids]
    per layer:  x = x + Attn(LN1(x)) + MLP(LN2(x))       (parallel residual, the NeoX default)
           or:  x = x + Attn(LN1(x)); x = x + MLP(LN2(x)) (sequential)
    logits = final_LN(x) @ embed_out                       (untied)

Layers are one `nn.scan` over a single block, so XLA compiles the block once and every layer parameter has
a leading `layers` axis. Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`,
`layers`); `neox_jax.sharding` maps them to mesh axes. The same code serves training (no cache, causal flash
attention) and decoding (an explicit KV-cache pytree in, an updated one out; see `init_cache`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from neox_jax import config as cfg
from neox_jax import context, splash, targets

Array = jax.Array

# Logical names of the activations constrained at block boundaries.
ACT_AXES = ("batch", "length", "embed")


def _std(m, output_projection: bool) -> float:
    """NeoX init: small_init N(0, sqrt(2/5H)) + wang_init 2/(L sqrt H) for output projections;
    or normal(init_std) + scaled_normal init_std/sqrt(2L)."""
    if m.init == "small_init":
        return 2.0 / (m.num_layers * math.sqrt(m.hidden_size)) if output_projection else math.sqrt(2.0 / (5 * m.hidden_size))
    return m.init_std / math.sqrt(2.0 * m.num_layers) if output_projection else m.init_std


def _param(module, name, std, shape, axes, dtype):
    init = nn.initializers.normal(std) if std is not None else nn.initializers.zeros_init()
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """x [..., *in] times a kernel [*in, *out] plus a bias [*out]; `in` are x's trailing dims.

    Computed as one 2-D matmul over flattened dims: XLA:CPU emits a much slower backward pass for einsums
    that contract or keep several batch dims (measured 1.5x on the output head), and GPUs don't mind."""

    kernel_shape: tuple
    kernel_axes: tuple
    bias_shape: tuple
    bias_axes: tuple
    std: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        w = _param(self, "kernel", self.std, self.kernel_shape, self.kernel_axes, self.param_dtype)
        b = _param(self, "bias", None, self.bias_shape, self.bias_axes, self.param_dtype)
        return _flat_dot(x.astype(self.dtype), w.astype(self.dtype), len(self.kernel_shape) - len(self.bias_shape)) \
            + b.astype(self.dtype)


def _flat_dot(x, w, contract: int, **kwargs):
    """Contract the trailing `contract` dims of x with the leading ones of w, as a single 2-D matmul."""
    lead, inner, out = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
    y = jnp.dot(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1), **kwargs)
    return y.reshape(*lead, *out)


def layer_norm(m, name):
    return nn.LayerNorm(
        epsilon=m.layernorm_eps,
        dtype=jnp.dtype(m.dtype),
        param_dtype=jnp.dtype(m.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


# ---- rotary ----------------------------------------------------------------------------------------------

def rotary_tables(positions: Array, rot_dims: int, base: float) -> tuple[Array, Array]:
    """cos/sin of shape [B, T, r] for integer positions [B, T]; inv_freq over r, not head_dim (NeoX)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rot_dims, 2, dtype=jnp.float32) / rot_dims))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate the leading r dims of every head of x [B, T, n, d] ("rotate_half" convention)."""
    r = cos.shape[-1]
    if r == 0:
        return x
    x_rot, x_pass = x[..., :r].astype(jnp.float32), x[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    x_rot = x_rot * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)


# ---- attention -------------------------------------------------------------------------------------------

def attention_impl_for(m, platform: str, decoding: bool = False, seq_len: int | None = None) -> str:
    """The attention implementation a step traced for `platform` uses."""
    with targets.compiling_for(platform):
        return attention_impl(m, decoding, seq_len)


def attention_impl(m, decoding: bool, seq_len: int | None = None) -> str:
    """Training: splash attention on TPU (sequences of whole 128-token blocks), cuDNN flash attention on GPU in
    half precision, XLA otherwise (CPU, fp32 on GPU). Decoding and packed-row masks always use XLA: "chunked"
    (`causal_attention_chunked`) and "splash" are causal-only training kernels."""
    if m.attention_impl in ("chunked", "splash") and decoding:
        return "xla"
    if m.attention_impl != "auto":
        return m.attention_impl
    if decoding:
        return "xla"
    if targets.target_platform() == "tpu":
        fits = seq_len is None or cfg.splash_block_problem(m, seq_len) is None
        return "splash" if fits else "xla"
    half = jnp.dtype(m.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if targets.target_platform() != "gpu" or not half:
        return "xla"
    return "cudnn" if _cudnn_takes_head_dim(m.hidden_size // m.num_heads) else "chunked"


def _cudnn_takes_head_dim(head_dim: int) -> bool:
    """cuDNN flash attention takes head dims up to 128 (multiples of 8), and 256 on Hopper and later (pythia-1b's
    is 256). A compile for a GPU this host does not have cannot ask the device, so there 128 is the limit."""
    if head_dim % 8:
        return False
    if head_dim <= 128:
        return True
    try:
        gpu = jax.local_devices(backend="gpu")[0]
        return head_dim <= 256 and tuple(int(x) for x in gpu.compute_capability.split(".")) >= (9, 0)
    except (RuntimeError, AttributeError, ValueError):  # no GPU here: a deviceless compile
        return False


def _cpu_fp16(*xs):
    """XLA:CPU has no fp16 matmul with fp32 output: there (only), fp16 operands run in fp32."""
    if xs[0].dtype == jnp.float16 and targets.target_platform() == "cpu":
        return tuple(x.astype(jnp.float32) for x in xs)
    return xs


def dot_product_attention(q, k, v, impl: str, mask=None, is_causal=False):
    """`jax.nn.dot_product_attention` in q's dtype (fp16 on CPU computed in fp32)."""
    q32, k32, v32 = _cpu_fp16(q, k, v)
    out = jax.nn.dot_product_attention(q32, k32, v32, mask=mask, is_causal=is_causal, implementation=impl)
    return out.astype(q.dtype)


def causal_attention_chunked(q: Array, k: Array, v: Array, chunk: int) -> Array:
    """Causal softmax attention of q, k, v [B, T, n, d], one block of `chunk` queries at a time.

    Each block's scores [B, n, chunk, T] exist only while that block is computed, forward and backward (the
    block is rematerialised), so memory is O(chunk x T) per head instead of XLA's O(T^2): what flash attention
    saves, without a kernel, on CPU and TPU. Scores and softmax in fp32; k and v enter the block loop in fp32 so
    their gradients accumulate over blocks in fp32."""
    b, t, n, d = q.shape
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"model.attention_chunk={chunk} does not divide the sequence length {t}")
    dtype = q.dtype
    k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
    blocks = q.reshape(b, t // chunk, chunk, n, d).swapaxes(0, 1)

    @jax.checkpoint
    def block(qb, start):
        qb, kb, vb = _cpu_fp16(qb, k32.astype(dtype), v32.astype(dtype))
        scores = jnp.einsum("bqnd,bknd->bnqk", qb, kb, preferred_element_type=jnp.float32) / math.sqrt(d)
        causal = (start + jnp.arange(chunk))[:, None] >= jnp.arange(t)[None, :]
        probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("bnqk,bknd->bqnd", probs.astype(vb.dtype), vb).astype(dtype)

    out = jax.lax.map(lambda a: block(*a), (blocks, jnp.arange(t // chunk) * chunk))
    return out.swapaxes(0, 1).reshape(b, t, n, d)


def _context_attention(m, chunk: int, chunks: int):
    """One device's causal attention under context parallelism: its `chunk` queries, chunk `index` of the
    sequence, against all keys. Splash builds its mask from a static offset, so it switches between one kernel
    per chunk; XLA takes the offset as it comes."""
    if attention_impl(m, False, chunk) == "splash":
        kernels = [functools.partial(splash.local_attention, m=m, offset=i * chunk) for i in range(chunks)]
        return lambda q, k, v, index: jax.lax.switch(index, kernels, q, k, v)

    def xla(q, k, v, index):
        causal = (index * chunk + jnp.arange(chunk))[:, None] >= jnp.arange(k.shape[1])[None, :]
        return dot_product_attention(q, k, v, "xla", mask=causal[None, None])
    return xla


class Attention(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x, cos, sin, kv=None, cache_meta=None, mask=None):
        m = self.config
        n, d, h = m.num_heads, cfg.head_dim(m), m.hidden_size
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        # Fused per-head qkv: outputs laid out n_heads x (q|k|v) x head_dim, as NeoX/HF store them.
        qkv = Linear((h, n, 3, d), ("embed", "heads", None, "kv"), (n, 3, d), ("heads", None, "kv"),
                     _std(m, False), dt, pdt, name="query_key_value")(x)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None and mask is not None:  # the caller's [B, 1, T, T] mask (rows packing several sequences)
            out = dot_product_attention(q, k, v, attention_impl(m, True), mask=mask)
        elif kv is None and (chunks := context.in_mesh()) > 1:
            out = context.causal_attention(q, k, v, _context_attention(m, q.shape[1] // chunks, chunks))
        elif kv is None and (impl := attention_impl(m, False, q.shape[1])) == "chunked":
            out = causal_attention_chunked(q, k, v, m.attention_chunk)
        elif kv is None and impl == "splash":
            out = splash.causal_attention(q, k, v, m)
        elif kv is None:
            out = dot_product_attention(q, k, v, impl, is_causal=True)
        else:
            # The whole [L, B, S, n, d] cache rides in the scan carry and this layer writes its slice in place:
            # returning per-layer slices as scan outputs would copy the entire cache on every decode step.
            index, key_mask = cache_meta  # key_mask [B, S]: slots holding real tokens, this step's included
            i = kv["layer"]
            cache_k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype)[None], (i, 0, index, 0, 0))
            cache_v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype)[None], (i, 0, index, 0, 0))
            k_all = jax.lax.dynamic_index_in_dim(cache_k, i, keepdims=False).astype(dt)
            v_all = jax.lax.dynamic_index_in_dim(cache_v, i, keepdims=False).astype(dt)
            t, s = q.shape[1], k_all.shape[1]
            causal = jnp.arange(s)[None, :] <= (index + jnp.arange(t))[:, None]  # [T, S] in slot order
            mask = causal[None, None] & key_mask[:, None, None, :]
            out = dot_product_attention(q, k_all, v_all, attention_impl(m, True), mask=mask)
            kv = {"k": cache_k, "v": cache_v, "layer": i + 1}
        out = checkpoint_name(out, "attention_out")
        out = Linear((n, d, h), ("heads", "kv", "embed"), (h,), ("embed",),
                     _std(m, True), dt, pdt, name="dense")(out)
        return out, kv


class MLP(nn.Module):
    config: Any

    @nn.compact
    def __call__(self, x):
        m = self.config
        h, f = m.hidden_size, cfg.ffn_size(m)
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        y = Linear((h, f), ("embed", "mlp"), (f,), ("mlp",), _std(m, False), dt, pdt,
                   name="dense_h_to_4h")(x)
        y = jax.nn.gelu(y, approximate=m.hidden_act != "gelu")
        return Linear((f, h), ("mlp", "embed"), (h,), ("embed",), _std(m, True), dt, pdt,
                      name="dense_4h_to_h")(y)


class Block(nn.Module):
    """One transformer layer; the scan carry is (residual stream x, KV cache or None)."""

    config: Any

    @nn.compact
    def __call__(self, carry, cos, sin, cache_meta, mask=None):
        m = self.config
        x, kv = carry
        attn, kv = Attention(m, name="attention")(layer_norm(m, "input_layernorm")(x), cos, sin, kv, cache_meta, mask)
        if m.use_parallel_residual:
            x = x + attn + MLP(m, name="mlp")(layer_norm(m, "post_attention_layernorm")(x))
        else:
            x = x + attn
            x = x + MLP(m, name="mlp")(layer_norm(m, "post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ACT_AXES)
        self.sow("intermediates", "hidden_states", x)
        return (x, kv), None


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


def layer_stack(m, length=None):
    """The scanned blocks: `length` layers (default all of them) with params stacked on a leading axis."""
    length = m.num_layers if length is None else length
    block = Block
    if m.remat_policy != "none":
        block = nn.remat(Block, prevent_cse=False, policy=REMAT_POLICIES[m.remat_policy])
    return nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
        length=length,
        unroll=min(m.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )(m, name="layers")


def default_positions(b: int, t: int, start=0) -> Array:
    """Rotary positions start..start+T-1 for every row."""
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))


class LayerStack(nn.Module):
    """`length` consecutive blocks alone, for a pipeline stage: params {"layers": [length, ...]} (a contiguous
    slice of GPTNeoX's stacked `layers`), x [B, T, H] at positions 0..T-1 -> x after those blocks."""

    config: Any
    length: int

    @nn.compact
    def __call__(self, x):
        m = self.config
        b, t = x.shape[:2]
        cos, sin = rotary_tables(default_positions(b, t), cfg.rotary_dims(m), m.rotary_emb_base)
        (x, _), _ = layer_stack(m, self.length)((x, None), cos, sin, None, None)
        return x


def head_logits(x: Array, embed_out: Array) -> Array:
    """fp32 logits [..., V] of hidden states x [..., H] (in the compute dtype) through embed_out [H, V]."""
    return _flat_dot(*_cpu_fp16(x, embed_out.astype(x.dtype)), 1, preferred_element_type=jnp.float32)


class GPTNeoX(nn.Module):
    """`GPTNeoX(model_config).apply({"params": p}, ids)` -> fp32 logits [B, T, padded_vocab].

    With `cache=` (from `init_cache`) it returns `(logits, new_cache)`: the KV-cache decode path.
    `method="hidden"` returns the final hidden state instead of logits (for a chunked loss).
    `stacked=False` runs the same layers from per-layer parameters (`unstack_layers`) and per-layer caches
    (`init_cache(..., stacked=False)`) in an unrolled loop: each weight and cache is then its own buffer, which a
    decode step reads where it lies instead of slicing it out of the stacked array.
    """

    config: Any
    stacked: bool = True

    def setup(self):
        m = self.config
        v, h = cfg.padded_vocab(m), m.hidden_size
        pdt = jnp.dtype(m.param_dtype)
        self.embed_in = _param(self, "embed_in", _std(m, False), (v, h), ("vocab", "embed"), pdt)
        self.layers = layer_stack(m) if self.stacked else [Block(m) for _ in range(m.num_layers)]
        self.final_layer_norm = layer_norm(m, "final_layer_norm")
        self.embed_out = _param(self, "embed_out", _std(m, False), (h, v), ("embed", "vocab"), pdt)

    def hidden(self, input_ids, positions=None, cache=None, input_mask=None, attention_mask=None):
        """Final (post-LayerNorm) hidden states [B, T, H], and the updated cache when one is given.
        `attention_mask` [B, 1, T, T] (True: query may see key; no cache) replaces the causal mask, for rows that
        pack several sequences or a tree of them (`neox_jax.scoring`)."""
        m = self.config
        b, t = input_ids.shape
        if positions is None:
            positions = default_positions(b, t, 0 if cache is None else cache["index"])
        x = self.embed(input_ids)
        self.sow("intermediates", "embeddings", x)
        cos, sin = rotary_tables(positions, cfg.rotary_dims(m), m.rotary_emb_base)
        kv = cache_meta = None
        if cache is not None:
            valid = jnp.ones((b, t), bool) if input_mask is None else input_mask.astype(bool)
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, cache["index"]))
            cache_meta = (cache["index"], key_mask)
            kv = {"k": cache["k"], "v": cache["v"], "layer": jnp.zeros((), jnp.int32)}
        if self.stacked:
            (x, kv), _ = self.layers((x, kv), cos, sin, cache_meta, attention_mask)
        else:
            x, kv = self._layer_loop(x, kv, cos, sin, cache_meta, attention_mask)
        x = self.final_layer_norm(x)
        if cache is None:
            return x, None
        return x, {"k": kv["k"], "v": kv["v"], "mask": cache_meta[1], "index": cache["index"] + t}

    def _layer_loop(self, x, kv, cos, sin, cache_meta, attention_mask=None):
        """The unstacked layers one after another; layer i reads and writes cache entry i (a [1, B, S, n, d]
        buffer of its own, so the attention code is the stacked path's with layer index 0)."""
        ks, vs = [], []
        for i, block in enumerate(self.layers):
            layer_kv = None if kv is None else {"k": kv["k"][i], "v": kv["v"][i], "layer": 0}
            (x, layer_kv), _ = block((x, layer_kv), cos, sin, cache_meta, attention_mask)
            if kv is not None:
                ks.append(layer_kv["k"])
                vs.append(layer_kv["v"])
        return x, (None if kv is None else {"k": tuple(ks), "v": tuple(vs)})

    def logits(self, x):
        return head_logits(x, self.embed_out)

    def embed(self, input_ids):
        """Token embeddings [B, T, H] in the compute dtype: what the first pipeline stage receives."""
        # Gather the table whole over fsdp (ZeRO-3) first, as every layer's weights are: left to itself the gather's
        # partitioner reshuffles table shards between data replicas, which on a multi-slice mesh crosses DCN.
        table = nn.with_logical_constraint(self.embed_in, ("vocab", None))
        x = jnp.take(table, input_ids, axis=0).astype(jnp.dtype(self.config.dtype))
        return nn.with_logical_constraint(x, ACT_AXES)

    def head(self, x):
        """Final LayerNorm then fp32 logits of the block stack's output: what follows the last pipeline stage."""
        return self.logits(self.final_layer_norm(x))

    def __call__(self, input_ids, positions=None, cache=None, input_mask=None):
        x, new_cache = self.hidden(input_ids, positions, cache, input_mask)
        logits = self.logits(x)
        return logits if cache is None else (logits, new_cache)


def init_cache(m, batch: int, max_len: int, dtype=None, stacked: bool = True) -> dict:
    """An empty KV cache: k/v [L, B, S, n, d] (with stacked=False: a tuple of L [1, B, S, n, d] buffers), key-slot
    mask [B, S], fill index (slots are shared by the batch; ragged prompts are left-padded and their pads masked
    out)."""
    dtype = jnp.dtype(dtype or m.dtype)
    shape = (m.num_layers, batch, max_len, m.num_heads, cfg.head_dim(m))
    if stacked:
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    else:
        k, v = (tuple(jnp.zeros((1, *shape[1:]), dtype) for _ in range(m.num_layers)) for _ in range(2))
    return {"k": k, "v": v, "mask": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32)}


def unstack_layers(params) -> dict:
    """Stacked params ({"layers": leaves [L, ...]}) -> per-layer ones ({"layers_0": ..., "layers_{L-1}": ...})
    for `GPTNeoX(m, stacked=False)`. Copies the layer weights (a transient second copy while the stacked one
    is still referenced)."""
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "layers"}
    return {**rest, **{f"layers_{i}": jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)}}


def for_params(m, params) -> GPTNeoX:
    """The module that applies these params: stacked layers (the training layout) or per-layer ones."""
    return GPTNeoX(m, stacked="layers" in params)


def _for_init(m):
    """The config a parameter-creating trace runs: parameters do not depend on the attention kernel, and that
    trace's few tokens do not fill one of splash attention's 128-token blocks."""
    if m.attention_impl != "splash":
        return m
    m = m.copy_and_resolve_references()
    m.attention_impl = "xla"
    return m


def param_shapes(m, seq_len: int = 8):
    """Boxed (logically annotated) parameter shapes, without allocating anything."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    init = GPTNeoX(_for_init(m)).init
    return jax.eval_shape(lambda: init(jax.random.PRNGKey(0), jnp.zeros(ids.shape, ids.dtype)))["params"]


def count_params(m) -> int:
    """Number of parameters from `jax.eval_shape` (no allocation)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(param_shapes(m))))


def init_params(m, rng) -> Any:
    """Unboxed fp32 (param_dtype) parameters."""
    return nn.meta.unbox(GPTNeoX(_for_init(m)).init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
