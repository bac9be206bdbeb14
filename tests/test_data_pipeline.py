"""The grain training pipeline: windows, shuffling, mixing, the process split and exact resume.

Synthetic datasets whose token i is i (plus an offset per dataset) make every window identifiable by its
first token, so the tests check behaviour without looking inside the pipeline.
"""

import json

import numpy as np
import pytest

from neox_jax.config import default_config
from neox_jax.data import dataset, default_paths, indexed

SEQ = 16
A_OFFSET, B_OFFSET = 0, 40000


def make_dataset(prefix, windows, offset, seed, dtype=np.uint16):
    """Tokens offset + 0 .. windows*SEQ, split into random-length documents."""
    tokens = np.arange(windows * SEQ + 1) + offset
    cuts = np.sort(np.random.default_rng(seed).choice(np.arange(1, len(tokens)), 20, replace=False))
    with indexed.IndexedWriter(prefix, dtype) as w:
        for part in np.split(tokens, cuts):
            w.add(part)
    return prefix


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipeline")
    return make_dataset(str(d / "a"), 200, A_OFFSET, 0), make_dataset(str(d / "b"), 120, B_OFFSET, 1)


def iterator(prefixes, weights=None, seed=0, batch=8, p=0, n=1, **kw):
    return dataset.TrainIterator(prefixes, weights or [1.0] * len(prefixes), seq_len=SEQ, global_batch=batch,
                                 seed=seed, process_index=p, process_count=n, **kw)


def take(it, k):
    return [next(it)["tokens"] for _ in range(k)]


def test_windows_are_contiguous_and_overlap_by_one(two_datasets):
    a, _ = two_datasets
    w = dataset.TokenWindows(a, SEQ)
    assert len(w) == 200
    np.testing.assert_array_equal(w[3], np.arange(3 * SEQ, 4 * SEQ + 1))
    assert w[3].dtype == np.int32 and w[3][-1] == w[4][0]
    batch = next(iterator([a]))["tokens"]
    assert batch.shape == (8, SEQ + 1) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    assert set(batch[:, 0] % SEQ) == {0}


def test_same_seed_same_batches_other_seed_differs(two_datasets):
    a, _ = two_datasets
    first = take(iterator([a], seed=3), 4)
    np.testing.assert_array_equal(first, take(iterator([a], seed=3), 4))
    assert not np.array_equal(first, take(iterator([a], seed=4), 4))


def test_every_window_once_per_epoch(two_datasets):
    a, _ = two_datasets
    starts = np.concatenate([b[:, 0] for b in take(iterator([a], seed=7), 50)])  # 2 epochs of 200 windows
    epoch1, epoch2 = starts[:200], starts[200:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(0, 200 * SEQ, SEQ))
    assert not np.array_equal(epoch1, epoch2)  # reshuffled each epoch
    assert not np.array_equal(epoch1, np.sort(epoch1))


def test_mixing_weights_hold_over_1000_batches(tmp_path):
    # bigger datasets (int32 tokens): grain's index shuffle is slow on domains of a few hundred windows
    offset = 10**6
    a = make_dataset(str(tmp_path / "a"), 8192, 0, 0, np.int32)
    b = make_dataset(str(tmp_path / "b"), 1024, offset, 1, np.int32)
    ds = iterator([a, b], [0.7, 0.3]).local_batches(0)
    firsts = np.concatenate([ds[n]["tokens"][:, 0] for n in range(1000)])
    frac_b = np.mean(firsts >= offset)
    assert abs(frac_b - 0.3) < 0.02, frac_b
    # dataset b ran through 2.3 epochs: each of its windows seen 2 or 3 times
    counts = np.bincount((firsts[firsts >= offset] - offset) // SEQ, minlength=1024)
    assert set(counts) <= {2, 3}


def test_processes_split_the_global_batch(two_datasets):
    one = take(iterator(list(two_datasets), [2, 1]), 5)
    halves = [take(iterator(list(two_datasets), [2, 1], p=p, n=2), 5) for p in (0, 1)]
    for n in range(5):
        np.testing.assert_array_equal(np.concatenate([halves[0][n], halves[1][n]]), one[n])
        assert halves[0][n].shape == (4, SEQ + 1)


@pytest.mark.parametrize("saved_by,restored_on", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_resume_is_exact_across_process_counts(two_datasets, saved_by, restored_on):
    prefixes = list(two_datasets)
    reference = take(iterator(prefixes, [0.6, 0.4], seed=11), 9)  # uninterrupted run
    runs = [iterator(prefixes, [0.6, 0.4], seed=11, p=p, n=saved_by) for p in range(saved_by)]
    for it in runs:
        take(it, 6)
    states = [json.loads(json.dumps(it.get_state())) for it in runs]
    assert all(s == states[0] for s in states) and states[0]["samples"] == 6 * 8
    resumed = [iterator(prefixes, [0.6, 0.4], seed=11, p=p, n=restored_on) for p in range(restored_on)]
    for it in resumed:
        it.set_state(states[0])
    parts = [take(it, 3) for it in resumed]
    for k in range(3):
        np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), reference[6 + k])


def test_start_batch_equals_skipping(two_datasets):
    a, b = two_datasets
    np.testing.assert_array_equal(take(iterator([a, b], start_batch=4), 2), take(iterator([a, b]), 6)[4:])


def test_resume_refuses_a_different_seed(two_datasets):
    state = iterator(list(two_datasets), seed=1).get_state()
    with pytest.raises(ValueError, match=r"saved with train.seed giving seed=1, this run has 2"):
        iterator(list(two_datasets), seed=2).set_state(state)


def test_batch_not_divisible_by_processes(two_datasets):
    with pytest.raises(ValueError, match=r"train.batch_size=6 is not divisible by the 4 processes"):
        iterator(list(two_datasets), batch=6, n=4)


def test_dataset_shorter_than_a_window(tmp_path):
    with indexed.IndexedWriter(str(tmp_path / "short"), np.uint16) as w:
        w.add(np.arange(10))
    with pytest.raises(ValueError, match=r"short has 10 tokens, fewer than train.seq_len \+ 1 = 17"):
        dataset.TokenWindows(str(tmp_path / "short"), SEQ)


def small_config(tmp_path, **data):
    c = default_config()
    c.train.seq_len, c.train.batch_size, c.train.eval_batches = 64, 4, 3
    c.data.cache_dir = str(tmp_path / "cache")
    c.data.train_paths = default_paths()["val"]  # the small file keeps tokenizing fast
    for k, v in data.items():
        c.data[k] = v
    return c


def test_config_to_batches_from_pile_file(tmp_path, two_datasets):
    c = small_config(tmp_path)
    it = dataset.make_train_iterator(c, process_index=0, process_count=1)
    batch = next(it)["tokens"]
    assert batch.shape == (4, 65) and batch.dtype == np.int32 and batch.max() < 50277
    val = dataset.make_val_batches(c, process_index=1, process_count=2)
    assert val is None  # custom train data and no val_paths: no validation set
    c.data.val_paths = default_paths()["val"]
    val = dataset.make_val_batches(c, process_index=1, process_count=2)
    passes = [[b["tokens"] for b in val] for _ in range(2)]
    assert len(passes[0]) == 3 and passes[0][0].shape == (2, 65)
    np.testing.assert_array_equal(passes[0], passes[1])
    # unshuffled: process 1's rows of global batch 1 are windows 6 and 7 of the val token stream
    val_prefix = dataset.resolve_paths(c.data.val_paths, "", c.data.cache_dir)[0]
    stream = indexed.IndexedDataset(val_prefix).tokens
    np.testing.assert_array_equal(passes[0][1], np.stack([stream[w * 64:w * 64 + 65] for w in (6, 7)]))


def test_config_errors_name_the_field(tmp_path, two_datasets):
    a, b = two_datasets
    with pytest.raises(ValueError, match=r"data.train_weights has 1 weights for 2 datasets in data.train_paths"):
        dataset.make_train_iterator(small_config(tmp_path, train_paths=f"{a},{b}.bin", train_weights="1"), 0, 1)
    with pytest.raises(ValueError, match=r"data.train_paths: 'nowhere/x' is neither a .bin/.idx prefix"):
        dataset.make_train_iterator(small_config(tmp_path, train_paths="nowhere/x"), 0, 1)
    with pytest.raises(ValueError, match=r"data.train_weights: every weight must be positive"):
        dataset.make_train_iterator(small_config(tmp_path, train_paths=f"{a},{b}", train_weights="1,0"), 0, 1)


@pytest.mark.slow
def test_grain_worker_processes_give_the_same_batches(two_datasets):
    ref = take(iterator(list(two_datasets), [1, 1]), 6)
    it = iterator(list(two_datasets), [1, 1], workers=2)
    try:
        np.testing.assert_array_equal(take(it, 6), ref)
    finally:
        it.close()


@pytest.mark.slow
def test_a_config_asking_for_the_bundled_sample_trains_on_it(tmp_path):
    c = default_config()
    c.data.bundled_sample = True
    c.data.cache_dir = str(tmp_path / "cache")
    batches = take(dataset.make_train_iterator(c, 0, 1), 20)
    assert batches[0].shape == (c.train.batch_size, c.train.seq_len + 1)
    assert np.mean(np.array(batches) == 0) > 1e-4  # documents are separated by EOD (id 0)
    assert len(dataset.make_val_batches(c, 0, 1)) == c.train.eval_batches


def test_bench_reports_throughput(tmp_path):
    from neox_jax.data import bench

    r = bench.run(seq_len=64, batch_size=4, batches=20, num_tokens=100_000, workers=1,
                  preprocess_input=default_paths()["val"], index_docs=5000, index_samples=20_000, merge_mb=4,
                  format_copies=1, format_rounds=1)
    assert r["loader_tokens_per_s"] > 0 and r["preprocess_mb_per_s"] > 0
    assert r["jsonl_mb_per_cpu_s"] > 0 and r["parquet_mb_per_cpu_s"] > 0 and r["parquet_read_mb_per_cpu_s"] > 0
    assert r["merge_mb"] == pytest.approx(4 * 2**20 / 1e6, rel=0.01) and 0 < r["merge_peak_rss_mb"] < 500
    assert r["project_node_h"] == pytest.approx(r["project_array_h"] * 16)
    assert r["index_build_s"] > 0 and r["index_load_s"] > 0 and r["index_epochs"] == 1
    assert r["index_samples"] >= 20_000
    assert r["preprocess_mb"] == pytest.approx(0.39, abs=0.02) and r["format_mb"] == r["preprocess_mb"]
    assert "merge of 8 pairs, 4 MB" in bench.format_results(r)
