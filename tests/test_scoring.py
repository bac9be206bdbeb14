"""The packed-row layout of neox_jax.scoring, checked against what each request needs on its own (the scores
themselves are held to lm-eval's hf backend in test_evaluate.py)."""

import numpy as np
import pytest

from neox_jax import scoring


def random_pairs(rng, n, shared=3):
    """Requests in groups of `shared` continuations per context: some one token long, some repeated, some
    prefixes of others, some contexts longer than max_length."""
    tok = lambda k: rng.integers(1, 1000, k).tolist()  # noqa: E731
    pairs = []
    for _ in range(n):
        context = tok(int(rng.choice([1, 5, 40, 90])))
        cont = tok(int(rng.integers(1, 12)))
        pairs += [(context, cont), (context, cont[:1]), (context, cont[:max(1, len(cont) // 2)])][:shared]
        pairs.append((context, tok(int(rng.integers(1, 6)))))
    return pairs


def test_each_request_sees_exactly_its_own_tokens():
    """Following the mask from a request's last input position back gives its truncated input tokens at
    positions 0.. in order, and its pairs score its continuation's tokens from positions on that path."""
    max_length = 64
    pairs = random_pairs(np.random.default_rng(0), 60) + [([7] * 100, [8] * 64), ([9], [10])]
    groups, scored, requests = scoring.group_requests(pairs, max_length, size_limit=max_length)
    assert sum(g.size for g in groups) < sum(min(len(c) + len(x), max_length + 1) - 1 for c, x in pairs)
    masks = {id(g): g.mask() for g in groups}
    for (context, cont), ids in zip(pairs, requests):
        whole = (context + cont)[-(max_length + 1):]
        group = scored[ids[0]][0]
        assert all(scored[i][0] is group for i in ids) and group.size <= max_length
        last = scored[ids[-1]][1]
        path = np.flatnonzero(masks[id(group)][last])
        assert [group.tokens[j] for j in path] == whole[:-1]
        assert [group.depth[j] for j in path] == list(range(len(whole) - 1))
        assert [scored[i][2] for i in ids] == cont
        assert [scored[i][1] for i in ids] == list(path[len(path) - len(cont):])


def test_pack_fills_rows_to_near_the_lower_bound():
    rng = np.random.default_rng(1)
    sizes = rng.integers(61, 164, 300).tolist() + [300, 600, 1]  # LAMBADA-like, plus ones that need longer rows
    lengths = scoring.row_lengths(2048, 256)
    assert lengths == [256, 512, 1024, 2048]
    rows = scoring.pack(sizes, lengths)
    assert sorted(i for _, items in rows for i in items) == list(range(len(sizes)))
    for length, items in rows:
        assert sum(sizes[i] for i in items) <= length
        assert length == min(n for n in lengths if n >= max(sizes[i] for i in items))
    short = [sum(sizes[i] for i in items) for length, items in rows if length == 256]
    assert len(short) <= -(-sum(s for s in sizes if s <= 256) // 256) + 1
    assert scoring.row_lengths(64, 256) == [64] and scoring.row_lengths(512, 256) == [256, 512]


@pytest.mark.parametrize("rows,full,split", [(0, 16, 1), (16, 16, 1), (37, 16, 1), (3, 16, 8), (19, 8, 8)])
def test_calls_hold_every_row_with_a_small_set_of_shapes(rows, full, split):
    counts = scoring.calls_of(rows, full, split)
    assert sum(counts) >= rows and all(c % split == 0 for c in counts)
    assert counts[:-1] == [full] * (len(counts) - 1) if counts else rows == 0
    if rows % full:
        last = counts[-1]
        assert ((last // split) & (last // split - 1)) == 0 and last < 2 * max(rows % full, split)


def test_bad_requests_raise_one_clear_error():
    with pytest.raises(ValueError, match="continuation of 0 tokens"):
        scoring.group_requests([([1, 2], [])], 16, 16)
    with pytest.raises(ValueError, match="at most max_length=16"):
        scoring.group_requests([([1], list(range(17)))], 16, 16)
    with pytest.raises(ValueError, match="context of 0"):
        scoring.group_requests([([], [1])], 16, 16)


def test_the_heads_positions_are_split_over_the_batch_devices():
    """The positions gathered for the output head stay split over the mesh's batch axes, as the rows they come
    from are: each of the 8 devices runs the 50k-wide head on 1/8 of them (replicated, each would run all)."""
    import jax
    from neox_jax import sharding

    mesh = sharding.inference_mesh()
    hidden = sharding.put_batch(np.arange(8 * 16 * 4, dtype=np.float32).reshape(8, 16, 4), mesh)
    index = np.arange(0, 128, 2, dtype=np.int32)
    with sharding.activation_rules(mesh, zero_stage=0):
        x = jax.jit(scoring.gather_positions)(hidden, index)
    np.testing.assert_array_equal(x, np.asarray(hidden).reshape(-1, 4)[index])
    assert {shard.data.shape for shard in x.addressable_shards} == {(64 // 8, 4)}
