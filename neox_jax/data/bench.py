"""Data benchmarks: training-loader throughput on one core, preprocessing throughput, GPT-NeoX index builds.

`run()` returns a dict; `scripts/benchmark.py data` prints it. The loader is measured on a synthetic
token file large enough (default 20 M tokens) that per-window costs look like a real corpus's, pinned to
one CPU core where the OS allows; preprocessing on the bundled Pile sample with `workers` encoders; the
gpt_neox order's index arrays for a Pile-scale request (150 M samples over 200 M documents) on one core,
built and written, then loaded from their cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from neox_jax import table
from neox_jax.data import default_paths, indexed, neox_index
from neox_jax.data.documents import iter_documents
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


def _as_jsonl_and_parquet(source: str, folder: str, copies: int) -> tuple[str, str]:
    """The documents of `source` `copies` times over, as plain jsonl and as one Parquet file (row groups of 1,024)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d for _ in range(copies) for d in iter_documents(source)]
    jsonl, parquet = os.path.join(folder, "docs.jsonl"), os.path.join(folder, "docs.parquet")
    with open(jsonl, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "meta": {"pile_set_name": d.component}}) + "\n")
    table_ = pa.table({"text": [d.text for d in docs], "meta": [{"pile_set_name": d.component} for d in docs]})
    pq.write_table(table_, parquet, row_group_size=1024)
    return jsonl, parquet


def read_rate(path: str) -> float:
    """MB of text per CPU-second of reading alone (parsing, no tokenizing)."""
    cpu, text = time.process_time(), sum(len(d.text.encode("utf-8")) for d in iter_documents(path))
    return text / 1e6 / max(time.process_time() - cpu, 1e-9)


def format_throughput(source: str, copies: int = 3, rounds: int = 3) -> dict:
    """Preprocessing MB/s of text on one worker, the same documents as jsonl and as Parquet, run in turns `rounds`
    times (medians: on a shared machine the rate drifts by 20% between runs); the reading alone per format; and the
    .bin bytes per byte of text (for projections)."""
    runs = {"jsonl": [], "parquet": []}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = dict(zip(runs, _as_jsonl_and_parquet(source, tmp, copies)))
        for _ in range(rounds):
            for name, path in paths.items():
                runs[name].append(preprocess_throughput(path, 1))
        for name, path in paths.items():
            for key in ("mb_per_s", "mb_per_cpu_s"):
                out[f"{name}_{key}"] = float(np.median([r["preprocess_" + key] for r in runs[name]]))
            out[f"{name}_read_mb_per_cpu_s"] = read_rate(path)
        first = runs["jsonl"][0]
        out["format_mb"], out["format_rounds"] = first["preprocess_mb"], rounds
        out["bin_bytes_per_text_byte"] = first["preprocess_tokens_per_s"] * 2 / (first["preprocess_mb_per_s"] * 1e6)
    return out


def merge_throughput(total_mb: int = 2048, pairs: int = 8, folder: str | None = None) -> dict:
    """MB/s of merging `pairs` synthetic pairs of `total_mb` in all (tokens and index) with scripts/merge_data.py,
    and that process's peak resident memory (Python and numpy included)."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "scripts",
                          "merge_data.py")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tokens = total_mb * 2**20 // 2 // pairs
        prefixes = [synthetic_dataset(os.path.join(tmp, f"part{i}"), tokens, seed=i) for i in range(pairs)]
        os.sync()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, script, *prefixes, "--output-prefix", os.path.join(tmp, "merged")],
                                stdout=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None:  # the kernel's own high-water mark of the process (wait4's ru_maxrss would
            peak = max(peak, _high_water(proc.pid))  # count this parent's, inherited over fork and exec)
            time.sleep(0.01)
        merged = time.perf_counter() - start
        os.sync()  # to the disk, not only the page cache
        synced = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{script} failed (status {proc.returncode})")
        size = sum(os.path.getsize(p + s) for p in prefixes for s in (".bin", ".idx"))
    return {"merge_mb": size / 1e6, "merge_pairs": pairs, "merge_mb_per_s": size / 1e6 / merged,
            "merge_synced_mb_per_s": size / 1e6 / synced, "merge_peak_rss_mb": peak / 1e6}


def _high_water(pid: int) -> int:
    """VmHWM of a running process in bytes (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


PILE_DEDUP_TEXT_BYTES = 825e9  # the figure for the deduplicated Pile's text


def projection(mb_per_cpu_s: float, bin_per_text: float, merge_mb_per_s: float, cores: int = 32,
               jobs: int = 16) -> dict:
    """Hours to preprocess PILE_DEDUP_TEXT_BYTES at a measured per-core rate: one node of `cores` workers, and a
    `jobs`-task array of such nodes followed by the merge of their parts (at the measured merge rate)."""
    node_h = PILE_DEDUP_TEXT_BYTES / (mb_per_cpu_s * 1e6 * cores) / 3600
    merge_h = PILE_DEDUP_TEXT_BYTES * bin_per_text / (merge_mb_per_s * 1e6) / 3600
    return {"project_node_h": node_h, "project_array_h": node_h / jobs, "project_merge_h": merge_h,
            "project_cores": cores, "project_jobs": jobs}


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
        index_docs: int = 200_000_000, index_samples: int = 150_000_000, skip_index: bool = False,
        skip_loader: bool = False, formats: bool = True, merge_mb: int = 2048, format_copies: int = 3,
        format_rounds: int = 3) -> dict:
    """Loader tokens/s (goal >= 20 M on one core), preprocessing MB/s of text (goal >= 5 on 2 workers) and the
    gpt_neox index for 150 M samples over 200 M documents (goal: built in < 60 s on one core, loaded in < 1 s)."""
    results = {}
    if not skip_loader:
        with tempfile.TemporaryDirectory() as tmp:
            prefix = synthetic_dataset(os.path.join(tmp, "synthetic"), num_tokens)
            results.update(loader_throughput(prefix, seq_len, batch_size, batches))
    if not skip_preprocess:
        results.update(preprocess_throughput(preprocess_input or default_paths()["train"], workers))
        if formats:
            results.update(format_throughput(preprocess_input or default_paths()["train"], format_copies,
                                             format_rounds))
    if merge_mb:
        results.update(merge_throughput(merge_mb))
    if "jsonl_mb_per_cpu_s" in results and "merge_mb_per_s" in results:
        results.update(projection(results["jsonl_mb_per_cpu_s"], results["bin_bytes_per_text_byte"],
                                  results["merge_synced_mb_per_s"]))
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
    if "jsonl_mb_per_s" in r:
        for name in ("jsonl", "parquet"):
            rows.append((f"preprocessing MB/s of text, 1 worker, {name}, {r['format_mb']:.1f} MB (median of "
                         f"{r['format_rounds']})",
                         "Parquet within 10% of jsonl" if name == "parquet" else "",
                         f"{r[name + '_mb_per_s']:.2f} ({r[name + '_mb_per_cpu_s']:.2f} per CPU-second; reading "
                         f"alone {r[name + '_read_mb_per_cpu_s']:.0f})"))
    if "merge_mb_per_s" in r:
        rows.append((f"merge of {r['merge_pairs']} pairs, {r['merge_mb']:.0f} MB", ">= 200 MB/s",
                     f"{r['merge_mb_per_s']:.0f} MB/s ({r['merge_synced_mb_per_s']:.0f} with the sync to disk)"))
        rows.append(("the merge's peak memory (resident, the whole process)", "< 500 MB",
                     f"{r['merge_peak_rss_mb']:.0f} MB"))
    if "project_node_h" in r:
        rows.append((f"deduplicated Pile ({PILE_DEDUP_TEXT_BYTES / 1e9:.0f} GB of text), 1 node x "
                     f"{r['project_cores']} cores", "", f"{r['project_node_h']:.1f} h (projected)"))
        rows.append((f"the same, a {r['project_jobs']}-job array of such nodes, then the merge", "",
                     f"{r['project_array_h']:.1f} h + {r['project_merge_h']:.1f} h merge (projected)"))
    if "index_build_s" in r:
        rows.append((f"gpt_neox order index, {r['index_samples']:,} samples over {r['index_docs']:,} documents, one "
                     "core: build + write", "< 60 s", f"{r['index_build_cpu_s']:.1f} s of CPU "
                     f"({r['index_build_s']:.1f} s wall, {r['index_gb']:.1f} GB)"))
        rows.append(("the same index loaded from its cache", "< 1 s", f"{r['index_load_s']:.2f} s"))
    columns = [table.Column(header, i, align="<") for i, header in enumerate(("measure", "goal", "measured"))]
    return table.render(columns, rows, gap="  ")
