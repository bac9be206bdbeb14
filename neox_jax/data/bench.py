"""Data benchmarks: training-loader throughput on one core, preprocessing throughput, GPT-NeoX index builds.

`run()` returns a dict; `scripts/benchmark.py data` prints it. The loader is measured on a synthetic
token file large enough (default 20 M tokens) that per-window costs look like a real corpus's, pinned to
one CPU core where the OS allows; preprocessing on the bundled Pile sample with `workers` encoders; the
gpt_neox order's index arrays for a Pile-scale request (150 M samples over 200 M documents) on one core,
built and written, then loaded from their cache.
"""

from __future__ import annotations

import contextlib
import os
import resource
import tempfile
import time

import numpy as np

from neox_jax import table
from neox_jax.data import default_paths, indexed, neox_index
from neox_jax.data.dataset import TrainIterator
from neox_jax.data.preprocess import preprocess


@contextlib.contextmanager
def _one_core():
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield min(before)
    finally:
        os.sched_setaffinity(0, before)


def synthetic_dataset(prefix: str, num_tokens: int, vocab: int = 50277, doc_len: int = 2000, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with indexed.IndexedWriter(prefix, indexed.token_dtype(vocab)) as w:
        for start in range(0, num_tokens, doc_len):
            w.add(rng.integers(1, vocab, min(doc_len, num_tokens - start)))
    return prefix


def loader_throughput(prefix: str, seq_len: int, batch_size: int, batches: int, seed: int = 0) -> dict:
    with _one_core() as core:
        it = TrainIterator([prefix], [1.0], seq_len=seq_len, global_batch=batch_size, seed=seed, read_threads=1)
        next(it)  # start-up (threads, first reads) is not throughput
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(it)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        it.close()
    tokens = batches * batch_size * (seq_len + 1)
    return {"loader_tokens_per_s": tokens / seconds, "loader_tokens_per_cpu_s": tokens / cpu,
            "loader_batches_per_s": batches / seconds, "loader_seq_len": seq_len, "loader_batch_size": batch_size,
            "loader_core": core}


def _cpu_seconds() -> float:
    """CPU time of this process (encoder threads included) and its finished (joined) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def preprocess_throughput(inputs: str, workers: int, tokenizer: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), _cpu_seconds()
        s = preprocess(inputs, os.path.join(tmp, "bench"), tokenizer, workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu  # worker start-up included
    # on a machine shared with other jobs, workers x MB per CPU-second is what free cores would give
    return {"preprocess_mb_per_s": s.text_bytes / 1e6 / seconds,
            "preprocess_mb_per_cpu_s": s.text_bytes / 1e6 / cpu, "preprocess_docs_per_s": s.docs / seconds,
            "preprocess_tokens_per_s": s.tokens / seconds, "preprocess_workers": workers,
            "preprocess_mb": s.text_bytes / 1e6}


def index_build(num_docs: int, num_samples: int, seq_len: int = 2048, seed: int = 1234) -> dict:
    """Seconds to build and write GPT-NeoX's doc/sample/shuffle index arrays for `num_samples` over `num_docs`
    synthetic documents (lengths uniform, one epoch's worth), then to open them from the cache, on one core.
    Only the document sizes are needed, so no token file is written."""
    mean = num_samples * seq_len // num_docs + 64  # tokens per document: one epoch holds the samples
    sizes = np.random.default_rng(seed).integers(1, 2 * mean, num_docs, dtype=np.int32)
    with tempfile.TemporaryDirectory() as tmp, _one_core():
        paths = neox_index.index_paths(os.path.join(tmp, "synthetic"), "train", num_samples, seq_len, seed)
        start, cpu = time.perf_counter(), time.process_time()
        neox_index.load_or_build(paths, sizes, (0, num_docs), num_samples, seq_len, seed)
        build, cpu = time.perf_counter() - start, time.process_time() - cpu
        mtime = os.path.getmtime(paths["doc"])
        start = time.perf_counter()
        arrays = neox_index.load_or_build(paths, sizes, (0, num_docs), num_samples, seq_len, seed)
        sample = arrays["sample"][int(arrays["shuffle"][-1])]  # touch the maps: a load that can serve a sample
        load = time.perf_counter() - start
        assert os.path.getmtime(paths["doc"]) == mtime and len(sample) == 2, "the cached index was rebuilt"
        bytes_on_disk = sum(os.path.getsize(p) for p in paths.values())
    return {"index_build_s": build, "index_build_cpu_s": cpu, "index_load_s": load, "index_docs": num_docs,
            "index_samples": len(arrays["shuffle"]), "index_epochs": len(arrays["doc"]) // num_docs,
            "index_gb": bytes_on_disk / 1e9}


def run(seq_len: int = 2048, batch_size: int = 8, batches: int = 500, num_tokens: int = 20_000_000,
        workers: int = 2, preprocess_input: str | None = None, skip_preprocess: bool = False,
        index_docs: int = 200_000_000, index_samples: int = 150_000_000, skip_index: bool = False) -> dict:
    """Loader tokens/s (goal >= 20 M on one core), preprocessing MB/s of text (goal >= 5 on 2 workers) and the
    gpt_neox index for 150 M samples over 200 M documents (goal: built in < 60 s on one core, loaded in < 1 s)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prefix = synthetic_dataset(os.path.join(tmp, "synthetic"), num_tokens)
        results.update(loader_throughput(prefix, seq_len, batch_size, batches))
    if not skip_preprocess:
        results.update(preprocess_throughput(preprocess_input or default_paths()["train"], workers))
    if not skip_index:
        results.update(index_build(index_docs, index_samples, seq_len))
    return results


def format_results(r: dict) -> str:
    """The README's table (measure, goal, measured) for the parts of `run()` that ran."""
    rows = []
    if "loader_tokens_per_s" in r:
        rows.append((f"loader tokens/s, one core (seq {r['loader_seq_len']}, batch {r['loader_batch_size']})",
                     ">= 20 M", f"{r['loader_tokens_per_s'] / 1e6:.1f} M ({r['loader_tokens_per_cpu_s'] / 1e6:.1f} M "
                     "per CPU-second)"))
    if "preprocess_mb_per_s" in r:
        rows.append((f"preprocessing MB/s of text, {r['preprocess_workers']} workers, {r['preprocess_mb']:.1f} MB",
                     ">= 5", f"{r['preprocess_mb_per_s']:.2f} ({r['preprocess_mb_per_cpu_s']:.2f} per CPU-second; "
                     "start-up included)"))
    if "index_build_s" in r:
        rows.append((f"gpt_neox order index, {r['index_samples']:,} samples over {r['index_docs']:,} documents, one "
                     "core: build + write", "< 60 s", f"{r['index_build_cpu_s']:.1f} s of CPU "
                     f"({r['index_build_s']:.1f} s wall, {r['index_gb']:.1f} GB)"))
        rows.append(("the same index loaded from its cache", "< 1 s", f"{r['index_load_s']:.2f} s"))
    columns = [table.Column(header, i, align="<") for i, header in enumerate(("measure", "goal", "measured"))]
    return table.render(columns, rows, gap="  ")
