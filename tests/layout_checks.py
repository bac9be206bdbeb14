"""Helpers shared by the layout-equivalence tests (train step, pipeline): the same steps on any mesh."""

import numpy as np

from neox_jax import setup, sharding, train

STEPS = 3


def build(config, devices=None):
    """The RunSetup of `config` on a mesh over `devices` (default: all)."""
    return setup.build(config, sharding.make_mesh(config, devices))


def batches(n, vocab=500, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, (16, 17), dtype=np.int32) for _ in range(n)]


def run_steps(run, state, steps=STEPS):
    """`steps` compiled train steps of the RunSetup `run` on fixed batches: (the jitted step, final state, losses)."""
    step = train.make_train_step(run)
    losses = []
    for tokens in batches(steps):
        state, metrics = step(state, sharding.global_batch({"tokens": tokens}, run.mesh))
        losses.append(float(metrics["loss"]))
    return step, state, losses


def comparable(params):
    """Drop the key bias: softmax is shift-invariant, so its gradient is exactly zero in theory and rounding
    noise in practice, which Adam turns into lr-sized steps of arbitrary sign on any layout."""
    qkv_bias = params["layers"]["attention"]["query_key_value"]["bias"]
    params["layers"]["attention"]["query_key_value"]["bias"] = np.delete(np.asarray(qkv_bias), 1, axis=2)
    return params


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
