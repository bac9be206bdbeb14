"""Pile-format text -> GPT-NeoX `.bin`/`.idx` token files.

The main thread reads and checks documents (`neox_jax.data.documents`: the input formats, bad input and empty
documents), encoder threads (worker processes past _MAX_THREADS workers) tokenize batches of them with the
tokenizer's batched encoder, and the results are written in input order, an end-of-document id after each
document. Outputs are written atomically: under `.partial` names, renamed into place only when every input was
read. Bad input removes them; a stop (Ctrl-C, SIGTERM, `kill -9`) keeps them with the run's progress, which
`resume=True` continues to the same bytes (`neox_jax.data.resumable`); a run without it starts over. Input that holds no document at all is refused before any file appears
(an empty dataset trains nothing), as are components whose output names would collide. With
`keep_whitespace_docs=True` whitespace-only texts are documents, as in GPT-NeoX's preprocess_data.py, so both tools
write the same files.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import re
import signal
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from neox_jax import errors, files
from neox_jax.data import indexed, manifest, resumable
from neox_jax.data.dedup import text_key as text_key_of
from neox_jax.data.documents import BAD_KINDS, Document, expand_inputs, iter_documents
from neox_jax.data.tokenizer import load_tokenizer

log = logging.getLogger("neox_jax")

PREPROCESS_VERSION = 1  # part of the cache key: bump when the output for the same input changes
_CHUNK_BYTES = 1 << 20
_CHUNK_DOCS = 512
_MAX_THREADS = 8


# ---- tokenizing ------------------------------------------------------------------------------------------

_worker_tokenizer = None


def _init_worker(tokenizer_path: str, add_special_tokens: bool):
    global _worker_tokenizer
    # One core per worker process: tokenizers' own thread pool would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path, add_special_tokens=add_special_tokens)


def _encode(texts: Sequence[str], append_eod: bool, tokenizer=None) -> tuple[np.ndarray, np.ndarray]:
    tok = tokenizer or _worker_tokenizer
    ids = tok.encode_batch(texts)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), np.int64, int(lengths.sum()))
    if append_eod:  # one vectorized insert instead of a new list per document
        flat = np.insert(flat, np.cumsum(lengths), tok.eod_id)
        lengths += 1
    return flat, lengths


def _tokenizer_pool(workers: int, tokenizer, append_eod: bool):
    """(executor, function of a list of texts -> (flat ids, lengths)) for `workers` parallel encoders.

    Up to _MAX_THREADS workers are threads of this process: HF tokenizers' batched encoder releases the
    GIL (and fans out over its own thread pool), so threads run in parallel without the start-up
    (~0.3 CPU-s each) and pickling of worker processes, and share one warm BPE cache. Past that the GIL-held part
    (ids -> numpy, about 1/30 of the work) would cap throughput, so more workers are processes.
    """
    if workers <= _MAX_THREADS:
        pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
        return pool, lambda texts: _encode(texts, append_eod, tokenizer)
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=_WorkerContext(),
        initializer=_init_worker, initargs=(tokenizer.path, tokenizer.add_special_tokens))
    return pool, functools.partial(_worker_encode, append_eod)


def _worker_encode(append_eod: bool, texts: Sequence[str]):
    return _encode(texts, append_eod)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A tokenizer process that never sees Ctrl-C. The terminal sends SIGINT to the whole process group, and every
    worker would print a KeyboardInterrupt traceback of its own; the parent alone stops the pool. SIGINT is blocked
    while the process starts, and a blocked signal stays blocked in the child across fork and exec (a signal
    handler set in the child's initializer would come after its imports, which take seconds)."""

    def start(self):
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a Ctrl-C that came meanwhile is delivered now


class _WorkerContext(multiprocessing.context.SpawnContext):
    Process = _WorkerProcess


def _chunks(docs: Iterable[Document], counts) -> Iterator[tuple[list[Document], tuple]]:
    """(documents, what `counts()` was when the last of them was read): the bad-input and duplicate counts up to the
    chunk's end, which is what a resume from there must start with (the reader runs ahead of the writer)."""
    chunk, size, last = [], 0, counts()
    for d in docs:
        chunk.append(d)
        size += len(d.text)
        last = counts()
        if size >= _CHUNK_BYTES or len(chunk) >= _CHUNK_DOCS:
            yield chunk, last
            chunk, size = [], 0
    if chunk:
        yield chunk, last


def component_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "unknown"


@dataclasses.dataclass
class Summary:
    outputs: dict  # component (or "all") -> prefix
    docs: int = 0
    tokens: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    duplicates_dropped: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    per_component: dict = dataclasses.field(default_factory=dict)  # name -> [docs, tokens]

    def snapshot(self, counts: tuple) -> dict:
        """The summary as a progress record holds it, with the bad-input and duplicate `counts` of `_chunks`."""
        return {"docs": self.docs, "tokens": self.tokens, "text_bytes": self.text_bytes, "seconds": self.seconds,
                "duplicates_dropped": counts[-1], "bad": dict(zip(BAD_KINDS, counts[:-1])),
                "per_component": {k: list(v) for k, v in self.per_component.items()}}

    def restore(self, saved: dict) -> None:
        self.docs, self.tokens, self.text_bytes = saved["docs"], saved["tokens"], saved["text_bytes"]
        self.seconds, self.duplicates_dropped = saved["seconds"], saved["duplicates_dropped"]
        self.bad.update({k: v for k, v in saved["bad"].items() if v})
        self.per_component = {k: list(v) for k, v in saved["per_component"].items()}

    def format(self) -> str:
        mb_s = self.text_bytes / 1e6 / max(self.seconds, 1e-9)
        lines = [f"{self.docs} documents, {self.tokens} tokens, {self.text_bytes / 1e6:.1f} MB of text in "
                 f"{self.seconds:.1f} s ({self.docs / max(self.seconds, 1e-9):.0f} docs/s, {mb_s:.2f} MB/s)"]
        for name, (docs, toks) in sorted(self.per_component.items()):
            lines.append(f"  {name}: {docs} documents, {toks} tokens")
        if self.duplicates_dropped:
            lines.append(f"dropped {self.duplicates_dropped} exact duplicate documents")
        if self.bad:
            lines.append("skipped bad input: " + ", ".join(f"{k}={self.bad[k]}" for k in BAD_KINDS if self.bad[k]))
        lines += [f"wrote {p}.bin / {p}.idx" for p in self.outputs.values()]
        return "\n".join(lines)


def preprocess(inputs: str | Sequence[str], output_prefix: str, tokenizer_path: str | None = None, *,
               workers: int = 1, append_eod: bool = True, skip_bad: bool = False,
               split_by_component: bool = False, dedup: bool = False, progress: bool = True,
               keep_whitespace_docs: bool = False, add_special_tokens: bool = False,
               neox_names: bool = False, overwrite: bool = True, text_key: str = "text",
               resume: bool = False, progress_every: float = 60.0, extra_manifest: dict | None = None) -> Summary:
    """Tokenize Pile-format inputs into `output_prefix.{bin,idx}` (or one `output_prefix_<component>` pair
    per pile_set_name). Nothing is written under the final names unless every input was read.

    neox_names: GPT-NeoX's output names, `output_prefix[_<component>]_text_document.{bin,idx}`.
    overwrite: False refuses an output that exists (preprocess_data.py without --overwrite) before it is written.
    add_special_tokens: let an HF tokenizer's post-processor add its special tokens (e.g. a BOS before every
    document), as GPT-NeoX's HFTokenizer does; the 20B tokenizer adds none, so its output is the same.
    text_key: the JSON field or Parquet column holding each document's text.
    resume: continue the unfinished run of this output prefix from its recorded progress (`data/progress.py`);
    the result is the same bytes as a run never stopped. Without it such progress is discarded. progress_every:
    seconds between progress records (0: after every chunk of documents). extra_manifest: more manifest fields."""
    _remove_leftovers(output_prefix)
    done = resumable.finished(output_prefix) if resume else None
    if done is not None:
        return _already_complete(output_prefix, done)
    tokenizer = load_tokenizer(tokenizer_path, add_special_tokens=add_special_tokens)
    summary = Summary(outputs={})
    outputs = _Outputs(output_prefix, indexed.token_dtype(tokenizer.vocab_size), split_by_component, neox_names,
                       summary, overwrite)  # an existing output is refused before the inputs are looked at
    names = expand_inputs(inputs)
    run = resumable.describe_run(names, tokenizer.path, append_eod=append_eod, skip_bad=skip_bad, dedup=dedup,
                                 split_by_component=split_by_component, keep_whitespace_docs=keep_whitespace_docs,
                                 add_special_tokens=add_special_tokens, neox_names=neox_names, text_key=text_key)
    record = resumable.load_progress(output_prefix, run) if resume else resumable.discard(output_prefix)
    position = (0, 0)
    if record is not None:
        position = tuple(record["position"])
        summary.restore(record["summary"])
    docs = iter_documents(names, skip_bad, summary.bad, keep_whitespace_docs, text_key, start=position)
    if dedup:
        docs = _drop_duplicates(docs, summary, _seen_before(names, position, keep_whitespace_docs, text_key,
                                                            skip_bad) if record else None)
    recorder = resumable.Recorder(output_prefix, run, progress_every, record)
    _tokenize(docs, outputs, summary, recorder, (record or {}).get("outputs", {}), tokenizer, workers=workers,
              append_eod=append_eod, progress=progress)
    if not outputs.writers:  # an empty dataset trains nothing: refuse (no output file was opened)
        recorder.remove()
        raise _no_documents(names, output_prefix, summary)
    for key, prefix in summary.outputs.items():  # what the pair holds and what made it (data/manifest.py)
        manifest.write(prefix, tokenizer.path, run["inputs"], sha256=outputs.writers[key].sha256, **(extra_manifest or {}))
    recorder.remove()
    return summary


def _tokenize(docs, outputs: _Outputs, summary: Summary, recorder: resumable.Recorder, resume: dict, tokenizer, *,
              workers: int, append_eod: bool, progress: bool) -> None:
    """Encode `docs` into `outputs` (a resumed run's reopened first, cut back to `resume`), recording progress.
    The stack closes every writer with the exception, if any: a failed run discards all partial outputs, an
    interrupted one (Ctrl-C, SIGTERM) keeps them with its progress for --resume."""
    start, before = time.perf_counter(), summary.seconds
    with contextlib.ExitStack() as stack:
        outputs.start(stack, resume)
        bar = stack.enter_context(tqdm(unit="B", unit_scale=True, desc="tokenizing", mininterval=0.5,
                                       initial=summary.text_bytes, disable=not progress or None))
        pool, encode = _tokenizer_pool(workers, tokenizer, append_eod)
        stack.push(lambda exc_type, *_: pool.shutdown(wait=exc_type is None, cancel_futures=True))
        counts = lambda: (*(summary.bad[k] for k in BAD_KINDS), summary.duplicates_dropped)  # noqa: E731
        try:
            for chunk, at_end, flat, lengths in _encoded_in_order(_chunks(docs, counts), pool, encode, workers):
                bar.update(outputs.write(chunk, flat, lengths))
                summary.seconds = before + time.perf_counter() - start
                recorder.wrote(chunk[-1].position, summary.snapshot(at_end), outputs)
                bar.set_postfix_str(f"{summary.docs / max(summary.seconds, 1e-9):.0f} docs/s", refresh=False)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what was written is kept for --resume
            if recorder.save(outputs):
                outputs.keep()
            raise
        except BaseException:
            recorder.remove()
            raise
    summary.seconds = before + time.perf_counter() - start


def _already_complete(output_prefix: str, record: dict) -> Summary:
    """--resume of a run stopped after its outputs were renamed into place: what is missing (a manifest, the
    record's removal) is done, and the outputs are summarized from their index."""
    summary = Summary(outputs={})
    for key, out in record["outputs"].items():
        if not os.path.isfile(manifest.path_of(out["prefix"])):
            manifest.write(out["prefix"], record["run"]["tokenizer_path"], record["run"]["inputs"])
        data = indexed.IndexedDataset(out["prefix"])
        summary.outputs[key] = out["prefix"]
        summary.docs += len(data)
        summary.tokens += data.num_tokens
    os.remove(resumable.path_of(output_prefix))
    log.warning("--resume: %s was already complete (its run stopped after writing it); nothing to do", output_prefix)
    return summary


def _seen_before(names: Sequence[str], position: tuple[int, int], keep_whitespace_docs: bool, text_key: str,
                 skip_bad: bool) -> set[bytes]:
    """--dedup on resume: the keys of every document up to `position`, read again (not tokenized)."""
    docs = iter_documents(names, skip_bad, collections.Counter(), keep_whitespace_docs, text_key)
    return {text_key_of(d.text) for d in itertools.takewhile(lambda d: d.position <= position, docs)}


def _remove_leftovers(output_prefix: str) -> None:
    """Remove the temporary files that a run writing this prefix left when it was killed (`kill -9`, a lost node:
    no exit path ran), saying so in one line; those of a run still writing are left alone (`files`)."""
    folder = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.isdir(folder):
        removed = files.remove_stale_temps(folder, os.path.basename(output_prefix))
        if removed:
            log.warning("removed %d temporary file(s) that a killed run left in %s: %s", len(removed), folder,
                        ", ".join(removed))


def _drop_duplicates(docs: Iterable[Document], summary: Summary, seen: set[bytes] | None = None
                     ) -> Iterator[Document]:
    """`docs` less the exact (normalized-text) repeats of an earlier one (or of one in `seen`), counted in the
    summary."""
    seen = set() if seen is None else seen
    for d in docs:
        key = text_key_of(d.text)
        if key in seen:
            summary.duplicates_dropped += 1
            continue
        seen.add(key)
        yield d


def _encoded_in_order(chunks: Iterable[tuple[list[Document], tuple]], pool, encode, workers: int):
    """(chunk, its counts, flat ids, lengths) of each chunk in input order, with up to 2 x `workers` chunks in the
    pool."""
    in_flight = collections.deque()
    for chunk, counts in chunks:
        in_flight.append((chunk, counts, pool.submit(encode, [d.text for d in chunk])))
        while len(in_flight) > 2 * workers:
            c, n, fut = in_flight.popleft()
            yield c, n, *fut.result()
    while in_flight:
        c, n, fut = in_flight.popleft()
        yield c, n, *fut.result()


class _Outputs:
    """The token files of one preprocess run (one, or one per component), each opened on `stack` when its first
    document arrives, and the summary's counts of what went into them."""

    def __init__(self, output_prefix: str, dtype, split_by_component: bool, neox_names: bool, summary: Summary,
                 overwrite: bool):
        self.output_prefix, self.dtype, self.summary = output_prefix, dtype, summary
        self.split_by_component, self.neox_names, self.overwrite = split_by_component, neox_names, overwrite
        self.writers: dict[str, indexed.IndexedWriter] = {}
        self.owners: dict[str, str] = {}  # output prefix -> the component written there
        if not split_by_component:
            self.claim("all")  # the one output's name is known: refused before a document is read

    def start(self, stack: contextlib.ExitStack, resume: dict[str, dict]) -> None:
        """Writers open on `stack`; those of the run resumed first, cut back to its recorded progress."""
        self.stack = stack
        for key, state in resume.items():
            self.open(key, state)

    def open(self, key: str, resume: dict | None = None) -> indexed.IndexedWriter:
        writer = self.stack.enter_context(indexed.IndexedWriter(self.claim(key), self.dtype, partial=True,
                                                                resume=resume))
        self.writers[key] = writer
        self.summary.outputs[key] = writer.prefix
        return writer

    def state(self) -> dict[str, dict]:
        """Each output's documents and tokens so far (what `resume=` cuts its files back to)."""
        return {key: {"documents": w.num_docs, "tokens": w.num_tokens} for key, w in self.writers.items()}

    def flush(self) -> None:
        for w in self.writers.values():
            w.checkpoint()

    def keep(self) -> None:
        for w in self.writers.values():
            w.keep = True

    def claim(self, key: str) -> str:
        """The output prefix of `key` (a component, or "all"), refused when another component's name gives the same
        one (the last would replace the others) or, unless overwriting, when its files exist. Components appear
        while the input is read, so a refusal can come late; nothing is final by then (see `preprocess`)."""
        prefix = f"{self.output_prefix}_{component_slug(key)}" if self.split_by_component else self.output_prefix
        prefix = indexed.strip_suffix(prefix + (indexed.NEOX_SUFFIX if self.neox_names else ""))
        other = self.owners.setdefault(prefix, key)
        if other != key:
            raise errors.InputError(
                f"--split-by-component: components {other!r} and {key!r} would both be written to {prefix}.bin/.idx "
                "(an output name has _ for each run of characters other than letters and digits); nothing was "
                "written; rename one (meta.pile_set_name) or preprocess without --split-by-component")
        files.check_new([prefix + ".bin", prefix + ".idx"], "--output-prefix", self.overwrite)
        return prefix

    def writer_for(self, component: str) -> indexed.IndexedWriter:
        key = component if self.split_by_component else "all"
        return self.writers[key] if key in self.writers else self.open(key)

    def write(self, chunk: list[Document], flat: np.ndarray, lengths: np.ndarray) -> int:
        """Append the chunk's documents; returns the bytes of text they were."""
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, d in enumerate(chunk):
            self.writer_for(d.component).add_many(flat[offsets[i]:offsets[i + 1]], lengths[i:i + 1])
            stats = self.summary.per_component.setdefault(d.component, [0, 0])
            stats[0] += 1
            stats[1] += int(lengths[i])
        nbytes = sum(len(d.text.encode("utf-8")) for d in chunk)
        self.summary.docs += len(chunk)
        self.summary.tokens += int(lengths.sum())
        self.summary.text_bytes += nbytes
        return nbytes


def _no_documents(files: Sequence[str], output_prefix: str, summary: Summary) -> errors.InputError:
    skipped = (f"; {sum(summary.bad.values())} bad line(s) skipped" if summary.bad else "") + (
        f"; {summary.duplicates_dropped} duplicate(s) dropped" if summary.duplicates_dropped else "")
    where = files[0] if len(files) == 1 else f"{len(files)} input files ({files[0]}, ...)"
    return errors.InputError(f"no documents in {where}{skipped}; nothing written to {output_prefix}")


# ---- cached on-the-fly preprocessing ---------------------------------------------------------------------

def _file_digest(path: str, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def cache_key(files: Sequence[str], tokenizer_path: str, append_eod: bool = True) -> str:
    """Hash of the input files' and tokenizer's contents and the preprocessing version."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"v{PREPROCESS_VERSION} eod={append_eod} n={len(files)}".encode())
    for p in list(files) + [tokenizer_path]:
        _file_digest(p, h)
        h.update(b"\0")
    return h.hexdigest()


def _cached(prefix: str, vocab_size: int, cache_dir: str, paths: Sequence[str]) -> bool:
    """Whether the cache entry `prefix` is there and sound; a damaged one is ours to rebuild (nothing is lost)."""
    if not indexed.exists(prefix):
        return False
    try:
        indexed.check_token_ids(indexed.IndexedDataset(prefix), vocab_size, cache_dir, "cache entry")
        return True
    except indexed.IndexedFormatError as e:
        log.warning("%s; tokenizing %s again", e, ", ".join(paths))
        return False


def prepare_dataset(inputs: str | Sequence[str], tokenizer_path: str | None = None,
                    cache_dir: str | None = None, workers: int = 1, progress: bool = True) -> str:
    """Preprocess Pile-format inputs into `cache_dir` on first use; returns the `.bin/.idx` prefix.

    The cache entry is named by a hash of the inputs and the tokenizer, so changing either makes a new one.
    Concurrent builders (the processes of a host, runs started together on a fresh machine) take turns on a lock
    beside the entry: one tokenizes, the others read what it wrote; a finished entry is read without the lock (a
    read-only cache works). Up to _MAX_THREADS workers tokenize in threads of this process (the HF
    tokenizer's batched encoder also uses every core itself); more are spawned processes, which re-import
    the caller's main module, so only scripts with an `if __name__ == "__main__":` guard may ask for that.
    """
    paths = expand_inputs(inputs)
    tokenizer = load_tokenizer(tokenizer_path)
    cache_dir = cache_dir or indexed.default_cache_dir()
    stem = re.sub(r"(\.[A-Za-z0-9]+)+$", "", os.path.basename(paths[0])) or "data"
    prefix = os.path.join(cache_dir, f"{stem}-{cache_key(paths, tokenizer.path)}")
    if _cached(prefix, tokenizer.vocab_size, cache_dir, paths):
        return prefix
    os.makedirs(cache_dir, exist_ok=True)
    # the writer's unfinished files have fixed names: two builders of one entry would write into each other's
    with files.exclusive(prefix + ".lock"):
        if not _cached(prefix, tokenizer.vocab_size, cache_dir, paths):  # or another builder made it meanwhile
            preprocess(paths, prefix, tokenizer.path, workers=workers, progress=progress)
    return prefix
