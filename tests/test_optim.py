"""Optimizer pieces against independent references: NeoX's LR formula, DeepSpeed's loss scaler, the decay mask."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from neox_jax import model, optim
from neox_jax.config import default_config
from tiny_configs import tiny_model


def _config(steps=1000, warmup_steps=-1, warmup_fraction=0.01, lr=1e-3, min_lr_ratio=0.1):
    c = default_config()
    c.train.steps = steps
    c.optimizer.update(dict(lr=lr, warmup_steps=warmup_steps, warmup_fraction=warmup_fraction,
                            min_lr_ratio=min_lr_ratio))
    return c


def neox_lr(it, peak, min_lr, warmup, total):
    """NeoX's AnnealingLR, cosine style, as written in neox_reference.md."""
    if warmup > 0 and it <= warmup:
        return peak * max(1, it) / warmup
    n, big_n = min(it - warmup, total - warmup), total - warmup
    return min_lr + (peak - min_lr) / 2 * (math.cos(math.pi * n / big_n) + 1)


@pytest.mark.parametrize("steps,warmup_steps,fraction", [(1000, -1, 0.01), (150_000, -1, 0.01), (200, 30, 0.5)])
def test_schedule_matches_neox_formula(steps, warmup_steps, fraction):
    c = _config(steps, warmup_steps, fraction, lr=0.97e-4)
    warmup = warmup_steps if warmup_steps >= 0 else int(fraction * steps)
    schedule = optim.lr_schedule(c)
    points = {"warmup start": 0, "first": 1, "warmup middle": warmup // 2, "warmup end": warmup,
              "mid-cosine": warmup + (steps - warmup) // 2, "quarter": warmup + (steps - warmup) // 4,
              "end": steps, "past the end": steps + 10}
    for where, it in points.items():
        want = neox_lr(it, 0.97e-4, 0.97e-5, warmup, steps)
        assert float(schedule(it)) == pytest.approx(want, rel=1e-5), where
    assert float(schedule(warmup + (steps - warmup) // 2)) == pytest.approx((0.97e-4 + 0.97e-5) / 2, rel=1e-4)
    assert float(schedule(steps)) == pytest.approx(0.97e-5, rel=1e-5)


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.lr_schedule(_config(100, warmup_steps=0))
    assert float(schedule(0)) == pytest.approx(1e-3)
    assert float(schedule(100)) == pytest.approx(1e-4)


def test_decay_mask_excludes_biases_and_layernorm():
    m = tiny_model()
    mask = optim.decay_mask(jax.tree.map(lambda b: b.value, model.param_shapes(m),
                                         is_leaf=lambda x: hasattr(x, "names")))
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    decayed = {k for k, v in flat.items() if v}
    assert decayed == {"embed_in", "embed_out", "layers/attention/query_key_value/kernel",
                       "layers/attention/dense/kernel", "layers/mlp/dense_h_to_4h/kernel",
                       "layers/mlp/dense_4h_to_h/kernel"}


def test_weight_decay_skips_bias():
    c = _config(100, warmup_steps=0, lr=0.5)
    c.optimizer.weight_decay = 0.1
    tx = optim.make_optimizer(c)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)
    np.testing.assert_allclose(new["dense"]["kernel"], 1.0 - 0.5 * 0.1, rtol=1e-6)


class DeepSpeedScaler:
    """DeepSpeed's DynamicLossScaler.update_scale (consecutive_hysteresis=False), written from its description."""

    def __init__(self, init_scale, window, hysteresis, min_scale):
        self.scale, self.window, self.delayed_shift, self.min_scale = init_scale, window, hysteresis, min_scale
        self.cur_hysteresis, self.cur_iter, self.last_overflow_iter = hysteresis, 0, -1

    def update(self, overflow):
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        elif (self.cur_iter - self.last_overflow_iter) % self.window == 0:
            self.cur_hysteresis = self.delayed_shift
            self.scale *= 2
        self.cur_iter += 1


@pytest.mark.parametrize("hysteresis", [1, 2])
def test_dynamic_loss_scale_follows_deepspeed(hysteresis):
    precision = ml_collections.ConfigDict(dict(loss_scale="dynamic", initial_scale_power=4, loss_scale_window=3,
                                               hysteresis=hysteresis, min_loss_scale=1.0))
    rng = np.random.default_rng(0)
    overflows = list(rng.random(200) < 0.25) + [True] * 40 + [False] * 10
    ref = DeepSpeedScaler(16.0, 3, hysteresis, 1.0)
    state = optim.init_loss_scale(precision)
    update = jax.jit(lambda s, f: optim.update_loss_scale(s, f, precision))
    scales = []
    for i, overflow in enumerate(overflows):
        ref.update(overflow)
        state = update(state, jnp.asarray(not overflow))
        assert float(state.scale) == ref.scale, i
        assert int(state.hysteresis) == ref.cur_hysteresis, i
        scales.append(ref.scale)
    assert min(scales) == 1.0 and scales[-1] > 1.0  # hit the floor, then grew back


def test_paper_settings_and_no_scaling():
    c = default_config()
    c.precision.loss_scale = "dynamic"
    s = optim.init_loss_scale(c.precision)
    assert float(s.scale) == 4096.0 and int(s.hysteresis) == 2
    s = optim.update_loss_scale(s, jnp.asarray(False), c.precision)  # first overflow: hysteresis absorbs it
    assert float(s.scale) == 4096.0 and int(s.hysteresis) == 1
    s = optim.update_loss_scale(s, jnp.asarray(False), c.precision)
    assert float(s.scale) == 2048.0
    c.precision.loss_scale = "none"
    s = optim.init_loss_scale(c.precision)
    for finite in (False, True, False):
        s = optim.update_loss_scale(s, jnp.asarray(finite), c.precision)
    assert float(s.scale) == 1.0
