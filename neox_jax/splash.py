"""Splash attention: the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.splash_attention`)
with GPT-NeoX's causal mask, for training (`model.attention_impl="splash"`, or "auto" on a TPU).

The kernel walks blocks of `block_q` queries x `block_kv` keys, skips those above the diagonal, and never holds
the T x T scores: memory O(T) per head forward and backward. It takes one sequence's heads [n, T, d] and does not
scale the scores, so q is scaled by 1/sqrt(d) first and the batch is a vmap. Rotary is applied to q and k before,
as on every other path.

Under a mesh (the one `sharding.activation_rules` sets while a step is traced) a `shard_map` gives each device its
rows (batch over data x fsdp) and its heads (tensor): GSPMD cannot split a custom kernel, and this way the kernel
runs per device with no collectives. Without a mesh (one device, a plain `model.apply`) it runs on the whole batch.

Off a TPU the same kernel runs in Pallas interpret mode (`model.splash_interpret=true`): slow, for tests on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

from neox_jax import config as cfg
from neox_jax import sharding, targets
from neox_jax.config import ConfigError


def check_runnable(m, seq_len: int) -> None:
    """One ConfigError naming the field, for a splash call that cannot run here."""
    if targets.target_platform() != "tpu" and not m.splash_interpret:
        raise ConfigError(f"model.attention_impl=splash: the Pallas kernel compiles only for TPU (this step is for "
                          f"{targets.target_platform()}); set model.splash_interpret=true to run it in interpret "
                          f"mode (slow, for tests) or pick another attention_impl")
    problem = cfg.splash_block_problem(m, seq_len)
    if problem:
        raise ConfigError(": ".join(problem))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, m) -> jax.Array:
    """Causal softmax attention of q, k, v [B, T, n, d] through the splash kernel; returns [B, T, n, d]."""
    mesh = jax.sharding.get_abstract_mesh()
    attend = functools.partial(local_attention, m=m, offset=0)
    if mesh.empty:
        return attend(q, k, v)
    spec = sharding.attention_spec(mesh, q.shape[0], q.shape[2])
    return jax.shard_map(attend, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, m, offset: int) -> jax.Array:
    """One device's attention: queries q [b, Tq, n, d] at positions offset .. offset + Tq - 1 over keys k, v
    [b, Tk, n, d] at positions 0 .. Tk - 1 (Tq < Tk under context parallelism), causal."""
    tq, tk, heads, d = q.shape[1], k.shape[1], q.shape[2], q.shape[3]
    check_runnable(m, tq)
    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)  # the kernel does not scale the scores
    block_q, block_kv = cfg.splash_blocks(m, tq)
    sizes = kernel_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv)
    mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((tq, tk), offset=offset)] * heads)
    kernel = kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                        interpret=bool(m.splash_interpret))
    heads_first = [x.swapaxes(1, 2) for x in (q, k, v)]  # [b, n, T, d]
    return jax.vmap(kernel)(*heads_first).swapaxes(1, 2).astype(q.dtype)
