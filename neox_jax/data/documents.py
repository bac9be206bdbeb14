"""Pile-format documents: the readers every other data module uses (a leaf: it imports no sibling module, only
neox_jax.errors).

Input: `.jsonl`, `.jsonl.zst`, `.jsonl.gz` with one `{"text": ..., "meta": {"pile_set_name": ...}}` a line, a
`.parquet` file (its `text` column, read a batch of rows at a time; a `meta` struct column gives the component), or
a plain `.txt` file (the whole file is one document), a dataset saved by `datasets`' save_to_disk, or a hub
dataset `hf:NAME[:CONFIG][@SPLIT]` (streamed); `text_key` names another field or column. A directory
stands for the Pile-format files below it
(`expand_inputs`). `iter_documents` yields every good document in order; bad input (a malformed JSON line, invalid
UTF-8, no "text" string, an empty document, a truncated compressed stream) raises `DataError` (a `UserError`: one
line from a script) naming the file and line, or with `skip_bad=True` is skipped and counted by kind (`BAD_KINDS`).

Empty documents: by default a document whose text is empty or only whitespace is bad input. GPT-NeoX's
preprocess_data.py drops empty strings but tokenizes whitespace-only text as a document;
`keep_whitespace_docs=True` does the same (empty strings are dropped and counted).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import zlib
from typing import Iterator, NamedTuple, Sequence

import zstandard

from neox_jax import errors

BAD_KINDS = ("malformed_json", "invalid_utf8", "missing_text", "empty_document", "truncated")
TEXT_SUFFIXES = (".jsonl", ".jsonl.zst", ".jsonl.gz", ".json", ".json.zst", ".json.gz", ".txt", ".parquet")
PARQUET_BATCH = 1024  # rows read at a time from a Parquet file: memory stays flat whatever its size


class DataError(errors.InputError):
    """Bad input text; the message starts with `file:line:`. `kind` is one of BAD_KINDS."""

    def __init__(self, path: str, line: int, kind: str, detail: str):
        super().__init__(f"{path}:{line}: {detail}")
        self.path, self.line, self.kind = path, line, kind


class Document(NamedTuple):
    text: str
    component: str  # meta.pile_set_name, "unknown" when absent
    path: str
    line: int  # the line (a row, for Parquet and datasets) of its file, from 1
    source: int = 0  # which input it came from: the index in expand_inputs' list

    @property
    def position(self) -> tuple[int, int]:
        """Where the next document is read from after this one: `iter_documents(start=...)`."""
        return self.source, self.line


def is_text_input(path: str) -> bool:
    return path.endswith(TEXT_SUFFIXES)


HUB_PREFIX = "hf:"  # hf:NAME[:CONFIG][@SPLIT]: a dataset of the Hugging Face hub, streamed by `datasets`


def is_saved_dataset(path: str) -> bool:
    """A folder written by `datasets`' save_to_disk: one split (its state.json and Arrow files) or several
    (dataset_dict.json, refused when read: name the split's folder)."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return (has("state.json") and has("dataset_info.json")) or has("dataset_dict.json")


def expand_inputs(inputs: str | Sequence[str]) -> list[str]:
    """Comma-separated strings and/or lists of files, globs or directories -> the files, in order (globs sorted;
    a directory gives its Pile-format files, sub-directories included, sorted by path)."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files = []
    for item in items:
        for part in os.fspath(item).split(","):
            part = part.strip()
            if not part:
                continue
            if glob.has_magic(part):
                found = sorted(glob.glob(part))
                if not found:
                    raise FileNotFoundError(f"input glob {part!r} matches no files")
                files.extend(found)
            elif os.path.isfile(part):
                files.append(part)
            elif is_saved_dataset(part) or part.startswith(HUB_PREFIX):
                files.append(part)
            elif os.path.isdir(part):
                found = sorted(os.path.join(root, name) for root, _, names in os.walk(part) for name in names
                               if is_text_input(name))
                if not found:
                    raise FileNotFoundError(f"input directory {part} holds no Pile-format files "
                                            f"({', '.join(TEXT_SUFFIXES)})")
                files.extend(found)
            else:
                raise FileNotFoundError(f"input file {part} not found")
    if not files:
        raise errors.InputError("no input files given")
    return files


# ---- reading ---------------------------------------------------------------------------------------------

def _zstd_chunks(f) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    obj, in_frame = dctx.decompressobj(), False
    while True:
        data = f.read(1 << 20)
        if not data:
            break
        while data:
            in_frame = True
            try:
                yield obj.decompress(data)
            except zstandard.ZstdError as e:
                raise _Corrupt(f"corrupt zstd data ({e})") from None
            data = b""
            if obj.eof:  # a frame ended; the rest of the input starts the next one
                data, obj, in_frame = obj.unused_data, dctx.decompressobj(), False
    if in_frame:
        raise _Corrupt("truncated zstd stream (the file ends inside a compressed frame)")


def _gzip_chunks(f) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=f) as g:
        while True:
            try:
                data = g.read(1 << 20)
            except EOFError:
                raise _Corrupt("truncated gzip stream (the file ends inside compressed data)") from None
            except (OSError, zlib.error) as e:
                raise _Corrupt(f"corrupt gzip data ({e})") from None
            if not data:
                return
            yield data


class _Corrupt(Exception):
    pass


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) for each line; a damaged stream raises DataError(kind='truncated') at the
    line it cuts, before that partial line is handed out."""
    with open(path, "rb") as f:
        if path.endswith(".zst"):
            chunks = _zstd_chunks(f)
        elif path.endswith(".gz"):
            chunks = _gzip_chunks(f)
        else:
            chunks = iter(lambda: f.read(1 << 20), b"")
        pending, line_no = [], 0  # pieces of the line still open (one document may span many chunks)
        try:
            for chunk in chunks:
                first, *lines = chunk.split(b"\n")
                pending.append(first)
                if lines:
                    lines[-1:], tail = [], lines[-1]
                    for line in [b"".join(pending), *lines]:
                        line_no += 1
                        yield line_no, line
                    pending = [tail]
        except _Corrupt as e:
            raise DataError(path, line_no + 1, "truncated", str(e)) from None
        if any(pending):
            yield line_no + 1, b"".join(pending)


def _is_empty(text: str, keep_whitespace: bool) -> bool:
    return not text if keep_whitespace else not text.strip()


def _parse_line(path: str, line_no: int, raw: bytes, keep_whitespace: bool = False, text_key: str = "text"
                ) -> Document:
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(path, line_no, "invalid_utf8",
                        f"invalid UTF-8 at byte {e.start} of the line ({e.reason})") from None
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise DataError(path, line_no, "malformed_json", f"malformed JSON ({e.msg} at column {e.colno})") from None
    text = obj.get(text_key) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise DataError(path, line_no, "missing_text",
                        f'no "{text_key}" string field (expected {{"{text_key}": ..., "meta": {{...}}}})')
    if _is_empty(text, keep_whitespace):
        raise DataError(path, line_no, "empty_document", 'empty document ("text" has no non-space characters)')
    meta = obj.get("meta")
    component = meta.get("pile_set_name") if isinstance(meta, dict) else None
    return Document(text, str(component) if component else "unknown", path, line_no)


def _text_file_document(path: str, keep_whitespace: bool = False) -> Document:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(path, line, "invalid_utf8", f"invalid UTF-8 ({e.reason})") from None
    if _is_empty(text, keep_whitespace):
        raise DataError(path, 1, "empty_document", "empty document (the file has no non-space characters)")
    return Document(text, os.path.basename(path), path, 1)


def _parquet_rows(path: str, text_key: str) -> Iterator[tuple[int, object, str | None]]:
    """(row number from 1, the text cell, meta.pile_set_name or None) of a Parquet file, PARQUET_BATCH rows at a
    time. A missing or non-string text column, or a file that is no readable Parquet (truncated), is a DataError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, 0, "truncated", f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    schema = f.schema_arrow
    if text_key not in schema.names:
        raise DataError(path, 0, "missing_text", f"no column {text_key!r} (its columns: {', '.join(schema.names)}); "
                        "choose one with --text-key")
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(path, 0, "missing_text", f"column {text_key!r} holds {kind}, expected strings")
    meta = schema.field("meta").type if "meta" in schema.names else None
    named = meta is not None and pa.types.is_struct(meta) and meta.get_field_index("pile_set_name") >= 0
    row = 0
    try:
        for batch in f.iter_batches(batch_size=PARQUET_BATCH, columns=[text_key] + (["meta"] if named else [])):
            texts = batch.column(0).to_pylist()
            # the one field, not whole structs as dicts (a third of the reading time)
            names = batch.column(1).field("pile_set_name").to_pylist() if named else [None] * len(texts)
            for text, name in zip(texts, names):
                row += 1
                yield row, text, name
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, row + 1, "truncated", f"unreadable Parquet data ({str(e).splitlines()[0]})") from None


def _table_documents(path: str, rows, text_key: str, keep_whitespace: bool, skipped) -> Iterator[Document]:
    """Documents of a columnar source's (row, text, component) rows: a null text or an empty one is bad input."""
    for row, text, component in rows:
        try:
            if not isinstance(text, str):
                raise DataError(path, row, "missing_text", f"row {row}: no {text_key!r} (null)")
            if _is_empty(text, keep_whitespace):
                raise DataError(path, row, "empty_document", f"row {row}: empty document")
        except DataError as e:
            if not skipped(e):
                raise
            continue
        yield Document(text, str(component) if component else "unknown", path, row)


def _dataset_rows(source: str, text_key: str) -> Iterator[tuple[int, object, str | None]]:
    """(row from 1, text, meta.pile_set_name or None) of a saved dataset (memory-mapped Arrow, read a batch at a
    time) or of a hub dataset `hf:NAME[:CONFIG][@SPLIT]` (streamed: nothing is held whole)."""
    import datasets

    if source.startswith(HUB_PREFIX):
        spec, _, split = source[len(HUB_PREFIX):].partition("@")
        name, _, config = spec.partition(":")
        try:
            data = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
        except Exception as e:  # noqa: BLE001 - the hub's many ways to fail (offline, not found, gated) are one line
            raise errors.InputError(f"input {source}: could not open it from the Hugging Face hub "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the "
                                    "name, or unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE where the hub is reachable"
                                    ) from None
        columns = list(data.features or {}) or None
    else:
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            raise DataError(source, 0, "missing_text", f"holds the splits {', '.join(data)}: give {source}/<split>")
        columns = data.column_names
    if columns is not None and text_key not in columns:
        raise DataError(source, 0, "missing_text", f"no column {text_key!r} (its columns: {', '.join(columns)}); "
                        "choose one with --text-key")
    feature = (data.features or {}).get(text_key)
    if feature is not None and getattr(feature, "dtype", "string") not in ("string", "large_string"):
        raise DataError(source, 0, "missing_text", f"column {text_key!r} holds {feature.dtype}, expected strings")
    row = 0
    for batch in data.iter(batch_size=PARQUET_BATCH):
        metas = batch.get("meta") or [None] * len(batch[text_key])
        for text, meta in zip(batch[text_key], metas):
            row += 1
            yield row, text, meta.get("pile_set_name") if isinstance(meta, dict) else None


def iter_documents(inputs: str | Sequence[str], skip_bad: bool = False,
                   bad_counts: collections.Counter | None = None,
                   keep_whitespace_docs: bool = False, text_key: str = "text",
                   start: tuple[int, int] = (0, 0)) -> Iterator[Document]:
    """Every good document of the inputs in order. With skip_bad, bad ones are counted in bad_counts by
    kind (a damaged stream ends that file) instead of raising DataError. keep_whitespace_docs: whitespace-only
    texts are documents and empty ones are dropped and counted, as in GPT-NeoX (see the module docstring).
    text_key: the JSON field or Parquet column holding the text. start: (input, line) of the last document already
    taken (a `Document.position`): reading continues after it, and what lies before is neither parsed nor counted."""
    bad_counts = collections.Counter() if bad_counts is None else bad_counts

    def skipped(e: DataError) -> bool:
        if not (skip_bad or (keep_whitespace_docs and e.kind == "empty_document")):
            return False
        bad_counts[e.kind] += 1
        return True

    for source, path in enumerate(expand_inputs(inputs)):
        if source < start[0]:
            continue
        after = start[1] if source == start[0] else 0  # lines (rows) of this file already taken
        try:
            if path.endswith(".txt"):
                if not after:
                    yield _text_file_document(path, keep_whitespace_docs)._replace(source=source)
                continue
            if path.endswith(".parquet") or is_saved_dataset(path) or path.startswith(HUB_PREFIX):
                rows = (_parquet_rows if path.endswith(".parquet") else _dataset_rows)(path, text_key)
                rows = (r for r in rows if r[0] > after)
                for d in _table_documents(path, rows, text_key, keep_whitespace_docs, skipped):
                    yield d._replace(source=source)
                continue
            for line_no, raw in _raw_lines(path):
                if line_no <= after or not raw.strip():
                    continue
                try:
                    yield _parse_line(path, line_no, raw, keep_whitespace_docs, text_key)._replace(source=source)
                except DataError as e:
                    if not skipped(e):
                        raise
        except DataError as e:
            if not skipped(e):
                raise
