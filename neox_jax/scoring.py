"""Log-likelihoods of many (context, continuation) pairs, computed in packed rows without padding.

Each request is scored as lm-eval's `hf` backend scores it: the tokens `(context + continuation)[-(L+1):]`
(L = max_length) at positions 0.., and log p of each continuation token under a log-softmax over the whole
(padded) vocabulary, plus whether each is the argmax. What differs is how the work is laid out:

- **Shared contexts, as a prefix tree.** Requests whose (truncated) contexts are equal form a group: the
  context is laid out once and the continuations after it as a prefix tree (continuations that begin alike share
  those tokens too), each token attending to its ancestors alone, at the rotary position of its depth. The
  context's keys and values are computed once and read by every continuation, exactly what scoring each
  continuation from the context's KV cache computes, in the same forward pass (one compiled shape, no cache
  copied per continuation). A continuation's first token is predicted from the context's last position, so a
  one-token continuation adds no position at all: a multiple-choice question costs its context plus the distinct
  tokens of its endings.
- **Packing.** Groups are packed into rows of a few lengths (`row_length` x 2^k, the last one max_length), a row
  at a time: the largest group left opens a row, the subset of the others that fills it best joins it (`pack`).
  Groups sit on the row's block diagonal (attention never crosses them), each with positions from 0, so only
  the few tokens a row cannot fill are padding. A call holds about `rows` x `row_length` tokens whatever its row
  length; the last call of a length takes the smallest power-of-two number of rows that holds what is left.
- **The head only where it is needed.** The body (embedding, layers, final LayerNorm) runs on the rows; the
  output head runs on the distinct positions that predict a continuation token alone, gathered in chunks of
  HEAD_CHUNKS sizes (split over the devices as the rows are), and scores every target read at a position from
  one logsumexp and one argmax. At Pythia-70m's shape the 50,304-wide head costs more than a position's layers, and a LAMBADA request scores 1-2
  of its ~80 positions.

Compiled shapes, per row length used: the body at `rows` rows and at the power-of-two row counts the last calls
take (at most 1 + log2(rows), in practice 1-3); the head at each of the 4 chunk sizes; a small gather per (body
shape, chunk size). Per head position two numbers come back to the host (logsumexp, argmax) and one per target;
a request's log-likelihood is summed there in float64.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import model as model_lib

ROW_LENGTH = 256
HEAD_CHUNKS = (64, 128, 256, 512)
TARGETS_PER_POSITION = 2  # target slots per head position in a chunk (a position may predict several targets)


@dataclasses.dataclass
class Stats:
    """What a scorer computed. `tokens`: positions the requests need one by one (what per-request scoring
    without padding runs); `distinct`: positions holding a token here (shared prefixes counted once);
    `positions`: positions the body ran, padding included; `scored` / `head_positions`: distinct positions
    whose prediction is scored / positions the head ran on (chunk padding included)."""

    requests: int = 0
    tokens: int = 0
    distinct: int = 0
    positions: int = 0
    scored: int = 0
    head_positions: int = 0
    calls: int = 0
    body_shapes: set = dataclasses.field(default_factory=set)

    @property
    def padding_overhead(self) -> float:
        """Positions computed per token laid out (1.0: no padding at all)."""
        return self.positions / max(self.distinct, 1)


class _Group:
    """A context and the prefix tree of its continuations: node i (a row slot) holds tokens[i] at position
    depth[i]; nodes are added in runs that each continue the previous node, `chains` (start, end, parent of start),
    so every node comes after its ancestors."""

    def __init__(self, context: tuple[int, ...]):
        self.context = context
        self.tokens, self.depth = list(context), list(range(len(context)))
        self.chains = [(0, len(context), -1)]
        self.children: dict[tuple[int, int], int] = {}
        self.targets: dict[tuple[int, int], int] = {}  # (node, target token) -> pair id (global)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def new_nodes(self, continuation: Sequence[int]) -> int:
        """Nodes inserting `continuation` would add."""
        node = len(self.context) - 1
        for k, token in enumerate(continuation[:-1]):
            node = self.children.get((node, token))
            if node is None:
                return len(continuation) - 1 - k
        return 0

    def insert(self, continuation: Sequence[int], pairs: list) -> list[int]:
        """The pair ids scoring `continuation` (new pairs appended to `pairs` as (group, node, target))."""
        node, ids, start = len(self.context) - 1, [], None
        for k, target in enumerate(continuation):
            key = (node, target)
            if key not in self.targets:
                self.targets[key] = len(pairs)
                pairs.append((self, node, target))
            ids.append(self.targets[key])
            if k == len(continuation) - 1:
                break
            child = self.children.get(key)
            if child is None:
                child = self.children[key] = len(self.tokens)
                self.tokens.append(target)
                self.depth.append(self.depth[node] + 1)
                if start is None:
                    start = (child, node)
            node = child
        if start is not None:
            self.chains.append((start[0], len(self.tokens), start[1]))
        return ids

    def mask(self) -> np.ndarray:
        """[size, size]: node i may attend to node j iff j is i or an ancestor of i."""
        n = self.size
        m = np.zeros((n, n), bool)
        for s, e, parent in self.chains:
            if parent >= 0:
                m[s:e, :s] = m[parent, :s]
            m[s:e, s:e] = np.tri(e - s, dtype=bool)
        return m


def check_pair(context: Sequence[int], continuation: Sequence[int], max_length: int) -> None:
    if not context or not continuation or len(continuation) > max_length:
        raise ValueError(f"cannot score context of {len(context)} / continuation of {len(continuation)} tokens "
                         f"(both must be non-empty, the continuation at most max_length={max_length})")


def input_length(context: Sequence[int], continuation: Sequence[int], max_length: int) -> int:
    """Positions a request needs on its own: its tokens after left truncation to max_length + 1, less the last."""
    return min(len(context) + len(continuation), max_length + 1) - 1


def group_requests(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                   size_limit: int) -> tuple[list[_Group], list[tuple], list[list[int]]]:
    """Groups of equal truncated contexts (none over `size_limit` nodes), the scored (group, node, target)
    pairs, and each request's pair ids in token order."""
    groups: list[_Group] = []
    open_group: dict[tuple[int, ...], _Group] = {}
    scored: list[tuple] = []
    requests = []
    for context, continuation in pairs:
        check_pair(context, continuation, max_length)
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        ctx, cont = tuple(whole[:-len(continuation)]), tuple(continuation)
        g = open_group.get(ctx)
        if g is None or g.size + g.new_nodes(cont) > size_limit:
            g = open_group[ctx] = _Group(ctx)
            groups.append(g)
        requests.append(g.insert(cont, scored))
    return groups, scored, requests


def row_lengths(max_length: int, row_length: int = ROW_LENGTH) -> list[int]:
    """row_length, 2 x row_length, ... and max_length last (one length when max_length <= row_length)."""
    lengths, r = [], row_length
    while r < max_length:
        lengths.append(r)
        r *= 2
    return lengths + [max_length]


def pack(sizes: Sequence[int], lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Rows (length, item indices), one row at a time (minimum bin slack): the largest item left opens a row of the
    shortest length that holds it, and the subset of the items left that fills the rest of it best joins it.

    The subset is a bounded subset-sum over the distinct sizes left, as bit sets (bit t: a subset sums to t).
    Best-fit decreasing, placing items largest first into the fullest row with room, left each row a gap just
    under the smallest size (LAMBADA's 61-163-token requests in rows of 512: 50 rows where 48 hold them all)."""
    left: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        left.setdefault(size, []).append(i)
    rows = []
    while left:
        biggest = max(left)
        length = next(n for n in lengths if n >= biggest)
        items = [_take(left, biggest)]
        room = length - biggest
        candidates = sorted(size for size in left if size <= room)
        everything = (1 << (room + 1)) - 1
        reach = [1]  # reach[k]: sums of subsets of candidates[:k]
        for size in candidates:
            shifted = done = reach[-1]
            for _ in range(min(len(left[size]), room // size)):
                shifted = (shifted << size) & everything
                done |= shifted
            reach.append(done)
        total = reach[-1].bit_length() - 1
        for k in range(len(candidates) - 1, -1, -1):
            size, copies = candidates[k], 0
            while not (reach[k] >> (total - copies * size)) & 1:
                copies += 1
            items += [_take(left, size) for _ in range(copies)]
            total -= copies * size
        rows.append((length, items))
    return rows


def _take(left: dict[int, list[int]], size: int) -> int:
    item = left[size].pop()
    if not left[size]:
        del left[size]
    return item


def calls_of(row_count: int, full: int, split: int) -> list[int]:
    """Rows per call: calls of `full` rows, then the smallest power-of-two multiple of `split` that holds the rest
    (so the shapes a run compiles come from a small fixed set)."""
    counts = [full] * (row_count // full)
    rest = row_count % full
    if rest:
        n = split
        while n < rest:
            n *= 2
        counts.append(min(n, full))
    return counts


# ---- the compiled pieces ------------------------------------------------------------------------------------

def packed_hidden(m, params, ids, positions, mask):
    """Final hidden states [B, T, H] of rows whose attention is `mask` [B, T, T] (query, key)."""
    net = model_lib.for_params(m, params)
    x, _ = net.apply({"params": params}, ids, positions=positions, attention_mask=mask[:, None], method="hidden")
    return x


def gather_positions(hidden, index):
    x = jnp.take(hidden.reshape(-1, hidden.shape[-1]), index, axis=0)
    # Split the positions over the batch axes as the rows are: left to XLA, the gathered positions come out
    # replicated and every device runs the whole head on them (8 simulated devices: 7x the head's CPU time).
    return nn.with_logical_constraint(x, ("batch", "embed"))


def first_argmax(logits, block: int = 128):
    """jnp.argmax over the last axis (the first index of the maximum), in two max-reductions over blocks:
    XLA:CPU's fused max is ~30x faster than its arg-reduction at the head's width."""
    c, v = logits.shape
    if v % block:
        return jnp.argmax(logits, axis=-1)
    blocks = logits.reshape(c, v // block, block)
    b = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)  # the first block holding the maximum
    inside = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]
    return (b * block + jnp.argmax(inside, axis=-1)).astype(jnp.int32)


def score_hidden(params, x, slots, targets):
    """For hidden states x [C, H]: logsumexp [C] and argmax [C] of the fp32 logits, and the logits of
    `targets` [K] at rows `slots` [K]."""
    logits = model_lib.head_logits(x, params["embed_out"])
    flat = slots * logits.shape[-1] + targets
    return jax.nn.logsumexp(logits, axis=-1), first_argmax(logits), jnp.take(logits.reshape(-1), flat)


class Scorer:
    """Scores (context, continuation) pairs for one model. A call is `rows` rows of `row_length` tokens (fewer,
    longer rows for longer requests), in multiples of `split` rows; `put` places a call's arrays (e.g. split over
    a mesh) and `context()` is what the steps are traced under."""

    def __init__(self, m, params, *, max_length: int, rows: int, row_length: int = ROW_LENGTH, split: int = 1,
                 put: Callable = lambda x: x, context: Callable = contextlib.nullcontext):
        self.m, self.params, self.max_length = m, params, max_length
        self.rows, self.row_length, self.split = rows, min(row_length, max_length), split
        self.put, self.context = put, context
        self.lengths = row_lengths(max_length, self.row_length)
        self.stats = Stats()
        self._body = jax.jit(functools.partial(packed_hidden, m))
        self._gather = jax.jit(gather_positions)
        self._head = jax.jit(score_hidden)

    def rows_per_call(self, length: int) -> int:
        return max(self.split, self.rows * self.row_length // length // self.split * self.split)

    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
              progress: Callable[[int], None] = lambda n: None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), continuation is greedy) for each pair, in order."""
        if not pairs:
            return []
        groups, scored, requests = group_requests(pairs, self.max_length, self.lengths[-1])
        logp, greedy = np.zeros(len(scored)), np.zeros(len(scored), bool)
        members = {}
        for ids in requests:
            g = scored[ids[0]][0]
            members[id(g)] = members.get(id(g), 0) + 1
        st = self.stats
        st.requests += len(pairs)
        st.tokens += sum(input_length(c, x, self.max_length) for c, x in pairs)
        rows = pack([g.size for g in groups], self.lengths)
        by_node: dict[int, dict[int, list[tuple[int, int]]]] = {}  # group -> node -> [(target, pair id)]
        for pair_id, (g, node, target) in enumerate(scored):
            by_node.setdefault(id(g), {}).setdefault(node, []).append((target, pair_id))
        pending = []
        for length in self.lengths:
            of_length = [[groups[i] for i in items] for n, items in rows if n == length]
            start = 0
            for count in calls_of(len(of_length), self.rows_per_call(length), self.split):
                call_rows = of_length[start:start + count]
                start += count
                done = sum(members[id(g)] for row in call_rows for g in row)
                pending.append((self._run(*self._layout(call_rows, count, length, by_node)), done))
                if len(pending) > 1:  # fetch one call behind, so the host lays out the next call meanwhile
                    self._collect(pending.pop(0), logp, greedy, progress)
        for call in pending:
            self._collect(call, logp, greedy, progress)
        return [(float(sum(logp[i] for i in ids)), bool(all(greedy[i] for i in ids))) for ids in requests]

    def _layout(self, call_rows, count, length, by_node):
        ids, positions = np.zeros((count, length), np.int32), np.zeros((count, length), np.int32)
        mask = np.broadcast_to(np.eye(length, dtype=bool), (count, length, length)).copy()  # padding sees itself
        flat, targets = [], []  # per scored position: its flat index; its [(target, pair id)]
        cap = HEAD_CHUNKS[-1] * TARGETS_PER_POSITION
        distinct = 0
        for r, row in enumerate(call_rows):
            at = 0
            for g in row:
                n = g.size
                ids[r, at:at + n], positions[r, at:at + n] = g.tokens, g.depth
                mask[r, at:at + n, at:at + n] = g.mask()
                for node, node_targets in by_node[id(g)].items():
                    for i in range(0, len(node_targets), cap):  # a position predicting more than a chunk holds
                        flat.append(r * length + at + node)
                        targets.append(node_targets[i:i + cap])
                at += n
            distinct += at
        st = self.stats
        st.distinct, st.positions, st.scored, st.calls = (st.distinct + distinct, st.positions + count * length,
                                                          st.scored + len(flat), st.calls + 1)
        st.body_shapes.add((count, length))
        return (ids, positions, mask), flat, targets

    def _run(self, arrays, flat, targets):
        """Dispatch the body and the head chunks (asynchronously); returns what _collect needs."""
        chunks = []
        with self.context():
            hidden = self._body(self.params, *self.put(arrays))
            start = 0
            while start < len(flat):
                size, n = self._chunk(targets, start)
                index, slots, tgt = np.zeros(size, np.int32), [], []
                index[:n] = flat[start:start + n]
                pair_ids = []
                for slot, node_targets in enumerate(targets[start:start + n]):
                    for target, pair_id in node_targets:
                        slots.append(slot)
                        tgt.append(target)
                        pair_ids.append(pair_id)
                k = size * TARGETS_PER_POSITION
                slots_a, tgt_a = np.zeros(k, np.int32), np.zeros(k, np.int32)
                slots_a[:len(slots)], tgt_a[:len(tgt)] = slots, tgt
                out = self._head(self.params, self._gather(hidden, index), slots_a, tgt_a)
                chunks.append((out, np.asarray(slots, np.int64), np.asarray(tgt), np.asarray(pair_ids, np.int64)))
                self.stats.head_positions += size
                start += n
        return chunks

    @staticmethod
    def _chunk(targets, start) -> tuple[int, int]:
        """(chunk size, positions in it) for the positions from `start`: as many as fit HEAD_CHUNKS[-1] positions
        and their target slots, in the smallest chunk size that holds them."""
        biggest, n, k = HEAD_CHUNKS[-1], 0, 0
        while start + n < len(targets) and n < biggest and k + len(targets[start + n]) <= biggest * TARGETS_PER_POSITION:
            k += len(targets[start + n])
            n += 1
        size = next(c for c in HEAD_CHUNKS if c >= n and c * TARGETS_PER_POSITION >= k)
        return size, n

    @staticmethod
    def _collect(call, logp, greedy, progress):
        chunks, done = call
        values = jax.device_get([out for out, *_ in chunks])
        for (lse, argmax, target_logits), (_, slots, tgt, pair_ids) in zip(values, chunks):
            k = len(pair_ids)
            logp[pair_ids] = np.asarray(target_logits[:k], np.float64) - np.asarray(lse, np.float64)[slots]
            greedy[pair_ids] = np.asarray(argmax)[slots] == tgt
        progress(done)
