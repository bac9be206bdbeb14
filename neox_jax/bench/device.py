"""Measured ceilings of the local device: dense bf16 matmul rate and memory bandwidth."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def matmul_tflops(n: int | None = None, dtype=jnp.bfloat16, iters: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul on random data (8192 on accelerators, 1024 on CPU)."""
    n = n or (8192 if jax.default_backend() != "cpu" else 1024)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    dt = _time(jax.jit(lambda x, y: x @ y), a, b, iters=iters)
    return 2 * n**3 / dt / 1e12


def memory_bandwidth_gbs(n_bytes: int | None = None, iters: int = 20) -> float:
    """GB/s of reading a large array (a sum over it): the rate that bounds decoding, which reads every weight
    once per step."""
    n_bytes = n_bytes or (4 * 2**30 if jax.default_backend() != "cpu" else 2**28)
    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    dt = _time(jax.jit(lambda v: jnp.sum(v, dtype=jnp.float32)), x, iters=iters)
    return n_bytes / dt / 1e9
