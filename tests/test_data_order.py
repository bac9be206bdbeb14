"""GPT-NeoX's sample order and the sequential order, against a re-implementation of GPT-NeoX's rules written
here as plainly as possible (loops, one concatenated stream), never against the code under test.

The rules (EleutherAI/gpt-neox, megatron/data/gpt2_dataset.py, blendable_dataset.py, data_utils.py,
helpers.cpp): epochs E = the fewest with (E T - 1) // L >= N; one RandomState(seed) shuffles the document
ids repeated E times (int32), then arange(M) (uint32), M = (E T - 1) // L; sample k is the stream window
shuffle_idx[k] of L + 1 tokens; a dataset holds M - 1 samples. Weighted paths ask ceil(N w 1.005) each and
interleave by the largest lag behind w_d max(j, 1).
"""

import math
import os

import numpy as np
import pytest

from neox_jax.config import ConfigError, default_config, validate
from neox_jax.data import dataset, indexed, neox_index

SEQ, BATCH = 16, 4


def write_docs(prefix, num_docs, offset, seed):
    """Documents of 1..40 tokens whose tokens count up from `offset`: every window is identifiable."""
    lengths = np.random.default_rng(seed).integers(1, 41, num_docs)
    docs = np.split(np.arange(offset, offset + lengths.sum()), np.cumsum(lengths)[:-1])
    with indexed.IndexedWriter(prefix, np.int32) as w:
        for d in docs:
            w.add(d)
    return str(prefix), docs


# ---- the reference ---------------------------------------------------------------------------------------

def reference_samples(docs, num_samples, seed, first=0, stop=None):
    stop = len(docs) if stop is None else stop
    tokens = sum(len(docs[i]) for i in range(first, stop))
    epochs = 1
    while (epochs * tokens - 1) // SEQ < num_samples:
        epochs += 1
    rng = np.random.RandomState(seed)
    doc_idx = np.array(list(range(first, stop)) * epochs, dtype=np.int32)
    rng.shuffle(doc_idx)
    stream = np.concatenate([docs[d] for d in doc_idx])
    windows = (epochs * tokens - 1) // SEQ
    shuffle_idx = np.arange(windows, dtype=np.uint32)
    rng.shuffle(shuffle_idx)
    return [stream[s * SEQ:s * SEQ + SEQ + 1] for s in shuffle_idx], epochs  # GPT-NeoX's len(): one fewer


def reference_blend(weights, sizes):
    total = sum(weights)
    w = [x / total for x in weights]
    counts, out = [0] * len(w), []
    for j in range(sum(sizes)):
        x = float(max(j, 1))
        best = 0
        for d in range(1, len(w)):
            if w[d] * x - counts[d] > w[best] * x - counts[best]:
                best = d
        out.append((best, counts[best]))
        counts[best] += 1
    return out


def reference_order(datasets, weights, num_samples, seed):
    """GPT-NeoX's train_data_paths + train_data_weights: weights normalised, each dataset asked ceil(N w 1.005),
    then blended (BlendableDataset normalises the weights once more)."""
    weights = [w / sum(weights) for w in weights]
    parts = [reference_samples(docs, int(math.ceil(num_samples * w * 1.005)), seed)[0]
             for docs, w in zip(datasets, weights)]
    # a dataset asked for more than its M windows answers sample s % (M - 1) (its IndexError fallback)
    return [parts[d][s if s < len(parts[d]) else s % (len(parts[d]) - 1)]
            for d, s in reference_blend(weights, [len(p) - 1 for p in parts])]


# ---- fixtures ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("order")
    return write_docs(d / "a_text_document", 60, 0, 0), write_docs(d / "b", 25, 100_000, 1)


def config(train_paths, steps, **data_fields):
    c = default_config()
    c.train.seq_len, c.train.batch_size, c.train.steps, c.train.seed = SEQ, BATCH, steps, 1234
    c.data.order = "gpt_neox"
    c.data.train_paths = train_paths
    c.model.vocab_size = 200_000  # dataset b's ids start at 100,000 (a marker of where a sample came from)
    for k, v in data_fields.items():
        c.data[k] = v
    return validate(c)


def batches(it, count):
    return [np.asarray(next(it)["tokens"]) for _ in range(count)]


def global_batches(order, start, count):
    return [np.stack(order[(start + n) * BATCH:(start + n + 1) * BATCH]) for n in range(count)]


# ---- gpt_neox order ------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 50], ids=["one_epoch", "several_epochs"])
def test_one_dataset_matches_gpt_neox(data, steps):
    (a, docs), _ = data
    c = config(a.removesuffix("_text_document"), steps)  # GPT-NeoX's --output-prefix naming is found
    order = reference_order([docs], [1.0], steps * BATCH, 1234)
    _, epochs = reference_samples(docs, math.ceil(steps * BATCH * 1.005), 1234)
    assert epochs == 1 if steps == 10 else epochs >= 3
    it = dataset.make_train_iterator(c, 0, 1)
    np.testing.assert_array_equal(batches(it, steps), global_batches(order, 0, steps))
    assert it.get_state()["order"]["epochs"] == [epochs]


def test_two_weighted_datasets_blend_as_gpt_neox(data):
    (a, docs_a), (b, docs_b) = data
    c = config(f"{a},{b}", 30, train_weights="0.7,0.3")
    order = reference_order([docs_a, docs_b], [0.7, 0.3], 30 * BATCH, 1234)
    got = batches(dataset.make_train_iterator(c, 0, 1), 30)
    np.testing.assert_array_equal(got, global_batches(order, 0, 30))
    from_b = np.concatenate(got)[:, 0] >= 100_000
    assert 0.2 < from_b.mean() < 0.4


def test_resume_in_the_middle_on_two_processes(data):
    (a, docs_a), (b, docs_b) = data
    c = config(f"{a},{b}", 20, train_weights="2,1")
    expected = global_batches(reference_order([docs_a, docs_b], [2, 1], 20 * BATCH, 1234), 0, 20)
    first = dataset.make_train_iterator(c, 0, 1)
    batches(first, 7)
    state = first.get_state()
    for p in range(2):  # the same global rows, split in halves, from batch 7 on
        it = dataset.make_train_iterator(c, p, 2)
        it.set_state(state)
        for n, got in enumerate(batches(it, 5), start=7):
            np.testing.assert_array_equal(got, expected[n][p * BATCH // 2:(p + 1) * BATCH // 2])


def test_split_cuts_documents_into_train_and_valid(data):
    (a, docs), _ = data
    c = config(a, 12, split="8,1,1")
    c.train.eval_every, c.train.eval_batches = 5, 2
    bounds = [0, 48, 54, 60]  # GPT-NeoX's get_train_valid_test_split_ for 60 documents
    assert neox_index.split_bounds("8,1,1", 60) == bounds
    train, _ = reference_samples(docs, 12 * BATCH, 1234, 0, 48)  # data_path: no 1.005, no blend
    np.testing.assert_array_equal(batches(dataset.make_train_iterator(c, 0, 1), 12), global_batches(train, 0, 12))
    valid, _ = reference_samples(docs, (12 // 5 + 1) * 2 * BATCH, 1234, 48, 54)
    np.testing.assert_array_equal([b["tokens"] for b in dataset.make_val_batches(c, 0, 1)],
                                  global_batches(valid, 0, 2))


def test_index_is_cached_under_gpt_neox_names_and_rebuilt_when_stale(tmp_path):
    prefix, docs = write_docs(tmp_path / "c", 30, 0, 2)
    c = config(prefix, 5)
    n = math.ceil(5 * BATCH * 1.005)
    files = [tmp_path / f"c_train_0_indexmap_{n}ns_{SEQ}sl_1234s_packedpi_ac_{k}_idx.npy"
             for k in ("doc", "sample", "shuffle")]
    first = batches(dataset.make_train_iterator(c, 0, 1), 5)
    assert all(f.is_file() for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    np.testing.assert_array_equal(batches(dataset.make_train_iterator(c, 0, 1), 5), first)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # loaded, not rebuilt
    prefix, docs = write_docs(tmp_path / "c", 40, 0, 3)  # same name, other data: the stale index is rebuilt
    order = reference_order([docs], [1.0], 5 * BATCH, 1234)
    np.testing.assert_array_equal(batches(dataset.make_train_iterator(c, 0, 1), 5), global_batches(order, 0, 5))


def test_blending_breaks_exact_ties_like_the_cpp():
    # 0.7 x 10 - 7 and 0.3 x 10 - 3 are both 0.0 in double arithmetic; a fused multiply-add would differ
    for weights in ([0.7, 0.3], [5, 1, 1], [0.1, 0.2, 0.3, 0.4]):
        d, s = neox_index.blending_indices(weights, 3000, rows=700)
        assert list(zip(d.tolist(), s.tolist())) == reference_blend(weights, [3000])


def test_resume_refuses_another_epoch_count(data):
    (a, _), _ = data
    it = dataset.make_train_iterator(config(a, 10), 0, 1)
    next(it)
    longer = dataset.make_train_iterator(config(a, 50), 0, 1)
    with pytest.raises(ValueError, match="pin data.num_samples"):
        longer.set_state(it.get_state())
    pinned = dataset.make_train_iterator(config(a, 50, num_samples=10 * BATCH), 0, 1)
    pinned.set_state(it.get_state())


# ---- sequential order ----------------------------------------------------------------------------------

def test_sequential_reads_documents_in_stored_order(tmp_path):
    rows = np.arange(13 * (SEQ + 1)).reshape(13, SEQ + 1)
    for name, part in (("s0", rows[:9]), ("s1", rows[9:])):
        with indexed.IndexedWriter(tmp_path / name, np.uint16) as w:
            for r in part:
                w.add(r)
    c = config(f"{tmp_path / 's0'},{tmp_path / 's1'}", 3, order="sequential")
    it = dataset.make_train_iterator(c, 1, 2)
    got = batches(it, 4)  # 13 sequences: 3 whole batches, then the order starts again
    for n, b in enumerate(got):
        np.testing.assert_array_equal(b, rows[(n % 3) * BATCH + 2:(n % 3) * BATCH + 4])

    with indexed.IndexedWriter(tmp_path / "bad", np.uint16) as w:
        w.add(rows[0])
        w.add(rows[1][:-1])
    with pytest.raises(ValueError, match=r"bad.idx: document 1 has 16 tokens; .* 17 tokens"):
        dataset.make_train_iterator(config(str(tmp_path / "bad"), 3, order="sequential"), 0, 1)


@pytest.mark.parametrize("fields,match", [
    ({"order": "neox"}, "data.order: 'neox' is not one of grain, gpt_neox, sequential"),
    ({"split": "969,30,1", "order": "grain"}, "data.split: applies to data.order='gpt_neox'"),
    ({"split": "969;30"}, "data.split: '969;30' is not up to 3"),
    ({"split": "1,1", "val_paths": "x"}, "leave data.val_paths empty"),
    ({"num_samples": -1}, "data.num_samples: must be a non-negative integer"),
    ({"order": "sequential", "train_weights": "1,2"}, "weights do not apply"),
])
def test_config_errors_name_the_field(fields, match):
    with pytest.raises(ConfigError, match=match):
        config("x", 1, **fields)


def test_read_only_data_folder_caches_in_cache_dir(tmp_path, monkeypatch):
    prefix, docs = write_docs(tmp_path / "ro", 30, 0, 4)
    monkeypatch.setattr(neox_index.os, "access", lambda path, mode: False)
    c = config(prefix, 5, cache_dir=str(tmp_path / "cache"))
    got = batches(dataset.make_train_iterator(c, 0, 1), 5)
    np.testing.assert_array_equal(got, global_batches(reference_order([docs], [1.0], 5 * BATCH, 1234), 0, 5))
    assert len(list((tmp_path / "cache" / "index").glob("ro-*_train_0_indexmap_*_idx.npy"))) == 3
    assert not list(tmp_path.glob("ro_*.npy"))


def test_index_built_in_small_chunks_is_the_same(tmp_path, monkeypatch):
    monkeypatch.setattr(neox_index, "_CHUNK", 7)  # many chunks of documents and windows, empty ones included
    prefix, docs = write_docs(tmp_path / "chunks", 50, 0, 5)
    got = batches(dataset.make_train_iterator(config(prefix, 40), 0, 1), 40)
    np.testing.assert_array_equal(got, global_batches(reference_order([docs], [1.0], 40 * BATCH, 1234), 0, 40))


def test_batch_viewer_writes_the_steps_training_consumes(data, tmp_path):
    import json
    import subprocess
    import sys

    from neox_jax.data.tokenizer import load_tokenizer

    (a, docs), _ = data
    flags = [f"--config.{k}={v}" for k, v in {
        "data.order": "gpt_neox", "data.train_paths": a, "train.seq_len": SEQ, "train.batch_size": BATCH,
        "train.steps": 10, "train.seed": 1234}.items()]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", "batch_viewer.py"), *flags, "--steps", "2:4",
                          "--rows", "1:3", "--json", str(tmp_path / "b.jsonl"), "--npy", str(tmp_path / "b.npy")],
                         capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    expected = np.stack(global_batches(reference_order([docs], [1.0], 10 * BATCH, 1234), 2, 2))[:, 1:3]
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), expected)
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [(r["step"], r["row"]) for r in rows] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    assert [r["tokens"] for r in rows] == expected.reshape(4, -1).tolist()
    assert rows[0]["text"] == load_tokenizer().decode(expected[0, 0])
    assert f"step 3 row 2: {rows[-1]['text']!r}" in out.stdout
