"""The training pipeline: grain `MapDataset`s over GPT-NeoX `.bin/.idx` token files.

Three sample orders (`data.order`):
- "grain" (default): each dataset's token stream (documents back to back, EOD after each) is cut into windows
  of `seq_len + 1` tokens that overlap by one token, as GPT-NeoX does (window i starts at token i * seq_len).
  Per dataset the windows are shuffled by seed, differently in each epoch, and repeated without end; the
  datasets are mixed in proportion to their weights (grain's deterministic proportional mix).
- "gpt_neox": GPT-NeoX's own order, sample for sample (`neox_index`): the same files, seed, seq_len, global
  batch and number of training samples give GPT-NeoX's sample k as sample k.
- "sequential": documents in stored order, each one training sequence of `seq_len + 1` tokens (Pythia's
  pre-shuffled Pile: batch k = sequences [k * 1024, (k + 1) * 1024)).
Sample k of an order is a pure function of (datasets, weights, seed, k), and global batch n is samples
[n * B, (n + 1) * B). Process p of P takes rows [p * B / P, (p + 1) * B / P) of each global batch.

The iterator's state is the number of samples consumed globally, so restoring it on any number of
processes (or with more grain workers) continues the same global sequence exactly.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Iterator, Sequence

import numpy as np
from absl import flags

from neox_jax import config as cfg
from neox_jax import errors
from neox_jax.data import default_paths, indexed, neox_index
from neox_jax.data.documents import is_text_input
from neox_jax.data.preprocess import prepare_dataset

STATE_VERSION = 1


class ResumeError(errors.RunFailure, ValueError):
    """A checkpoint's data-iterator state does not fit this run's data config (exit 1, as a checkpoint that does
    not fit the model config)."""


class TokenWindows:
    """grain random-access source: window i = tokens[i*seq_len : i*seq_len + seq_len + 1] as int32."""

    def __init__(self, prefix: str, seq_len: int):
        self.data = indexed.IndexedDataset(prefix)
        self.seq_len = int(seq_len)
        self._len = (self.data.num_tokens - 1) // self.seq_len
        if self._len < 1:
            raise errors.InputError(f"dataset {self.data.prefix} has {self.data.num_tokens} tokens, fewer than "
                                    f"train.seq_len + 1 = {self.seq_len + 1}")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(i) * self.seq_len
        return self.data.tokens[start:start + self.seq_len + 1].astype(np.int32)

    def __repr__(self):
        return f"TokenWindows({self.data.prefix!r}, seq_len={self.seq_len}, windows={self._len})"


class SequentialSamples:
    """grain random-access source: sample k = document k of the datasets in order (then the next dataset's),
    each exactly `seq_len + 1` tokens, as int32. Pythia's pre-shuffled Pile is stored this way."""

    def __init__(self, prefixes: Sequence[str], seq_len: int):
        self.parts = [indexed.IndexedDataset(p) for p in prefixes]
        for part in self.parts:
            wrong = np.flatnonzero(part.sizes != seq_len + 1)
            if len(wrong):
                raise errors.InputError(
                    f"{part.prefix}.idx: document {wrong[0]} has {part.sizes[wrong[0]]} tokens; data.order="
                    f"'sequential' reads each document as one training sequence of train.seq_len + 1 = "
                    f"{seq_len + 1} tokens")
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> np.ndarray:
        part = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.parts[part][int(k) - int(self.starts[part])].astype(np.int32)

    def state(self) -> dict:
        return {"order": "sequential"}


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


def cycled(order, global_batch: int):
    """A finite order repeated without end over its whole global batches (as GPT-NeoX's loader cycles)."""
    import grain

    usable = len(order) // global_batch * global_batch
    if not usable:
        raise errors.InputError(f"the {order.state()['order']} order holds {len(order)} samples, fewer than one "
                                f"global batch of train.batch_size={global_batch}")
    return grain.MapDataset.source(order)[:usable].repeat()


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise errors.InputError(
            f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def _rows_of_process(ds, start: int, global_batch: int, process_index: int, process_count: int):
    """Batches of this process: its rows of global batches starting at sample `start`."""
    local = local_batch_size(global_batch, process_count)
    return ds[start:].batch(local, drop_remainder=True)[process_index::process_count].map(_as_batch)


def die_with_parent(worker_index: int = 0, worker_count: int = 1, *, parent_pid: int | None = None,
                    poll_secs: float = 0.5) -> None:
    """grain worker initialiser: the worker exits within `poll_secs` of its parent's death (kill -9 included),
    instead of lingering for minutes with its buffers (and keeping multiprocessing's resource tracker alive).
    A thread watches the parent pid: PR_SET_PDEATHSIG would fire when the parent *thread* that started the worker
    ends, and grain starts workers from threads of its own. `parent_pid` is the trainer's pid, bound before the
    worker is spawned: a worker still importing when its parent dies is already re-parented when this runs, and
    must exit at once rather than watch its new parent."""
    parent = os.getppid() if parent_pid is None else parent_pid

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_secs)
        os._exit(0)

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, name="neox_jax-die-with-parent", daemon=True).start()


class TrainIterator:
    """Iterator over this process's training batches, {"tokens": int32 [B / P, seq_len + 1]}.

    `order`: a random-access source of the global sample order (neox_index.NeoxSamples / BlendedSamples,
    SequentialSamples) in place of the grain mix of `prefixes`. `get_state()` is a small JSON-able dict keyed
    by global position; `set_state()` continues from it.
    """

    def __init__(self, prefixes: Sequence[str], weights: Sequence[float], *, seq_len: int, global_batch: int,
                 seed: int, process_index: int = 0, process_count: int = 1, workers: int = 0,
                 read_threads: int = 2, prefetch: int = 4, start_batch: int = 0, order=None):
        self.prefixes = list(prefixes)
        self.weights = [float(w) for w in weights]
        self.seq_len, self.global_batch, self.seed = int(seq_len), int(global_batch), int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        local_batch_size(self.global_batch, self.process_count)
        self.workers, self.read_threads, self.prefetch = int(workers), int(read_threads), int(prefetch)
        if order is None:
            self._mixture = mixture(self.prefixes, self.seq_len, self.seed, self.weights)
            self.order = {"order": "grain"}
        else:
            self._mixture, self.order = cycled(order, self.global_batch), order.state()
        self.samples = int(start_batch) * self.global_batch
        self._it = None
        self._fingerprints = None

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
            if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; scripts may not use absl
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers),
                                worker_init_fn=functools.partial(die_with_parent, parent_pid=os.getpid()))
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
    def fingerprints(self) -> list[dict]:
        """indexed.fingerprint of each training dataset, taken once (a checkpoint records them)."""
        if self._fingerprints is None:
            self._fingerprints = [indexed.fingerprint(p) for p in self.prefixes]
        return self._fingerprints

    def get_state(self) -> dict:
        return {"version": STATE_VERSION, "samples": self.samples, "seed": self.seed, "seq_len": self.seq_len,
                "datasets": [os.path.basename(p) for p in self.prefixes], "weights": self.weights,
                "order": self.order, "fingerprints": self.fingerprints()}

    def set_state(self, state: dict, allow_changed_data: bool = False) -> None:
        """Continue from `state`; refused (ResumeError) when it was saved for other data settings, or, unless
        `allow_changed_data`, when a dataset's files changed since (states saved before fingerprints: unchecked)."""
        mine = self.get_state()
        state = {"order": {"order": "grain"}, **state}  # states saved before data.order existed
        for key, field in (("seq_len", "train.seq_len"), ("seed", "train.seed"),
                           ("datasets", "data.train_paths"), ("weights", "data.train_weights"),
                           ("order", "data.order, data.split and data.num_samples")):
            if state.get(key) != mine[key]:
                hint = ("; the gpt_neox order depends on the number of samples through its epochs: pin "
                        "data.num_samples to the first run's train.steps x train.batch_size"
                        if key == "order" and state[key]["order"] == mine[key]["order"] == "gpt_neox"
                        and state[key].get("epochs") != mine[key].get("epochs") else "")
                raise ResumeError(f"data iterator state was saved with {field} giving {key}={state.get(key)!r}, "
                                 f"this run has {mine[key]!r}; the data order cannot be resumed exactly{hint}")
        for prefix, old, new in zip(self.prefixes, state.get("fingerprints") or [], mine["fingerprints"]):
            changed = [k for k in indexed.CONTENT_KEYS if old.get(k) != new.get(k)]
            if changed and not allow_changed_data:
                what = ", ".join(changed)
                raise ResumeError(f"data.train_paths: {prefix} changed since the checkpoint was saved ({what} "
                                  "differ); resuming would go on with other tokens. Put the files back, or pass "
                                  "--config.data.allow_changed_data=true to resume on the new ones")
        samples = int(state["samples"])
        self.close()
        self.samples = samples


class ValBatches:
    """The first `num_batches` global batches of a random-access source of samples (by default the validation
    files' windows in stored order), the same on every pass; iterate it any number of times."""

    def __init__(self, prefixes: Sequence[str], *, seq_len: int, global_batch: int, num_batches: int,
                 process_index: int = 0, process_count: int = 1, source=None):
        import grain

        if source is None:
            parts = [grain.MapDataset.source(TokenWindows(p, seq_len)) for p in prefixes]
            windows = parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
        else:
            windows = grain.MapDataset.source(source)
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
    prefixes = []
    for entry in cfg.path_entries(spec):
        if indexed.resolve_prefix(entry):
            prefixes.append(indexed.resolve_prefix(entry))
        elif is_text_input(entry):
            try:
                prefixes.append(prepare_dataset(entry, tokenizer or None, cache_dir or None, workers=workers))
            except (errors.UserError, FileNotFoundError) as e:
                raise errors.InputError(f"{field}: {e}") from e
        else:
            p = indexed.strip_suffix(entry)
            raise errors.InputError(
                f"{field}: {entry!r} is neither a .bin/.idx prefix (no {p}.idx and .bin, nor GPT-NeoX's "
                f"{p}{indexed.NEOX_SUFFIX}.idx and .bin) nor a Pile-format file (.jsonl, .jsonl.zst, .jsonl.gz, .txt)")
    if not prefixes:
        raise errors.InputError(f"{field}: no datasets given")
    return prefixes


def run_datasets(config, spec: str, field: str) -> list[str]:
    """The prefixes of a run's `spec` (resolve_paths), each opened and its token ids checked against
    `model.vocab_size` (an id the embedding lacks makes every loss NaN). Every process checks for itself, so
    all of them stop with the same line; the scan is cached beside the data (indexed.token_range)."""
    d = config.data
    prefixes = resolve_paths(spec, d.tokenizer, d.cache_dir, field=field)
    for prefix in prefixes:
        try:
            data = indexed.IndexedDataset(prefix)
        except indexed.IndexedFormatError as e:
            raise indexed.IndexedFormatError(f"{field}: {e}") from None
        if not data.num_tokens:
            raise indexed.IndexedFormatError(f"{field}: dataset {prefix} holds no tokens ({len(data)} documents)")
        indexed.check_token_ids(data, config.model.vocab_size, d.cache_dir, field)
    return prefixes


def tokenizes_text(config) -> bool:
    """Whether the run tokenizes text on the fly (the bundled sample, or Pile-format files in its paths): only
    then does the tokenizer have to fit the model (pre-tokenized data is checked by its ids instead)."""
    d = config.data
    return not d.train_paths or any(is_text_input(e) for spec in (d.train_paths, d.val_paths)
                                    for e in cfg.path_entries(spec))


def _process(process_index, process_count):
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return process_index, process_count


def train_spec(config) -> str:
    """data.train_paths, or the bundled sample where the config asks for it (data.bundled_sample); a config with
    neither is one ConfigError saying how to point it at data."""
    d = config.data
    if d.train_paths:
        return d.train_paths
    if d.bundled_sample:
        return default_paths()["train"]
    raise errors.InputError(
        "config field data.train_paths: empty, and this config does not train on the bundled 6 MB sample; point it "
        "at your data with --config.data.train_paths=PREFIX (a .bin/.idx prefix from scripts/preprocess_data.py, "
        "or .jsonl.zst files; README, \"Data\": getting and tokenizing the Pile), or try the config on the sample "
        "with --config.data.bundled_sample=true")


def num_samples(config) -> int:
    """N, the training samples the gpt_neox order is built for: GPT-NeoX's train_iters x train_batch_size."""
    return config.data.num_samples or config.train.steps * config.train.batch_size


def train_order(config, prefixes: Sequence[str], weights: Sequence[float]):
    """The random-access source of `data.order` (None for the grain mix). GPT-NeoX's index arrays are built
    (or loaded from their cache) here, by process 0 first when several processes share the files."""
    d, t = config.data, config.train
    if d.order == "grain":
        return None
    if d.order == "sequential":
        return SequentialSamples(prefixes, t.seq_len)
    if d.split:
        if len(prefixes) != 1:
            raise errors.InputError(f"data.split cuts one dataset into train/valid/test documents; "
                                    f"data.train_paths names {len(prefixes)}")
        train, _ = _split_ranges(prefixes[0], d.split)
        return _process_0_first(lambda: neox_index.NeoxSamples(prefixes[0], "train", num_samples(config), t.seq_len,
                                                               t.seed, train, d.cache_dir))
    weights, counts = neox_index.blended_num_samples(weights, num_samples(config))

    def build():
        parts = [neox_index.NeoxSamples(p, f"train_{i}", n, t.seq_len, t.seed, None, d.cache_dir)
                 for i, (p, n) in enumerate(zip(prefixes, counts))]
        return neox_index.BlendedSamples(parts, weights)

    return _process_0_first(build)


def _split_ranges(prefix: str, spec: str) -> tuple[tuple[int, int], tuple[int, int]]:
    bounds = neox_index.split_bounds(spec, len(indexed.IndexedDataset(prefix)))
    return (bounds[0], bounds[1]), (bounds[1], bounds[2])


def _process_0_first(build):
    """build() on process 0, then on the others (which find its cache when the files are shared). A bad-input error
    of process 0 is raised after the barrier, so the others do not wait for it until the heartbeat gives up: they
    build too and stop with the same line."""
    import jax

    if jax.process_count() == 1:
        return build()
    from jax.experimental import multihost_utils

    order, failure = None, None
    if jax.process_index() == 0:
        try:
            order = build()
        except errors.UserError as e:
            failure = e
    multihost_utils.sync_global_devices("neox_jax data order index")
    if failure is not None:
        raise failure
    return order if order is not None else build()


def make_train_iterator(config, process_index: int | None = None, process_count: int | None = None,
                        start: int | None = None) -> TrainIterator:
    """The training batches of this process, from global batch `start` (default data.start_batch; or call
    `set_state` afterwards)."""
    d = config.data
    prefixes = run_datasets(config, train_spec(config), "data.train_paths")
    weights = cfg.mixing_weights(d.train_weights, len(prefixes))
    order = train_order(config, prefixes, weights)
    process_index, process_count = _process(process_index, process_count)
    return TrainIterator(prefixes, weights, seq_len=config.train.seq_len, global_batch=config.train.batch_size,
                         seed=config.train.seed, process_index=process_index, process_count=process_count,
                         workers=d.workers, start_batch=d.start_batch if start is None else start, order=order)


def steps_batches(config, steps: Sequence[int]) -> Iterator[tuple[int, np.ndarray]]:
    """(step, int32 [train.batch_size, seq_len + 1]) for the given training steps of a run of `config`: the
    whole global batch (every process's rows) that train step `step` consumes, i.e. global batch
    data.start_batch + step of the run's order. A checkpoint at step N was trained on steps 0 .. N - 1."""
    it = make_train_iterator(config, 0, 1)
    batches = it.local_batches(it.samples)
    for step in steps:
        yield step, batches[step]["tokens"]


def make_val_batches(config, process_index: int | None = None, process_count: int | None = None,
                     num_batches: int | None = None) -> ValBatches | None:
    """`train.eval_batches` fixed validation batches, or None when there is no validation set
    (data.val_paths empty while data.train_paths names custom data, or an empty valid split).

    With the gpt_neox order and a `data.split`, they are the first batches of GPT-NeoX's valid dataset
    (its documents in GPT-NeoX's order, built for (train_iters // eval_every + 1) x eval_batches batches)."""
    d, t = config.data, config.train
    process_index, process_count = _process(process_index, process_count)
    num_batches = t.eval_batches if num_batches is None else num_batches
    kw = dict(seq_len=t.seq_len, global_batch=t.batch_size, num_batches=num_batches,
              process_index=process_index, process_count=process_count)
    if d.order == "gpt_neox" and d.split:
        prefix = run_datasets(config, train_spec(config), "data.train_paths")[0]
        _, valid = _split_ranges(prefix, d.split)
        if valid[1] == valid[0]:
            return None
        evals = num_samples(config) // t.batch_size // max(t.eval_every, 1) + 1
        source = _process_0_first(lambda: neox_index.NeoxSamples(
            prefix, "valid", evals * t.eval_batches * t.batch_size, t.seq_len, t.seed, valid, d.cache_dir))
        return ValBatches([prefix], source=source, **kw)
    spec = d.val_paths or (default_paths()["val"] if d.bundled_sample and not d.train_paths else "")
    if not spec:
        return None
    return ValBatches(run_datasets(config, spec, "data.val_paths"), **kw)
