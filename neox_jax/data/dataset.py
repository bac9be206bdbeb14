"""The training pipeline: grain `MapDataset`s over GPT-NeoX `.bin/.idx` token files.

Each dataset's token stream (documents back to back, EOD after each) is cut into windows of
`seq_len + 1` tokens that overlap by one token, as GPT-NeoX does (window i starts at token i * seq_len).
Per dataset the windows are shuffled by seed, differently in each epoch, and repeated without end; the
datasets are mixed in proportion to their weights (grain's deterministic proportional mix). Sample k of
the mixture is a pure function of (datasets, weights, seed, k), and global batch n is samples
[n * B, (n + 1) * B). Process p of P takes rows [p * B / P, (p + 1) * B / P) of each global batch.

The iterator's state is the number of samples consumed globally, so restoring it on any number of
processes (or with more grain workers) continues the same global sequence exactly.
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from neox_jax.data import indexed

STATE_VERSION = 1


class TokenWindows:
    """grain random-access source: window i = tokens[i*seq_len : i*seq_len + seq_len + 1] as int32."""

    def __init__(self, prefix: str, seq_len: int):
        self.data = indexed.IndexedDataset(prefix)
        self.seq_len = int(seq_len)
        self._len = (self.data.num_tokens - 1) // self.seq_len
        if self._len < 1:
            raise ValueError(f"dataset {self.data.prefix} has {self.data.num_tokens} tokens, fewer than "
                             f"train.seq_len + 1 = {self.seq_len + 1}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.data.tokens[start:start + self.seq_len + 1].astype(np.int32)

    def __repr__(self):
        return f"TokenWindows({self.data.prefix!r}, seq_len={self.seq_len}, windows={self._len})"


def _as_batch(tokens: np.ndarray) -> dict:
    return {"tokens": tokens}


def mixture(prefixes: Sequence[str], seq_len: int, seed: int, weights: Sequence[float] | None = None):
    """The infinite, shuffled, weighted mix of the datasets' windows (a grain MapDataset)."""
    import grain

    sources = [TokenWindows(p, seq_len) for p in prefixes]
    # one independent 32-bit shuffle seed per dataset, all derived from the run's seed
    seeds = np.random.SeedSequence([int(seed), 0x6E656F78]).generate_state(len(sources))
    parts = [grain.MapDataset.source(s).shuffle(seed=int(sd)).repeat() for s, sd in zip(sources, seeds)]
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, list(weights) if weights is not None else None)


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def _rows_of_process(ds, start: int, global_batch: int, process_index: int, process_count: int):
    """Batches of this process: its rows of global batches starting at sample `start`."""
    local = local_batch_size(global_batch, process_count)
    return ds[start:].batch(local, drop_remainder=True)[process_index::process_count].map(_as_batch)


class TrainIterator:
    """Iterator over this process's training batches, {"tokens": int32 [B / P, seq_len + 1]}.

    `get_state()` is a small JSON-able dict keyed by global position; `set_state()` continues from it.
    """

    def __init__(self, prefixes: Sequence[str], weights: Sequence[float], *, seq_len: int, global_batch: int,
                 seed: int, process_index: int = 0, process_count: int = 1, workers: int = 0,
                 read_threads: int = 2, prefetch: int = 4, start_batch: int = 0):
        self.prefixes = list(prefixes)
        self.weights = [float(w) for w in weights]
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        local_batch_size(self.global_batch, self.process_count)
        self.workers, self.read_threads, self.prefetch = int(workers), int(read_threads), int(prefetch)
        self._mixture = mixture(self.prefixes, self.seq_len, self.seed, self.weights)
        self.samples = int(start_batch) * self.global_batch
        self._it = None

    # ---- the pure function -----------------------------------------------------------------------------
    def local_batches(self, start_sample: int = 0):
        """MapDataset whose element n is this process's part of the global batch at samples
        [start + n*B, start + (n+1)*B)."""
        return _rows_of_process(self._mixture, start_sample, self.global_batch, self.process_index,
                                self.process_count)

    # ---- iteration ---------------------------------------------------------------------------------------
    def _start(self):
        import grain

        ds = self.local_batches(self.samples).to_iter_dataset(
            grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=self.prefetch))
        if self.workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; scripts may not use absl
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers))
        self._it = iter(ds)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.samples += self.global_batch
        return batch

    next = __next__

    def close(self):
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    # ---- checkpointing -----------------------------------------------------------------------------------
    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "samples": self.samples, "seed": self.seed, "seq_len": self.seq_len,
                "datasets": [os.path.basename(p) for p in self.prefixes], "weights": self.weights}

    def set_state(self, state: dict) -> None:
        mine = self.get_state()
        for key, field in (("seq_len", "train.seq_len"), ("seed", "train.seed"),
                           ("datasets", "data.train_paths"), ("weights", "data.train_weights")):
            if state.get(key) != mine[key]:
                raise ValueError(f"data iterator state was saved with {field} giving {key}={state.get(key)!r}, "
                                 f"this run has {mine[key]!r}; the data order cannot be resumed exactly")
        samples = int(state["samples"])
        self.close()
        self.samples = samples


class ValBatches:
    """A fixed, unshuffled pass over the validation windows; iterate it any number of times."""

    def __init__(self, prefixes: Sequence[str], *, seq_len: int, global_batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1):
        import grain

        parts = [grain.MapDataset.source(TokenWindows(p, seq_len)) for p in prefixes]
        windows = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        self.num_windows = len(windows)
        # a val set smaller than num_batches * batch wraps around (in order)
        self._ds = _rows_of_process(windows.repeat(), 0, global_batch, process_index, process_count)
        self.num_batches = int(num_batches)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        return (self._ds[n] for n in range(self.num_batches))


# ---- config -> datasets -----------------------------------------------------------------------------------

def resolve_paths(spec: str, tokenizer: str = "", cache_dir: str = "", field: str = "data.train_paths",
                  workers: int = 1) -> list[str]:
    """Comma-separated `.bin/.idx` prefixes or Pile-format files (globs allowed, one dataset per entry)
    -> prefixes, preprocessing text inputs into the cache on first use."""
    from neox_jax.data.preprocess import is_text_input, prepare_dataset

    prefixes = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if indexed.exists(indexed.strip_suffix(entry)):
            prefixes.append(indexed.strip_suffix(entry))
        elif is_text_input(entry):
            prefixes.append(prepare_dataset(entry, tokenizer or None, cache_dir or None, workers=workers))
        else:
            raise ValueError(f"{field}: {entry!r} is neither a .bin/.idx prefix (no {indexed.strip_suffix(entry)}.idx"
                             f" and .bin) nor a Pile-format file (.jsonl, .jsonl.zst, .jsonl.gz, .txt)")
    if not prefixes:
        raise ValueError(f"{field}: no datasets given")
    return prefixes


def parse_weights(spec: str, count: int) -> list[float]:
    if not spec.strip():
        return [1.0] * count
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ValueError(f"data.train_weights: {spec!r} is not a comma-separated list of numbers") from None
    if len(weights) != count:
        raise ValueError(f"data.train_weights has {len(weights)} weights for {count} datasets in data.train_paths")
    if any(not w > 0 for w in weights):
        raise ValueError(f"data.train_weights: every weight must be positive, got {spec!r}")
    return weights


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def _train_spec(config) -> str:
    from neox_jax.data import default_paths

    return config.data.train_paths or default_paths()["train"]


def make_train_iterator(config, process_index: int | None = None, process_count: int | None = None,
                        start: int = 0) -> TrainIterator:
    """The training batches of this process, from global batch `start` (or call `set_state` afterwards)."""
    d = config.data
    prefixes = resolve_paths(_train_spec(config), d.tokenizer, d.cache_dir)
    weights = parse_weights(d.train_weights, len(prefixes))
    process_index, process_count = _process(process_index, process_count)
    return TrainIterator(prefixes, weights, seq_len=config.train.seq_len, global_batch=config.train.batch_size,
                         seed=config.train.seed, process_index=process_index, process_count=process_count,
                         workers=d.workers, start_batch=start)


def make_val_batches(config, process_index: int | None = None, process_count: int | None = None,
                     num_batches: int | None = None) -> ValBatches | None:
    """`train.eval_batches` fixed validation batches, or None when there is no validation set
    (data.val_paths empty while data.train_paths names custom data)."""
    from neox_jax.data import default_paths

    d = config.data
    spec = d.val_paths or ("" if d.train_paths else default_paths()["val"])
    if not spec:
        return None
    prefixes = resolve_paths(spec, d.tokenizer, d.cache_dir, field="data.val_paths")
    process_index, process_count = _process(process_index, process_count)
    return ValBatches(prefixes, seq_len=config.train.seq_len, global_batch=config.train.batch_size,
                      num_batches=num_batches if num_batches is not None else config.train.eval_batches,
                      process_index=process_index, process_count=process_count)
