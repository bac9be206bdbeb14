"""Measured ceilings of the local device: dense bf16 matmul rate and memory bandwidth."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from neox_jax.bench import timing


def _time(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    jax.block_until_ready(fn(*args))
    return timing.best_window(lambda: fn(*args), jax.block_until_ready, steps=iters, windows=3)


def matmul_tflops(n: int | None = None, dtype=jnp.bfloat16, iters: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul on random data (8192 on accelerators, 1024 on CPU)."""
    n = n or (8192 if jax.default_backend() != "cpu" else 1024)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    dt = _time(jax.jit(lambda x, y: x @ y), a, b, iters=iters)
    return 2 * n**3 / dt / 1e12


def memory_bandwidth_gbs(n_bytes: int | None = None, iters: int = 20) -> float:
    """GB/s of reading a large array: the faster of a sum over it and a matrix-vector product with it (what a
    decode step does to every weight). That read rate bounds decoding, which reads every weight once per step.
    fp32, because a CPU without bf16 arithmetic converts bf16 slower than it reads it (8.9 GB/s for bf16 against
    14.7 for fp32 on this project's 2-core EPYC): a conversion rate taken for the memory's made decode "beat" the
    roofline. Accelerators read both at the same rate."""
    n_bytes = n_bytes or (4 * 2**30 if jax.default_backend() != "cpu" else 2**28)
    w = jnp.ones((n_bytes // 4 // 8192, 8192), jnp.float32)
    summed = _time(jax.jit(jnp.sum), w, iters=iters)
    gemv = _time(jax.jit(jnp.dot), w, jnp.ones((8192,), jnp.float32), iters=iters)
    return w.nbytes / min(summed, gemv) / 1e9
