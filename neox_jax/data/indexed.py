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
PARTIAL_BIN, PARTIAL_SIZES = ".bin.partial", ".sizes.partial"  # a resumable writer's unfinished files
COPY_BLOCK = 1 << 24  # bytes of a .bin read or hashed at a time
SIZES_BLOCK = 1 << 22  # index entries handled at a time (16-32 MiB)


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


def read_header(idx_path: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequences N, doc_idx entries D) of an .idx, checked: the magic, version, dtype code and that
    the file is long enough for what its header says."""
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
    want = _HEADER.size + 4 * n + 8 * n + 8 * d
    if os.path.getsize(idx_path) < want:
        raise IndexedFormatError(f"{idx_path}: truncated ({os.path.getsize(idx_path)} bytes, "
                                 f"header says {n} sequences and {d} doc_idx entries = {want} bytes)")
    return np.dtype(DTYPE_CODES[code]), n, d


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
        self.dtype, n, d = read_header(idx_path)
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
    """Context manager writing one .bin/.idx pair atomically, in memory that stays flat whatever its size.

        with IndexedWriter(prefix, np.uint16) as w:
            w.add(ids)          # one document
    On an exception nothing is left behind; on success both files appear under their final names. Tokens go to
    the .bin and each document's length to a sidecar file as they come; the .idx is written from the sidecar at the
    end, and both files' SHA-256 are computed on the way (`sha256`), so nothing is read back.

    partial=True: the unfinished files have fixed names (`PREFIX.bin.partial`, `PREFIX.sizes.partial`) that outlive
    a killed process: `checkpoint()` makes what was added so far durable and returns the state that
    `IndexedWriter(..., resume=state)` continues from (data/preprocess.py's --resume); `keep=True` before an
    exception leaves them in place.
    """

    def __init__(self, prefix: str, dtype, partial: bool = False, resume: dict | None = None):
        self.prefix = strip_suffix(os.fspath(prefix))
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code (use uint16 or int32)")
        self.partial, self.resume, self.keep = partial or resume is not None, resume, False
        self.num_docs = self.num_tokens = 0
        self.sha256: dict[str, str] = {}

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(folder, exist_ok=True)
        if self.partial:
            self._tmp_bin, self._tmp_sizes = self.prefix + PARTIAL_BIN, self.prefix + PARTIAL_SIZES
            if self.resume is None:
                open(self._tmp_bin, "wb").close()
                open(self._tmp_sizes, "wb").close()
        else:
            for suffix in (".bin", ".sizes"):
                fd, path = files.temp_beside(self.prefix + suffix)
                os.close(fd)
                setattr(self, "_tmp_" + suffix[1:], path)
        self._bin_hash = hashlib.sha256()
        try:
            if self.resume is not None:
                self._truncate_to(int(self.resume["documents"]), int(self.resume["tokens"]))
            self._bin, self._sizes = open(self._tmp_bin, "ab"), open(self._tmp_sizes, "ab")
        except BaseException:
            self._remove_temps()
            raise
        return self

    def _truncate_to(self, docs: int, tokens: int) -> None:
        """Cut the partial files back to a checkpoint's state (what a killed run wrote after it is dropped) and hash
        the tokens kept."""
        want = {self._tmp_bin: tokens * self.dtype.itemsize, self._tmp_sizes: docs * 4}
        for path, size in want.items():
            have = os.path.getsize(path) if os.path.isfile(path) else -1
            if have < size:
                raise IndexedFormatError(f"{path}: {max(have, 0)} bytes, but the recorded progress needs {size}: "
                                         "the partial files are not those of that progress; start over without "
                                         "--resume")
            os.truncate(path, size)
        with open(self._tmp_bin, "rb") as f:
            for block in iter(lambda: f.read(COPY_BLOCK), b""):
                self._bin_hash.update(block)
        self.num_docs, self.num_tokens = docs, tokens

    def _write_tokens(self, data: bytes) -> None:
        self._bin.write(data)
        self._bin_hash.update(data)

    def _write_sizes(self, sizes: np.ndarray) -> None:
        if sizes.size and sizes.max() > np.iinfo(np.int32).max:
            raise ValueError(f"{self.prefix}: a document has {sizes.max()} tokens, more than an int32 size holds")
        self._sizes.write(sizes.astype(np.int32).tobytes())
        self.num_docs += sizes.size
        self.num_tokens += int(sizes.sum(dtype=np.int64))

    def add(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"{self.prefix}: token id {int(arr.max())} does not fit {self.dtype}")
        self._write_tokens(arr.astype(self.dtype, copy=False).tobytes())
        self._write_sizes(np.array([arr.size], np.int64))

    def add_many(self, flat_ids: np.ndarray, lengths) -> None:
        """Several documents at once: their ids concatenated, and the length of each."""
        self._write_tokens(np.asarray(flat_ids).astype(self.dtype, copy=False).tobytes())
        self._write_sizes(np.asarray(lengths, np.int64))

    def append_pair(self, prefix: str) -> None:
        """Append a whole .bin/.idx pair of this dtype (a merge: GPT-NeoX's merge_file_), streamed a block at a
        time: its documents follow those added so far."""
        prefix = strip_suffix(os.fspath(prefix))
        dtype, n, _ = read_header(prefix + ".idx")
        if dtype != self.dtype:
            raise IndexedFormatError(f"{prefix}.idx: tokens of {dtype.name}, but {self.prefix} is {self.dtype.name} "
                                     "(pairs tokenized with vocabularies of other sizes cannot be merged)")
        tokens_before = self.num_tokens
        with open(prefix + ".idx", "rb") as f:
            f.seek(_HEADER.size)
            for start in range(0, n, SIZES_BLOCK):
                self._write_sizes(np.fromfile(f, np.int32, min(SIZES_BLOCK, n - start)).astype(np.int64))
        copied = 0
        with open(prefix + ".bin", "rb") as f:
            for block in iter(lambda: f.read(COPY_BLOCK), b""):
                self._write_tokens(block)
                copied += len(block)
        if copied != (self.num_tokens - tokens_before) * self.dtype.itemsize:
            raise IndexedFormatError(f"{prefix}.bin: {copied} bytes, but {prefix}.idx describes "
                                     f"{(self.num_tokens - tokens_before) * self.dtype.itemsize}; the two files are "
                                     "not one pair")

    def checkpoint(self) -> dict:
        """Make everything added so far durable; returns the state `resume=` continues from."""
        for f in (self._bin, self._sizes):
            f.flush()
            os.fsync(f.fileno())
        return {"documents": self.num_docs, "tokens": self.num_tokens}

    def __exit__(self, exc_type, exc, tb):
        try:
            self._bin.close()
            self._sizes.close()
            if exc_type is None:
                fd, tmp_idx = files.temp_beside(self.prefix + ".idx")
                os.close(fd)
                try:
                    self._write_index(tmp_idx)
                    self.sha256["bin"] = self._bin_hash.hexdigest()
                    files.publish(self._tmp_bin, self.prefix + ".bin")
                    files.publish(tmp_idx, self.prefix + ".idx")
                finally:
                    if os.path.exists(tmp_idx):
                        os.remove(tmp_idx)
        finally:
            if exc_type is None or not self.keep:
                self._remove_temps()
        return False

    def _remove_temps(self) -> None:
        for p in (self._tmp_bin, self._tmp_sizes):
            if os.path.exists(p):
                os.remove(p)

    def _write_index(self, path: str) -> None:
        """The .idx from the sizes sidecar, a block at a time, hashed as it is written."""
        n, itemsize, h = self.num_docs, self.dtype.itemsize, hashlib.sha256()

        def blocks(values):  # every section in blocks of SIZES_BLOCK entries
            for start in range(0, n, SIZES_BLOCK):
                yield values(start, min(SIZES_BLOCK, n - start))

        with open(self._tmp_sizes, "rb") as sizes, open(path, "wb") as out:
            def put(data: bytes):
                out.write(data)
                h.update(data)

            put(_HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], n, n + 1))
            for block in blocks(lambda start, count: np.fromfile(sizes, np.int32, count)):
                put(block.tobytes())
            sizes.seek(0)
            offset = 0
            for block in blocks(lambda start, count: np.fromfile(sizes, np.int32, count)):
                ends = np.cumsum(block, dtype=np.int64)
                put(((ends - block + offset) * itemsize).tobytes())
                offset += int(ends[-1])
            for block in blocks(lambda start, count: np.arange(start, start + count, dtype=np.int64)):
                put(block.tobytes())
            put(np.array([n], np.int64).tobytes())
        self.sha256["idx"] = h.hexdigest()


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
