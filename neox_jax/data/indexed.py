"""Megatron / GPT-NeoX indexed token files: `PREFIX.bin` (tokens) + `PREFIX.idx` (index).

The `.idx` layout (little endian), byte-compatible with GPT-NeoX's `MMapIndexedDataset`:
  9 bytes magic b"MMIDIDX\\x00\\x00", uint64 version (1), uint8 dtype code,
  uint64 number of sequences N, uint64 length of doc_idx D,
  int32 sizes[N] (tokens per sequence), int64 pointers[N] (byte offset of each sequence in .bin),
  int64 doc_idx[D] (sequence index where each document starts, plus a final N).
We write one sequence per document, so doc_idx is 0..N. The `.bin` is the sequences back to back.

Writes are atomic: both files go to unique temporary names next to the target and are renamed when
complete, `.bin` first and `.idx` last, so an existing `.idx` means a whole pair.

The token ids a pair holds are checked against the model's vocabulary when a run opens it (`check_token_ids`):
an id the embedding does not have would make every loss NaN. The `.idx` dtype bounds the ids (uint8 data never
needs a scan); otherwise the `.bin` is scanned once and its smallest and largest id are cached beside it in
`PREFIX.ids.json`, keyed by the `.bin`'s size and modification time (a read-only data folder caches under
`data.cache_dir/index/`, as GPT-NeoX's index files do).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from neox_jax import errors, files

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes; only integer token types make sense here.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CODE_OF_DTYPE = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


class IndexedFormatError(errors.InputError):
    """A .bin/.idx pair that is missing, truncated, not in the MMIDIDX format, or holds ids the model lacks."""


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "neox_jax")


def writable_prefix(prefix: str, cache_dir: str = "") -> str:
    """Where files derived from a dataset go: beside it (GPT-NeoX's convention); a read-only data folder falls
    back to `cache_dir/index/`, under a name that keeps datasets with the same file name apart."""
    folder = os.path.dirname(os.path.abspath(prefix))
    if os.access(folder, os.W_OK):
        return prefix
    tag = hashlib.blake2b(os.path.abspath(prefix).encode(), digest_size=6).hexdigest()
    folder = os.path.join(cache_dir or default_cache_dir(), "index")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{os.path.basename(prefix)}-{tag}")


def token_dtype(vocab_size: int) -> np.dtype:
    """GPT-NeoX's choice: uint16 when every id fits with room to spare, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


def strip_suffix(path: str) -> str:
    """Accept PREFIX, PREFIX.bin or PREFIX.idx for a dataset."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")


# GPT-NeoX's preprocess_data.py writes `<output-prefix>_text_document.{bin,idx}` (its json key, then "document").
NEOX_SUFFIX = "_text_document"


def resolve_prefix(path: str) -> str | None:
    """The dataset prefix `path` names (PREFIX, PREFIX.bin or PREFIX.idx), also when it is the --output-prefix
    given to GPT-NeoX's preprocess_data.py, which wrote PREFIX_text_document; None when neither pair exists."""
    prefix = strip_suffix(os.fspath(path))
    for candidate in (prefix, prefix + NEOX_SUFFIX):
        if exists(candidate):
            return candidate
    return None


class IndexedDataset:
    """Read-only view of a .bin/.idx pair through numpy memory maps.

    `tokens` is the whole token stream (documents back to back), `sizes`/`pointers`/`doc_idx` the index.
    Pickles by path so it can be sent to grain worker processes without copying data.
    """

    def __init__(self, prefix: str):
        self.prefix = strip_suffix(os.fspath(prefix))
        self._open()

    def _open(self):
        idx_path, bin_path = self.prefix + ".idx", self.prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise IndexedFormatError(
                    f"{p}: not found (expected a GPT-NeoX .bin/.idx pair with prefix {self.prefix})")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MAGIC:
            raise IndexedFormatError(f"{idx_path}: not an MMIDIDX index (expected header {MAGIC!r}, got {head[:9]!r})")
        _, version, code, n, d = _HEADER.unpack(head)
        if version != VERSION:
            raise IndexedFormatError(f"{idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedFormatError(f"{idx_path}: dtype code {code} is not an integer token type "
                                     f"(expected one of {sorted(DTYPE_CODES)})")
        self.dtype = np.dtype(DTYPE_CODES[code])
        want = _HEADER.size + 4 * n + 8 * n + 8 * d
        if os.path.getsize(idx_path) < want:
            raise IndexedFormatError(f"{idx_path}: truncated ({os.path.getsize(idx_path)} bytes, "
                                     f"header says {n} sequences and {d} doc_idx entries = {want} bytes)")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(index, np.int32, n, _HEADER.size)
        self.pointers = np.frombuffer(index, np.int64, n, _HEADER.size + 4 * n)
        self.doc_idx = np.frombuffer(index, np.int64, d, _HEADER.size + 12 * n)
        self.num_tokens = int(self.sizes.sum(dtype=np.int64))
        bin_bytes, need = os.path.getsize(bin_path), self.num_tokens * self.dtype.itemsize
        if bin_bytes < need:
            raise IndexedFormatError(f"{bin_path}: truncated ({bin_bytes} bytes; the index needs {need})")
        if bin_bytes > need:
            raise IndexedFormatError(f"{bin_path}: {bin_bytes} bytes, but {idx_path} describes {need} "
                                     f"({self.num_tokens} tokens of {self.dtype.name}); the two files are not one "
                                     "pair (another dataset's .bin?) - preprocess the data again")
        expected = np.zeros(n, np.int64)
        np.cumsum(self.sizes[:-1], dtype=np.int64, out=expected[1:])
        if not np.array_equal(self.pointers, expected * self.dtype.itemsize):
            raise IndexedFormatError(f"{idx_path}: sequences are not stored back to back in the .bin")
        # a plain ndarray view of the map: slicing np.memmap objects costs a Python hook per slice
        self.tokens = (np.asarray(np.memmap(bin_path, dtype=self.dtype, mode="r", shape=(self.num_tokens,)))
                       if self.num_tokens else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sizes[i])]

    def __getstate__(self):
        return self.prefix

    def __setstate__(self, prefix):
        self.prefix = prefix
        self._open()

    def __repr__(self):
        return f"IndexedDataset({self.prefix!r}, docs={len(self)}, tokens={self.num_tokens}, dtype={self.dtype})"


_SAMPLE = 1 << 20  # bytes of the .bin hashed at each end


def fingerprint(prefix: str) -> dict:
    """What identifies a .bin/.idx pair's content, cheap at the Pile's scale: both sizes, the SHA-256 of the .idx
    (every document's length: a pair preprocessed again from other text differs there) and of the .bin's first and
    last MiB. Hashing the Pile's ~4 GB .idx takes seconds; its ~600 GB .bin is not read. Plus the SHA-256 of the
    pair's manifest when there is one (data/manifest.py): a checkpoint records it; a resume compares CONTENT_KEYS."""
    prefix = strip_suffix(os.fspath(prefix))
    idx_hash, bin_hash = hashlib.sha256(), hashlib.sha256()
    with open(prefix + ".idx", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            idx_hash.update(block)
    bin_bytes = os.path.getsize(prefix + ".bin")
    with open(prefix + ".bin", "rb") as f:
        bin_hash.update(f.read(_SAMPLE))
        f.seek(max(bin_bytes - _SAMPLE, 0))
        bin_hash.update(f.read(_SAMPLE))
    found = {"idx_bytes": os.path.getsize(prefix + ".idx"), "idx_sha256": idx_hash.hexdigest(), "bin_bytes": bin_bytes,
             "bin_ends_sha256": bin_hash.hexdigest()}
    if os.path.isfile(prefix + MANIFEST):  # recorded, not compared (CONTENT_KEYS): it names the run that made them
        with open(prefix + MANIFEST, "rb") as f:
            found["manifest_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return found


CONTENT_KEYS = ("idx_bytes", "idx_sha256", "bin_bytes", "bin_ends_sha256")  # what says the tokens changed
MANIFEST = ".manifest.json"  # data/manifest.py's file beside a pair


class IndexedWriter:
    """Context manager writing one .bin/.idx pair atomically.

        with IndexedWriter(prefix, np.uint16) as w:
            w.add(ids)          # one document
    On an exception nothing is left behind; on success both files appear under their final names.
    """

    def __init__(self, prefix: str, dtype):
        self.prefix = strip_suffix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code (use uint16 or int32)")
        self.sizes: list[int] = []
        self.num_tokens = 0

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        base = os.path.basename(self.prefix)
        fd, self._tmp_bin = files.temp_beside(os.path.join(folder, base + ".bin"))
        self._bin = os.fdopen(fd, "wb")
        fd, self._tmp_idx = files.temp_beside(os.path.join(folder, base + ".idx"))
        os.close(fd)
        return self

    def add(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"{self.prefix}: token id {int(arr.max())} does not fit {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes())
        self.sizes.append(arr.size)
        self.num_tokens += arr.size

    def add_many(self, flat_ids: np.ndarray, lengths) -> None:
        """Several documents at once: their ids concatenated, and the length of each."""
        self._bin.write(np.asarray(flat_ids).astype(self.dtype, copy=False).tobytes())
        self.sizes.extend(int(x) for x in lengths)
        self.num_tokens += int(np.sum(lengths))

    def __exit__(self, exc_type, exc, tb):
        try:
            self._bin.close()
            if exc_type is None:
                self._write_index()
                files.publish(self._tmp_bin, self.prefix + ".bin")
                files.publish(self._tmp_idx, self.prefix + ".idx")
        finally:
            for p in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(p):
                    os.remove(p)
        return False

    def _write_index(self):
        n = len(self.sizes)
        sizes = np.asarray(self.sizes, dtype=np.int64)
        if n and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a document has {sizes.max()} tokens, more than an int32 size holds")
        pointers = np.zeros(n, np.int64)
        np.cumsum(sizes[:-1], out=pointers[1:])
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            f.write(sizes.astype(np.int32).tobytes())
            f.write((pointers * self.dtype.itemsize).tobytes())
            f.write(np.arange(n + 1, dtype=np.int64).tobytes())


# ---- token ids against the vocabulary --------------------------------------------------------------------

_SCAN_TOKENS = 1 << 26  # tokens per min/max pass: 128 MiB of uint16 at a time
_IDS_VERSION = 1


def _scan_range(data: IndexedDataset) -> tuple[int, int]:
    lo, hi = np.iinfo(np.int64).max, -1
    for a in range(0, data.num_tokens, _SCAN_TOKENS):
        part = data.tokens[a:a + _SCAN_TOKENS]
        lo, hi = min(lo, int(part.min())), max(hi, int(part.max()))
    return (lo, hi) if data.num_tokens else (0, -1)


def token_range(data: IndexedDataset, cache_dir: str = "") -> tuple[int, int]:
    """(smallest, largest) token id of a pair, from its cache file when that matches the .bin, else scanned once
    (at the disk's read rate: 0.2 s per GB from the page cache) and cached. An empty pair gives (0, -1)."""
    bin_path = data.prefix + ".bin"
    stat = os.stat(bin_path)
    key = {"version": _IDS_VERSION, "bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}
    cache = writable_prefix(data.prefix, cache_dir) + ".ids.json"
    try:
        with open(cache) as f:
            stored = json.load(f)
        if {k: stored.get(k) for k in key} == key:
            return int(stored["min_id"]), int(stored["max_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing, stale or unreadable: scan again
    lo, hi = _scan_range(data)
    try:
        with files.atomic_path(cache) as tmp:
            tmp.write_text(json.dumps({**key, "min_id": lo, "max_id": hi}))
    except OSError:  # a cache that cannot be written costs a scan next time, nothing else
        pass
    return lo, hi


def check_token_ids(data: IndexedDataset, vocab_size: int, cache_dir: str = "", field: str = "data") -> None:
    """Refuse a pair holding an id outside [0, vocab_size) (the model's `model.vocab_size`), naming the file, the
    id and the vocabulary. The .idx dtype settles it without a scan when every id it can hold fits."""
    info = np.iinfo(data.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return
    lo, hi = token_range(data, cache_dir)
    bad = lo if lo < 0 else hi if hi >= vocab_size else None
    if bad is not None:
        raise IndexedFormatError(
            f"{field}: {data.prefix}.bin holds token id {bad}, outside the model's vocabulary of {vocab_size} ids "
            f"(model.vocab_size); the data was tokenized with another tokenizer, or set model.vocab_size > {hi}")
