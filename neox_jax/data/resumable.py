"""Progress of a preprocessing run, so that `preprocess_data.py --resume` continues one that was stopped (`kill -9`,
a lost node, a SLURM preemption, Ctrl-C) and writes the same bytes as a run never stopped.

While it runs, `PREFIX.progress.json` records, every `progress_every` seconds, the position of the last document
written (input, line or row), each output's documents and tokens, the summary's counts, and what the run is (its
inputs with sizes and hashes, the tokenizer's SHA-256, every setting that changes the bytes). Each record follows
an fsync of the unfinished files (`IndexedWriter(partial=True)`); a resume cuts those files back to the record (a
killed run may have written past it) and reads on from the position. A resume of other inputs, another tokenizer or
other settings is refused, naming what differs; a run without --resume discards such progress, saying so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

from neox_jax import errors, files
from neox_jax.data import indexed, manifest

log = logging.getLogger("neox_jax")

SUFFIX = ".progress.json"
VERSION = 1


def path_of(output_prefix: str) -> str:
    return os.fspath(output_prefix) + SUFFIX


def describe_run(inputs: Sequence[str], tokenizer_path: str, **settings) -> dict:
    """What a resume must find unchanged: the inputs (names, sizes, SHA-256 where cheap), the tokenizer and the
    settings that change the output."""
    return {"inputs": manifest.describe_inputs(inputs), "tokenizer": manifest.file_sha256(tokenizer_path),
            "tokenizer_path": tokenizer_path, "settings": settings}


def _partials(output_prefix: str, record: dict | None) -> list[str]:
    prefixes = {os.fspath(output_prefix), os.fspath(output_prefix) + indexed.NEOX_SUFFIX}
    prefixes |= {o["prefix"] for o in (record or {}).get("outputs", {}).values()}
    return [p + s for p in sorted(prefixes) for s in (indexed.PARTIAL_BIN, indexed.PARTIAL_SIZES)
            if os.path.exists(p + s)]


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.InputError(f"{path}: not a progress record ({e}); run without --resume to start over") from None
    if record.get("version") != VERSION:
        raise errors.InputError(f"{path}: progress record version {record.get('version')}, expected {VERSION}; run "
                                "without --resume to start over")
    return record


def discard(output_prefix: str) -> None:
    """A run without --resume starts over: the progress and unfinished files of an earlier run of this prefix go."""
    path = path_of(output_prefix)
    record = _read(path) if os.path.isfile(path) else None
    left = _partials(output_prefix, record)
    for p in left:
        os.remove(p)
    if record is not None:
        os.remove(path)
        source, line = record["position"]
        log.warning("discarded the progress of an unfinished run of %s (%d documents, up to line %d of %s); "
                    "--resume continues such a run", output_prefix, record["summary"]["docs"], line,
                    record["run"]["inputs"][source]["name"])
    elif left:
        log.warning("removed the unfinished files of a run of %s that recorded no progress: %s", output_prefix,
                    ", ".join(left))


def load_progress(output_prefix: str, run: dict) -> dict | None:
    """The progress recorded for `output_prefix`, checked to be this same run; None (starting from the beginning)
    when there is none."""
    path = path_of(output_prefix)
    if not os.path.isfile(path):
        discard(output_prefix)  # unfinished files without a record cannot be continued
        log.warning("--resume: no progress recorded for %s (%s); starting from the beginning", output_prefix, path)
        return None
    record = _read(path)
    problem = _difference(record["run"], run)
    if problem:
        raise errors.InputError(f"--resume: {path} was recorded {problem}; run without --resume to start over "
                                "(that discards it)")
    source, line = record["position"]
    log.warning("--resume: continuing %s after line %d of %s (%d documents written)", output_prefix, line,
                run["inputs"][source]["name"], record["summary"]["docs"])
    return record


def finished(output_prefix: str) -> dict | None:
    """The progress record of a run that was stopped after its outputs were complete (between renaming them into
    place and removing the record); None otherwise. An output stopped between renaming its .bin and its .idx into
    place (not a pair yet) gets its .bin back as the unfinished file, so that the resume writes it again."""
    path = path_of(output_prefix)
    if not os.path.isfile(path):
        return None
    record = _read(path)
    prefixes = [o["prefix"] for o in record["outputs"].values()]
    for p in prefixes:
        if not os.path.exists(p + indexed.PARTIAL_BIN) and os.path.exists(p + ".bin") and not os.path.exists(
                p + ".idx"):
            os.replace(p + ".bin", p + indexed.PARTIAL_BIN)
    if not prefixes or not all(indexed.exists(p) and not os.path.exists(p + indexed.PARTIAL_BIN) for p in prefixes):
        return None
    return record


def _difference(then: dict, now: dict) -> str | None:
    """How the recorded run differs from this one, in words; None when it is the same."""
    names = [i["name"] for i in then["inputs"]], [i["name"] for i in now["inputs"]]
    if names[0] != names[1]:
        first = next((i for i, (a, b) in enumerate(zip(*names)) if a != b), min(map(len, names)))
        got = lambda n: n[first] if first < len(n) else "(none)"  # noqa: E731
        return (f"for other inputs: {len(names[0])} then, {len(names[1])} now; input {first + 1} was {got(names[0])}, "
                f"is {got(names[1])}")
    for a, b in zip(then["inputs"], now["inputs"]):
        for field in ("bytes", "sha256"):
            if a.get(field) != b.get(field):
                return f"for other contents of input {a['name']}: its {field} was {a.get(field)}, is {b.get(field)}"
    if then["tokenizer"] != now["tokenizer"]:
        return (f"with another tokenizer: {then['tokenizer_path']} (sha256 {then['tokenizer'][:12]}), now "
                f"{now['tokenizer_path']} (sha256 {now['tokenizer'][:12]})")
    for key in sorted(set(then["settings"]) | set(now["settings"])):
        if then["settings"].get(key) != now["settings"].get(key):
            return f"with {key}={then['settings'].get(key)!r}, now {now['settings'].get(key)!r}"
    return None


class Recorder:
    """Writes the progress record of a preprocessing run every `every` seconds, after each chunk `wrote` (and once
    more when it is interrupted: `save`)."""

    def __init__(self, output_prefix: str, run: dict, every: float, record: dict | None = None):
        self.path, self.run, self.every = path_of(output_prefix), run, every
        self.last = record  # the latest state a resume could start from
        self.saved_at = time.monotonic()

    def wrote(self, position: tuple[int, int], summary: dict, outputs) -> None:
        self.last = {"version": VERSION, "run": self.run, "position": list(position), "summary": summary,
                     "outputs": {k: {"prefix": outputs.writers[k].prefix, **v} for k, v in outputs.state().items()}}
        if time.monotonic() - self.saved_at >= self.every:
            self.save(outputs)

    def save(self, outputs) -> bool:
        """Record the latest state (the unfinished files made durable first); False when there is none."""
        if self.last is None:
            return False
        outputs.flush()
        with files.atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(self.last) + "\n")
        self.saved_at = time.monotonic()
        return True

    def remove(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)
