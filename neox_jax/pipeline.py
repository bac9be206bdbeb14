"""Pipeline parallelism over the `stage` mesh axis: a GPipe schedule written as a vmapped stage dimension.

The block params stay stacked [L, ...] as in every other layout (same checkpoints, same optimizer state); the
logical rules split their `layers` dim over `stage`, so stage s holds layers s*L/S .. (s+1)*L/S - 1 and the
[S, L/S, ...] view taken here is a free reshape. The residual stream of the stages is one [S, mb, T, H]
buffer, slot s on stage s. Each tick, every stage applies its layers to its slot (one `jax.vmap` over the
stage dim with `spmd_axis_name="stage"`, which GSPMD runs as S concurrent stages), then the buffer rotates one
slot (`jnp.roll` on the stage-sharded dim: a collective-permute) and stage 0 takes the next micro-batch.
M micro-batches take M + S - 1 ticks; the S - 1 extra ones are the bubble. Autodiff of that scan is the
GPipe backward: all forwards, then all backwards in reverse tick order, the stage-to-stage cotangents
rotating the other way.

Stage 0 embeds each micro-batch as it enters (a gather). The final LayerNorm, head and loss run after the
pipeline, one round of S micro-batches at a time with micro-batch s of the round on stage s, so every device
shares the head's work instead of the last stage computing all logits. With any `model.remat_policy` each stage's tick is checkpointed too,
keeping one [mb, T, H] input per stage per tick; the policy still applies layer by layer inside.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from neox_jax import model as model_lib
from neox_jax import sharding
from neox_jax.sharding import BATCH_AXES, STAGE_AXIS


def stage_view(layer_params, stages: int):
    """[L, ...] -> [S, L/S, ...]: row s holds the contiguous layers of stage s."""
    return jax.tree.map(lambda p: p.reshape(stages, p.shape[0] // stages, *p.shape[1:]), layer_params)


def run_stages(m, layer_params, micro_ids, embed: Callable, mesh: Mesh):
    """The block stack over micro-batches: ids [M, mb, T] -> last-layer outputs [M, mb, T, H]; stage 0
    embeds each micro-batch (`embed(ids) -> [mb, T, H]`) as it enters, so no embedded copy waits in memory."""
    stages = sharding.num_stages(mesh)
    params = stage_view(layer_params, stages)
    body = model_lib.LayerStack(m, m.num_layers // stages)

    def stage(p, x):
        return body.apply({"params": {"layers": p}}, x)

    if m.remat_policy != "none":
        stage = jax.checkpoint(stage, prevent_cse=False)  # the tick scan already keeps recomputation apart
    all_stages = jax.vmap(stage, spmd_axis_name=STAGE_AXIS)
    buffer = NamedSharding(mesh, P(STAGE_AXIS, BATCH_AXES))
    is_first = (jnp.arange(stages) == 0).reshape(stages, 1, 1, 1)

    def tick(previous, ids):
        # stage s takes what stage s-1 produced last tick; stage 0 takes the next micro-batch
        x = jnp.where(is_first, embed(ids)[None], jnp.roll(previous, 1, axis=0))
        out = all_stages(params, jax.lax.with_sharding_constraint(x, buffer))
        return out, out[-1]

    drain = jnp.zeros((stages - 1, *micro_ids.shape[1:]), micro_ids.dtype)  # fed while the last ones finish
    shape = (stages, *micro_ids.shape[1:], m.hidden_size)
    start = jax.lax.with_sharding_constraint(jnp.zeros(shape, jnp.dtype(m.dtype)), buffer)
    _, last = jax.lax.scan(tick, start, jnp.concatenate([micro_ids, drain]))
    return last[stages - 1:]  # the last stage's output at tick t belongs to micro-batch t - (S - 1)


def loss_sum(net, params, micro_tokens, mesh: Mesh, loss_fn: Callable) -> jax.Array:
    """Sum over micro-batches of `loss_fn(logits, targets)` (a per-token mean) through the pipeline.

    micro_tokens: int [M, mb, T + 1] with M a multiple of the stage count (config.check_pipeline)."""
    m, stages = net.config, sharding.num_stages(mesh)
    ids, targets = micro_tokens[..., :-1], micro_tokens[..., 1:]
    hidden = run_stages(m, params["layers"], ids, lambda i: net.apply({"params": params}, i, method="embed"), mesh)

    # Head and loss one round of S micro-batches at a time, micro-batch s of the round on stage s.
    rounds = (hidden.shape[0] // stages, stages)
    per_stage = NamedSharding(mesh, P(None, STAGE_AXIS, BATCH_AXES))
    hidden = jax.lax.with_sharding_constraint(hidden.reshape(*rounds, *hidden.shape[1:]), per_stage)
    targets = jax.lax.with_sharding_constraint(targets.reshape(*rounds, *targets.shape[1:]), per_stage)

    def micro_loss(h, t):
        return loss_fn(net.apply({"params": params}, h, method="head"), t)

    @jax.checkpoint  # keep only the round's hidden states for the backward, not its logits
    def round_loss(total, xs):
        return total + jax.vmap(micro_loss, spmd_axis_name=STAGE_AXIS)(*xs).sum(), None

    total, _ = jax.lax.scan(round_loss, jnp.zeros((), jnp.float32), (hidden, targets))
    return total
