"""GPT-NeoX's training sample order (`megatron/data/gpt2_dataset.py`, `pack_impl="packed"`), rebuilt.

For one dataset (a .bin/.idx pair, or a contiguous range of its documents), N requested samples of
`seq_len` L and a seed:

- Epochs E = the fewest with (E x T - 1) // L >= N, T = tokens of the documents (the order depends on N
  only through E).
- One `numpy.random.RandomState(seed)`. doc_idx = the document ids repeated E times (int32), shuffled once,
  so epochs intermix.
- The documents concatenated in doc_idx order form one stream; window i = stream[i L : i L + L + 1]
  (consecutive windows share a token, windows cross documents, nothing is padded), M = (E x T - 1) // L
  windows. sample_idx[i] = (position in doc_idx, offset) of token i L: an [M + 1, 2] array.
- shuffle_idx = arange(M) (uint32; int64 from 2^32 - 1 on), shuffled by the same generator after doc_idx.
  Sample k = window shuffle_idx[k]. The dataset holds M - 1 samples (GPT-NeoX's `__len__`).

Several weighted datasets each get ceil(N x w x 1.005) samples (w normalised) and are interleaved by
`build_blending_indices`: sample j of the blend comes from the dataset whose count lags its quota
w_d x max(j, 1) the most (first dataset on ties), over Σ (M_d - 1) samples. A `split` such as "969,30,1"
cuts one dataset's documents into contiguous train / valid / test ranges (`get_train_valid_test_split_`).

The arrays are built vectorised (numpy for the index arrays; the blend's inherently sequential greedy runs
as one `lax.scan` on the CPU) and cached beside the data under GPT-NeoX's own file names
(`<prefix>_<name>_indexmap_<N>ns_<L>sl_<seed>s_packedpi_ac_{doc,sample,shuffle}_idx.npy`), so files either
side built are used by the other. Writes are atomic; loads are memory maps.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Sequence

import numpy as np

from neox_jax import errors, files
from neox_jax.config import split_proportions
from neox_jax.data import indexed

BLEND_FACTOR = 1.005  # GPT-NeoX asks each blended dataset for 0.5% more than its share
_INDEX_KINDS = ("doc", "sample", "shuffle")
_CHUNK = 1 << 18  # documents per vectorised step: their stream positions (2 MiB) stay in cache


class OrderError(errors.InputError):
    """A dataset or request GPT-NeoX's order cannot be built for; the message names the file or field."""


# ---- the rules -------------------------------------------------------------------------------------------

def split_bounds(spec: str, num_docs: int) -> list[int]:
    """GPT-NeoX's `split` ("969,30,1") -> document bounds [0, a, b, num_docs] of train / valid / test."""
    bounds = [0]
    for p in split_proportions(spec):
        bounds.append(bounds[-1] + int(round(p * float(num_docs))))
    excess = bounds[-1] - num_docs  # rounding: the last bounds move, as GPT-NeoX's do
    return [0] + [b - excess for b in bounds[1:]]


def num_epochs(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """The fewest epochs E >= 1 with (E x tokens - 1) // seq_len >= num_samples."""
    return max(1, -(-(num_samples * seq_len + 1) // tokens_per_epoch))


def blended_num_samples(weights: Sequence[float], num_samples: int) -> tuple[list[float], list[int]]:
    """(normalised weights, samples asked of each dataset) as GPT-NeoX computes them for weighted paths."""
    total = sum(weights)
    weights = [w / total for w in weights]
    return weights, [int(math.ceil(num_samples * w * BLEND_FACTOR)) for w in weights]


def shuffled_documents(sizes: np.ndarray, documents: tuple[int, int], epochs: int,
                       rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """doc_idx: the document ids [start, stop) repeated `epochs` times as int32, shuffled; and their sizes in
    that order (both strided views of one array). Ids and sizes are shuffled together as one 8-byte record:
    RandomState.shuffle draws the same swaps for any item size (they depend on the length alone), and this
    spares a random gather of the sizes."""
    count = documents[1] - documents[0]
    pairs = np.empty(epochs * count, dtype=[("doc", "<i4"), ("size", "<i4")])
    for e in range(epochs):
        pairs["doc"][e * count:(e + 1) * count] = np.arange(*documents, dtype=np.int32)
        pairs["size"][e * count:(e + 1) * count] = sizes[documents[0]:documents[1]]
    rng.shuffle(pairs)
    return pairs["doc"], pairs["size"]


def _sample_idx_dtype(epochs: int, tokens_per_epoch: int, seq_len: int):
    # GPT-NeoX decides on the unrounded sample count
    return np.int32 if 2 * ((epochs * tokens_per_epoch - 1) / seq_len + 1) < np.iinfo(np.int32).max else np.int64


def build_sample_idx(lengths: np.ndarray, seq_len: int, dtype=np.int64) -> np.ndarray:
    """[M + 1, 2] for documents of these lengths (in doc_idx order) concatenated into one stream: for window i,
    the position in doc_idx of the document holding token i x seq_len, and that token's offset in it (the loop
    of GPT-NeoX's helpers.cpp). One pass over the documents in cache-sized chunks. Document j ends at stream
    position e_j and holds the starts of windows [ceil(e_(j-1) / L), ceil(e_j / L)), so the document of window i
    is the number of documents with ceil(e_j / L) <= i: a histogram of those ceilings, summed up (linear, and 2x
    faster than a binary search per window)."""
    total = int(lengths.sum(dtype=np.int64))
    windows = (total - 1) // seq_len + 1  # M + 1 window starts
    sample_idx = np.empty((windows, 2), dtype)
    buffer = np.empty(_CHUNK + 1, np.int64)
    end = 0
    for a in range(0, len(lengths), _CHUNK):
        part = lengths[a:a + _CHUNK]
        starts = buffer[:len(part) + 1]  # stream position of each document of the chunk, then the chunk's end
        starts[0] = end
        np.cumsum(part, dtype=np.int64, out=starts[1:])
        starts[1:] += end
        first, end = -(-int(starts[0]) // seq_len), int(starts[-1])
        stop = min(-(-end // seq_len), windows)
        if stop <= first:
            continue
        ceilings = -(-starts[1:] // seq_len)  # empty documents share their neighbour's ceiling: never chosen
        doc = np.cumsum(np.bincount(ceilings - first, minlength=stop - first + 1)[:stop - first])
        tokens = np.arange(first, stop, dtype=np.int64) * seq_len
        sample_idx[first:stop, 0] = doc + a
        sample_idx[first:stop, 1] = tokens - starts[doc]
    sample_idx[0] = 0  # GPT-NeoX starts at (0, 0) even when the first document is empty
    return sample_idx


def build_shuffle_idx(size: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if size < np.iinfo(np.uint32).max - 1 else np.int64
    shuffle_idx = np.arange(size, dtype=dtype)
    rng.shuffle(shuffle_idx)
    return shuffle_idx


def build_index(sizes: np.ndarray, documents: tuple[int, int], num_samples: int, seq_len: int, seed: int):
    """doc_idx, sample_idx, shuffle_idx of GPT-NeoX's `_build_index_mappings` for documents [start, stop),
    yielded one at a time so a caller that writes and drops each holds at most two in memory."""
    tokens = int(sizes[documents[0]:documents[1]].sum(dtype=np.int64))
    epochs = num_epochs(tokens, seq_len, num_samples)
    rng = np.random.RandomState(seed)
    doc_idx, lengths = shuffled_documents(sizes, documents, epochs, rng)
    sample_idx = build_sample_idx(lengths, seq_len, _sample_idx_dtype(epochs, tokens, seq_len))
    del lengths
    yield doc_idx
    del doc_idx
    windows = len(sample_idx) - 1
    yield sample_idx
    del sample_idx
    yield build_shuffle_idx(windows, rng)


def blending_indices(weights: Sequence[float], size: int, rows: int = 1 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index uint8, dataset_sample_index int64) of GPT-NeoX's `build_blending_indices`.

    The greedy is sequential, so it runs as a `lax.scan` on the CPU in float64. The quotas w_d x max(j, 1)
    are multiplied here in numpy, so the scan only subtracts: XLA would fuse a multiply-subtract into an FMA
    and round differently from the C++ at exact ties (0.7 x 10 - 7 vs 0.3 x 10 - 3 at j = 10)."""
    import jax
    import jax.numpy as jnp

    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    if len(w) >= 255:
        raise OrderError(f"data.train_paths: {len(w)} datasets; GPT-NeoX's blend holds at most 254")
    dataset_index = np.empty(size, np.uint8)
    sample_index = np.empty(size, np.int64)
    try:
        cpu = jax.local_devices(backend="cpu")[0]
    except RuntimeError as e:
        raise OrderError("blending datasets in GPT-NeoX's order runs on JAX's CPU backend; add it to "
                          "JAX_PLATFORMS (e.g. JAX_PLATFORMS=cuda,cpu)") from e
    with jax.enable_x64(True), jax.default_device(cpu):
        counts, scan = jnp.zeros(len(w), jnp.int64), _blend_scan()
        for a in range(0, size, rows):
            x = np.maximum(np.arange(a, min(a + rows, size), dtype=np.float64), 1.0)
            counts, (d, s) = scan(counts, x[:, None] * w[None, :])
            dataset_index[a:a + len(x)] = d
            sample_index[a:a + len(x)] = s
    return dataset_index, sample_index


@functools.cache
def _blend_scan():
    import jax
    import jax.numpy as jnp

    def step(counts, quota):
        d = jnp.argmax(quota - counts.astype(jnp.float64))  # the first maximum, as the C++ keeps the first
        return counts.at[d].add(1), (d.astype(jnp.uint8), counts[d])

    return jax.jit(lambda counts, quotas: jax.lax.scan(step, counts, quotas))


# ---- cache -------------------------------------------------------------------------------------------------

def index_paths(base: str, name: str, num_samples: int, seq_len: int, seed: int) -> dict[str, str]:
    """GPT-NeoX's cache file names for a dataset at `base` (its prefix)."""
    stem = f"{base}_{name}_indexmap_{num_samples}ns_{seq_len}sl_{seed}s_packedpi_ac"
    return {k: f"{stem}_{k}_idx.npy" for k in _INDEX_KINDS}


def _save_atomic(path: str, array: np.ndarray) -> None:
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
        # .npy written in slices: 10x faster than np.save on a strided view
        header = {"descr": np.lib.format.dtype_to_descr(array.dtype), "fortran_order": False, "shape": array.shape}
        np.lib.format.write_array_header_1_0(f, header)
        for a in range(0, len(array), _CHUNK):
            f.write(np.ascontiguousarray(array[a:a + _CHUNK]).data)


def _load(paths: dict[str, str]) -> dict[str, np.ndarray] | None:
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    return {k: np.load(p, mmap_mode="r", allow_pickle=False) for k, p in paths.items()}


def load_or_build(paths: dict[str, str], sizes: np.ndarray, documents: tuple[int, int], num_samples: int,
                  seq_len: int, seed: int) -> dict[str, np.ndarray]:
    """The index arrays ("doc", "sample", "shuffle") from the cache files `paths` when their shapes fit these
    documents, else built, written atomically and then memory-mapped."""
    tokens = int(sizes[documents[0]:documents[1]].sum(dtype=np.int64))
    epochs = num_epochs(tokens, seq_len, num_samples)
    windows = (epochs * tokens - 1) // seq_len
    shapes = {"doc": (epochs * (documents[1] - documents[0]),), "sample": (windows + 1, 2), "shuffle": (windows,)}
    arrays = _load(paths)
    if arrays is None or any(arrays[k].shape != shapes[k] for k in _INDEX_KINDS):  # or a stale cache: other data
        for kind, array in zip(_INDEX_KINDS, build_index(sizes, documents, num_samples, seq_len, seed)):
            _save_atomic(paths[kind], array)
            del array  # before the next array is built
        arrays = _load(paths)
    return arrays


class NeoxSamples:
    """One dataset in GPT-NeoX's order: sample k = window shuffle_idx[k] of the doc_idx-ordered stream, as
    int32 [seq_len + 1]. Random access; pickles by path (grain worker processes reopen the memory maps)."""

    def __init__(self, prefix: str, name: str, num_samples: int, seq_len: int, seed: int,
                 documents: tuple[int, int] | None = None, cache_dir: str = ""):
        self.data = indexed.IndexedDataset(prefix)
        self.name, self.num_samples, self.seq_len, self.seed = name, int(num_samples), int(seq_len), int(seed)
        self.documents = tuple(int(x) for x in documents) if documents else (0, len(self.data))
        self.cache_dir = cache_dir
        tokens = int(self.data.sizes[self.documents[0]:self.documents[1]].sum(dtype=np.int64))
        if tokens < 2:
            raise OrderError(f"{self.data.prefix}: documents [{self.documents[0]}, {self.documents[1]}) hold "
                             f"{tokens} tokens; GPT-NeoX's order needs at least 2")
        self.epochs = num_epochs(tokens, self.seq_len, self.num_samples)
        self.paths = index_paths(indexed.writable_prefix(self.data.prefix, cache_dir), name, self.num_samples,
                                 self.seq_len, self.seed)
        arrays = load_or_build(self.paths, self.data.sizes, self.documents, self.num_samples, self.seq_len, seed)
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[k] for k in _INDEX_KINDS)

    def __len__(self) -> int:
        return len(self.shuffle_idx) - 1  # GPT-NeoX's __len__: one fewer than the windows

    def __getitem__(self, k: int) -> np.ndarray:
        if k >= len(self.shuffle_idx):  # a blend may ask for more: GPT-NeoX's IndexError fallback wraps it so
            k %= len(self)
        i = int(self.shuffle_idx[k])
        (first, start), (last, stop) = self.sample_idx[i], self.sample_idx[i + 1]
        if first == last:
            return self.data[int(self.doc_idx[first])][start:stop + 1].astype(np.int32)
        parts = [self.data[int(self.doc_idx[first])][start:]]
        parts += [self.data[int(d)] for d in self.doc_idx[first + 1:last]]
        parts.append(self.data[int(self.doc_idx[last])][:stop + 1])
        return np.concatenate(parts).astype(np.int32)

    def state(self) -> dict:
        """What a resumed run must match: the epochs and documents fix the order."""
        return {"order": "gpt_neox", "epochs": [self.epochs], "documents": [list(self.documents)]}

    def __getstate__(self):
        return (self.data.prefix, self.name, self.num_samples, self.seq_len, self.seed, self.documents,
                self.cache_dir)

    def __setstate__(self, state):
        self.__init__(*state)

    def __repr__(self):
        return (f"NeoxSamples({self.data.prefix!r}, {self.name}, samples={len(self)}, epochs={self.epochs}, "
                f"seq_len={self.seq_len}, seed={self.seed})")


class BlendedSamples:
    """GPT-NeoX's BlendableDataset: sample k = sample dataset_sample_index[k] of dataset dataset_index[k].
    The blend indices are cached beside the first dataset, named by a hash of the weights and sizes."""

    def __init__(self, parts: Sequence[NeoxSamples], weights: Sequence[float]):
        self.parts, self.weights = list(parts), [float(w) for w in weights]
        size = sum(len(p) for p in self.parts)
        key = hashlib.blake2b(repr((self.weights, [len(p) for p in self.parts])).encode(), digest_size=8).hexdigest()
        base = indexed.writable_prefix(self.parts[0].data.prefix, self.parts[0].cache_dir)
        paths = {k: f"{base}_blend_{key}_{k}.npy" for k in ("dataset_index", "dataset_sample_index")}
        arrays = _load(paths)
        if arrays is None or len(arrays["dataset_index"]) != size:
            for k, array in zip(paths, blending_indices(self.weights, size)):
                _save_atomic(paths[k], array)
            arrays = _load(paths)
        self.dataset_index, self.sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, k: int) -> np.ndarray:
        return self.parts[int(self.dataset_index[k])][int(self.sample_index[k])]

    def state(self) -> dict:
        parts = [p.state() for p in self.parts]
        return {"order": "gpt_neox", "epochs": [e for p in parts for e in p["epochs"]],
                "documents": [r for p in parts for r in p["documents"]]}

    def __getstate__(self):
        return self.parts, self.weights

    def __setstate__(self, state):
        self.__init__(*state)
