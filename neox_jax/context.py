"""Context parallelism: every sequence split over the mesh's `context` axis, for sequences too long for one
device's memory.

The logical rules split the activations' `length` dim over `context`, so every token-wise op (embedding,
LayerNorm, the projections, the MLP, the loss) runs on T / C tokens per device with no communication. Attention is
the one op that mixes tokens: inside a `shard_map` each device all-gathers K and V over the context axis (the
backward reduce-scatters their gradients) and attends with its own T / C queries, at positions c T / C ..
(c + 1) T / C - 1, to all T keys, causally.

All-gathered K/V rather than ring attention: GPT-NeoX's heads are full multi-head (K and V are as large as Q),
and at the lengths a context axis is for (8k-128k tokens) one layer's gathered K/V is 2 x T x H x 2 bytes
(0.8 GB for 6,144 wide at 32k), while the scores, which ring attention would also avoid holding, are never held
whole anyway (splash; XLA holds T / C x T per head). The gather is one collective per layer that XLA can overlap
with the q/k/v projections; a ring is C steps each waiting for the previous one's permute. What it gives up is
causal load balance: with splash, which skips the blocks above the diagonal, device c computes c + 1/2 of C
query blocks' worth, so the last device of the axis works about 2C / (C + 1) times the average. XLA attention
computes every block and is balanced. A zigzag order (device c holding chunks c and 2C - 1 - c) would balance
splash; it is not built.
"""

from __future__ import annotations

from typing import Callable

import jax

from neox_jax import sharding
from neox_jax.sharding import CONTEXT_AXIS


def in_mesh() -> int:
    """The context axis's size in the mesh a step is traced under (1 when there is none)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or CONTEXT_AXIS not in mesh.axis_names else int(mesh.shape[CONTEXT_AXIS])


def causal_attention(q, k, v, attend: Callable) -> jax.Array:
    """Causal attention of q, k, v [B, T, n, d] with T split over the context axis. `attend(q, k, v, index)`
    computes one device's [b, T/C, n, d] queries against all [b, T, n, d] keys, its queries being chunk `index`
    (a traced integer) of the sequence."""
    mesh = jax.sharding.get_abstract_mesh()
    spec = sharding.attention_spec(mesh, q.shape[0], q.shape[2], CONTEXT_AXIS)

    def local(q, k, v):
        k, v = (jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True) for x in (k, v))
        return attend(q, k, v, jax.lax.axis_index(CONTEXT_AXIS))

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)
