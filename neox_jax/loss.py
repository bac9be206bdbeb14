"""The training loss: mean next-token cross-entropy in fp32, whole or with the output head sliced.

`next_token_loss(net, params, tokens)` is what the train and eval steps differentiate. With
`train.loss_chunks` > 1 the head and the loss run one sequence slice at a time through `chunked_head_loss`, a
custom VJP that forms the hidden-state and `embed_out` gradients in the same pass as the loss, so the fp32
[batch, seq, vocab] logits never exist whole and nothing is recomputed.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from neox_jax import model as model_lib


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over every position, in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def next_token_loss(net, params, tokens, loss_chunks: int = 1, batch_shards: int = 1) -> jax.Array:
    """Mean next-token cross-entropy of tokens [B, S+1]. With `loss_chunks` > 1 the output head and the loss run
    one 1/loss_chunks slice of the sequence at a time (see `chunked_head_loss`; `batch_shards` is the number of
    pieces the batch is split into on the mesh)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if loss_chunks <= 1:
        return cross_entropy(net.apply({"params": params}, inputs), targets)
    hidden, _ = net.apply({"params": params}, inputs, method="hidden")
    return chunked_head_loss(hidden, params["embed_out"], targets, loss_chunks, batch_shards)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_head_loss(hidden, embed_out, targets, chunks: int, batch_shards: int):
    """Mean cross-entropy of the logits `hidden @ embed_out` [B, S, V] against targets [B, S], computed one
    sequence slice [B, S/chunks, V] at a time, so the fp32 logits never exist for the whole batch.

    Differentiated, each slice's logit gradient (softmax - onehot) is turned into the hidden and embed_out
    gradients in the same pass as its loss: no second pass over (or recomputation of) the logits, and the
    per-slice hidden gradients plus one fp32 embed_out gradient are all the backward pass keeps. The embed_out
    gradient (and the loss) are summed per batch shard ([batch_shards, H, V], split like the batch) and over
    shards once at the end, so data parallelism adds no communication per slice."""
    return _head_loss_pass(hidden, embed_out, targets, chunks, batch_shards, with_grads=False)[0]


def _head_loss_pass(hidden, embed_out, targets, chunks, shards, with_grads):
    b, s, h = hidden.shape
    n = b * s
    xs = hidden.reshape(b, chunks, s // chunks, h).swapaxes(0, 1)
    ys = targets.reshape(b, chunks, s // chunks).swapaxes(0, 1)
    # Sums kept per batch shard (a leading dim split like the batch), so the loop itself never communicates.
    per_shard = functools.partial(nn.with_logical_constraint, logical_axis_resources=("batch", None, "vocab"))
    shard_sums = lambda a: nn.with_logical_constraint(a.reshape(shards, -1).sum(-1), ("batch",))  # noqa: E731

    def chunk(carry, xy):
        total, dw = carry
        x, y = xy
        logits, vjp = jax.vjp(lambda x: model_lib.head_logits(x, embed_out), x)
        lse = jax.nn.logsumexp(logits, axis=-1)
        label = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        total = total + shard_sums(lse - label)
        if not with_grads:
            return (total, dw), None
        dlogits = (jnp.exp(logits - lse[..., None]) - jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)) / n
        (dx,) = vjp(dlogits)
        return (total, dw + per_shard(_rows_outer(x, dlogits.astype(x.dtype), shards))), dx

    dw0 = per_shard(jnp.zeros((shards, *embed_out.shape), jnp.float32)) if with_grads else jnp.zeros(())
    (total, dw), dxs = jax.lax.scan(chunk, (jnp.zeros((shards,), jnp.float32), dw0), (xs, ys))
    loss = total.sum() / n
    if not with_grads:
        return loss, None
    return loss, (dxs.swapaxes(0, 1).reshape(hidden.shape), dw.sum(0).astype(embed_out.dtype))


def _rows_outer(x, y, shards: int):
    """sum over rows of x[r] (outer) y[r], separately for each of `shards` equal row blocks: [shards, X, Y]."""
    x, y = x.reshape(shards, -1, x.shape[-1]), y.reshape(shards, -1, y.shape[-1])
    if shards == 1:  # a plain 2-D matmul: XLA:CPU runs batched einsums markedly slower
        return jnp.dot(x[0].T, y[0], preferred_element_type=jnp.float32)[None]
    return jnp.einsum("drx,dry->dxy", x, y, preferred_element_type=jnp.float32)


def _chunked_head_loss_fwd(hidden, embed_out, targets, chunks, shards):
    return _head_loss_pass(hidden, embed_out, targets, chunks, shards, with_grads=True)


def _chunked_head_loss_bwd(chunks, shards, grads, g):
    dx, dw = grads
    return dx * g.astype(dx.dtype), dw * g, None


chunked_head_loss.defvjp(_chunked_head_loss_fwd, _chunked_head_loss_bwd)
