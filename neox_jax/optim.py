"""The optimizer (AdamW with NeoX's schedule, decay mask and clipping) and dynamic loss scaling.

Both are pure: `make_optimizer(config, schedule)` is an optax transformation, and the loss-scale state is a small
pytree updated by `update_loss_scale(state, finite, precision)` inside the jitted step. Where the
optimizer state lives on the mesh (ZeRO) is decided in `neox_jax.sharding`, not here.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import optax

# LayerNorm and Linear parameter names that NeoX excludes from weight decay.
NO_DECAY_NAMES = ("bias", "scale")


def warmup_steps(config) -> int:
    o = config.optimizer
    return int(o.warmup_steps) if o.warmup_steps >= 0 else int(o.warmup_fraction * config.train.steps)


def lr_schedule(config) -> optax.Schedule:
    """NeoX's AnnealingLR (cosine): lr = peak * max(1, it) / warmup while it < warmup, then
    min + (peak - min) / 2 * (cos(pi * n / N) + 1) with n = it - warmup, N = steps - warmup (n clamped to N)."""
    peak = float(config.optimizer.lr)
    floor = peak * float(config.optimizer.min_lr_ratio)
    warmup = warmup_steps(config)
    decay = max(config.train.steps - warmup, 1)

    def schedule(count):
        it = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.maximum(it, 1.0) / max(warmup, 1)
        n = jnp.clip(it - warmup, 0.0, decay)
        cosine = floor + (peak - floor) / 2.0 * (jnp.cos(jnp.pi * n / decay) + 1.0)
        return jnp.where(it < warmup, warm, cosine)

    return schedule


def decay_mask(params):
    """True where weight decay applies: every parameter except biases and LayerNorm scales/biases."""
    def decays(path, _):
        last = path[-1]
        return getattr(last, "key", getattr(last, "name", None)) not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the NeoX schedule (default: `lr_schedule(config)`; the schedule's step
    is the optimizer's own count, so steps skipped for non-finite gradients do not advance it, as in DeepSpeed)."""
    o = config.optimizer
    adamw = optax.adamw(schedule or lr_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                        mask=decay_mask)
    if o.grad_clip and o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


# ---- dynamic loss scaling (DeepSpeed / NeoX semantics) -------------------------------------------------

@flax.struct.dataclass
class LossScale:
    scale: jax.Array  # f32: the loss is multiplied by this before differentiation
    good_steps: jax.Array  # i32: finite steps since the last overflow
    hysteresis: jax.Array  # i32: overflows still tolerated before the scale is cut


def init_loss_scale(precision) -> LossScale:
    dynamic = precision.loss_scale == "dynamic"
    scale = 2.0 ** precision.initial_scale_power if dynamic else 1.0
    return LossScale(scale=jnp.asarray(scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                     hysteresis=jnp.asarray(precision.hysteresis, jnp.int32))


def update_loss_scale(state: LossScale, finite: jax.Array, precision) -> LossScale:
    """One step of DeepSpeed's DynamicLossScaler (consecutive_hysteresis off).

    Overflow: if only one overflow is left in the hysteresis budget, halve the scale (not below the minimum),
    else spend one. Finite step: every `loss_scale_window` finite steps since the last overflow, double the
    scale and refill the hysteresis budget. With loss_scale "none" the state never changes."""
    if precision.loss_scale != "dynamic":
        return state
    overflow = jnp.logical_not(finite)
    cut = overflow & (state.hysteresis <= 1)
    scale = jnp.where(cut, jnp.maximum(state.scale / 2.0, precision.min_loss_scale), state.scale)
    hysteresis = jnp.where(overflow, jnp.maximum(state.hysteresis - 1, 1), state.hysteresis)
    good = jnp.where(overflow, 0, state.good_steps + 1)
    grow = finite & (good % precision.loss_scale_window == 0)
    scale = jnp.where(grow, scale * 2.0, scale)
    hysteresis = jnp.where(grow, jnp.int32(precision.hysteresis), hysteresis)
    return LossScale(scale=scale, good_steps=good.astype(jnp.int32), hysteresis=hysteresis.astype(jnp.int32))
