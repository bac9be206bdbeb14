"""The manifest beside every .bin/.idx pair preprocessing writes (`PREFIX.manifest.json`): what the files are (sizes,
SHA-256 of each, documents, tokens, token dtype), what made them (the tokenizer file's SHA-256, the inputs with
their sizes, and their SHA-256 where cheap, the command line), so that a dataset can be proved to be the one a run
used: `scripts/verify_data.py PREFIX` checks the files against it, and against a published list of hashes
(`sha256sum`'s format); a training run records the manifest's own SHA-256 in its checkpoints
(`indexed.fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Sequence

import numpy as np

from neox_jax import errors, files
from neox_jax.data import indexed

SUFFIX = indexed.MANIFEST
VERSION = 1
CHEAP_INPUT_BYTES = 1 << 30  # inputs up to 1 GiB are hashed; larger ones are recorded by name and size
_BLOCK = 1 << 24


def path_of(prefix: str) -> str:
    return indexed.strip_suffix(os.fspath(prefix)) + SUFFIX


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def describe(prefix: str, sha256: dict[str, str] | None = None) -> dict:
    """What the pair holds: each file's bytes and SHA-256, the documents, tokens and token dtype (from the .idx).
    sha256: the files' hashes where the writer computed them as it wrote (`IndexedWriter.sha256`); the others
    are read."""
    prefix = indexed.strip_suffix(os.fspath(prefix))
    data = indexed.IndexedDataset(prefix)
    known = sha256 or {}
    out = {kind: {"bytes": os.path.getsize(f"{prefix}.{kind}"),
                  "sha256": known.get(kind) or file_sha256(f"{prefix}.{kind}")} for kind in ("bin", "idx")}
    return {**out, "documents": int(len(data.sizes)), "tokens": int(np.sum(data.sizes, dtype=np.int64)),
            "dtype": str(data.dtype)}


def _input(name: str) -> dict:
    if not os.path.isfile(name):
        return {"name": name}  # a hub dataset or a saved dataset's folder
    size = os.path.getsize(name)
    return {"name": name, "bytes": size, "sha256": file_sha256(name) if size <= CHEAP_INPUT_BYTES else None}


def describe_inputs(inputs: Sequence[str]) -> list[dict]:
    return [_input(os.fspath(i)) for i in inputs]


def write(prefix: str, tokenizer_path: str | dict | None, inputs: Sequence[str] | Sequence[dict],
          command: Sequence[str] | None = None, sha256: dict[str, str] | None = None, **extra) -> str:
    """Write PREFIX.manifest.json for a pair just written; returns its path. inputs: names, or `describe_inputs`'
    records of them; tokenizer_path: a path, or the record of one (a merge copies its parts'); sha256: the pair's
    hashes as its writer computed them; extra: more fields to record."""
    tokenizer = (tokenizer_path if not isinstance(tokenizer_path, str) else
                 {"path": tokenizer_path, "sha256": file_sha256(tokenizer_path)})
    record = {"version": VERSION, **describe(prefix, sha256), "tokenizer": tokenizer,
              "inputs": [i if isinstance(i, dict) else _input(os.fspath(i)) for i in inputs],
              "command": list(sys.argv if command is None else command), **extra}
    target = path_of(prefix)
    with files.atomic_path(target) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    return target


def read(prefix: str) -> dict:
    path = path_of(prefix)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise errors.InputError(f"{path}: not a manifest ({e})") from None


def manifest_sha256(prefix: str) -> str | None:
    path = path_of(prefix)
    return file_sha256(path) if os.path.isfile(path) else None


def read_published(path: str) -> dict[str, str]:
    """A published list of hashes, one `SHA256  FILENAME` a line (sha256sum's output) -> {file name: hash}."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 64:
                raise errors.InputError(f"--hashes {path}:{number}: expected 'SHA256  FILENAME' (sha256sum's "
                                        f"format), got {line.strip()[:80]!r}")
            out[os.path.basename(parts[1].lstrip("*"))] = parts[0].lower()
    return out


def verify(prefix: str, published: dict[str, str] | None = None) -> list[str]:
    """What differs between the pair's files and its manifest (and the published hashes, when given): one line each,
    naming the file; empty when everything matches."""
    prefix = indexed.strip_suffix(os.fspath(prefix))
    path = path_of(prefix)
    if not os.path.isfile(path):
        raise errors.InputError(f"{path}: no manifest (preprocess_data.py writes one beside every .bin/.idx); "
                                "with --hashes FILE only the published hashes are checked")
    recorded = read(prefix)
    now = describe(prefix)
    problems = []
    for kind in ("bin", "idx"):
        for field in ("bytes", "sha256"):
            if recorded.get(kind, {}).get(field) != now[kind][field]:
                problems.append(f"{prefix}.{kind}: {field} differs (manifest {recorded.get(kind, {}).get(field)}, "
                                f"file {now[kind][field]})")
    for field in ("documents", "tokens", "dtype"):
        if recorded.get(field) != now[field]:
            problems.append(f"{prefix}: {field} differ (manifest {recorded.get(field)}, files {now[field]})")
    for suffix in (".bin", ".idx") if published is not None else ():
        want = published.get(os.path.basename(prefix) + suffix)
        if want is None:
            problems.append(f"{prefix}{suffix}: not in the published list")
        elif want != now[suffix[1:]]["sha256"]:
            problems.append(f"{prefix}{suffix}: sha256 {now[suffix[1:]]['sha256']} is not the published {want}")
    return problems
