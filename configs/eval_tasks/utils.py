"""Loaders for the offline copies of the paper's evaluation sets, used by the task YAMLs beside this file.

Each task's `custom_dataset` reads a local file under `$NEOX_JAX_EVAL_DATA` (default: the full sets bundled in
`neox_jax/assets/eval/`, see its README) and returns a `datasets.DatasetDict` with the split and the fields of
the Hugging Face dataset lm-eval's own task reads, so the prompt templates below match lm-eval's definitions.
Each file may also be stored bzip2-compressed under its name + `.bz2` (as the bundled copies are).
A missing file, a line that is not JSON, or a record without a needed field raises one error naming the file
(and line).
"""

from __future__ import annotations

import bz2
import json
import pathlib
import re

import datasets

from neox_jax.data import EVAL_DATA_ENV, eval_data_dir


class TaskDataError(ValueError):
    """A local evaluation file is missing or malformed; the message names it."""


def data_path(relative: str) -> pathlib.Path:
    """The file `relative` under the data dir, or its `.bz2` copy."""
    root = pathlib.Path(eval_data_dir())
    path = root / relative
    for candidate in (path, path.with_name(path.name + ".bz2")):
        if candidate.is_file():
            return candidate
    raise TaskDataError(f"evaluation data file {path} not found (data dir {root}: set ${EVAL_DATA_ENV} or "
                        f"--data_dir to the folder holding lambada/, piqa/, arc/, winogrande/, hellaswag/)")


def open_text(path: pathlib.Path):
    return bz2.open(path, "rt", encoding="utf-8") if path.suffix == ".bz2" else open(path, encoding="utf-8")


def read_jsonl(path: pathlib.Path, fields: tuple[str, ...]) -> list[dict]:
    records = []
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            missing = [k for k in fields if not isinstance(record, dict) or k not in record]
            if missing:
                raise TaskDataError(f"{path}, line {number}: missing field(s) {', '.join(missing)} "
                                    f"(expected {', '.join(fields)})")
            records.append(record)
    if not records:
        raise TaskDataError(f"{path}: no records")
    return records


def _splits(**splits) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def load_lambada(**_) -> datasets.DatasetDict:
    """EleutherAI/lambada_openai `default`: {"text"}."""
    return _splits(test=read_jsonl(data_path("lambada/lambada_test.jsonl"), ("text",)))


def load_piqa(**_) -> datasets.DatasetDict:
    """baber/piqa validation: {"goal", "sol1", "sol2", "label"}; labels come from the separate .lst file."""
    path, labels_path = data_path("piqa/valid.jsonl"), data_path("piqa/valid-labels.lst")
    rows = read_jsonl(path, ("goal", "sol1", "sol2"))
    with open_text(labels_path) as f:
        labels = [line.strip() for line in f if line.strip()]
    if len(labels) != len(rows) or any(label not in ("0", "1") for label in labels):
        raise TaskDataError(f"{labels_path}: expected {len(rows)} lines of 0 or 1 (one per item of {path}), "
                            f"got {len(labels)} lines")
    return _splits(validation=[{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
                               for r, lab in zip(rows, labels)])


def _load_mc(relative: str, split: str) -> datasets.DatasetDict:
    """{"query", "choices", "gold"} files (ARC)."""
    path = data_path(relative)
    rows = read_jsonl(path, ("query", "choices", "gold"))
    for number, r in enumerate(rows, 1):
        if not (isinstance(r["gold"], int) and 0 <= r["gold"] < len(r["choices"])):
            raise TaskDataError(f"{path}, record {number}: gold={r['gold']!r} is not an index into choices")
    return _splits(**{split: [{"query": r["query"], "choices": r["choices"], "gold": r["gold"]} for r in rows]})


def load_arc_easy(**_) -> datasets.DatasetDict:
    return _load_mc("arc/arc_easy.jsonl", "test")


def load_arc_challenge(**_) -> datasets.DatasetDict:
    return _load_mc("arc/arc_challenge.jsonl", "test")


def load_winogrande(**_) -> datasets.DatasetDict:
    """WinoGrande dev: {"context_options": [sentence up to the blank with option 1 / 2], "continuation", "gold"}."""
    path = data_path("winogrande/winogrande.jsonl")
    rows = read_jsonl(path, ("context_options", "continuation", "gold"))
    return _splits(validation=[{"context_options": r["context_options"], "continuation": r["continuation"],
                                "gold": int(r["gold"])} for r in rows])


def winogrande_gold(doc) -> int:
    return doc["gold"]


def winogrande_contexts(doc) -> list[str]:
    return doc["context_options"]


def winogrande_continuation(doc) -> str:
    return doc["continuation"]


def load_hellaswag(**_) -> datasets.DatasetDict:
    """HellaSwag validation from the 6-lines-per-item text file: context, gold index, four endings.

    The file joins `activity_label: ctx_a ctx_b` without lm-eval's `ctx_b.capitalize()`; ctx_b is the trailing
    fragment after the last sentence end when it starts in lower case, and is capitalised here the same way."""
    path = data_path("hellaswag/hellaswag_val_full.txt.bz2")
    with open_text(path) as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise TaskDataError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, gold, 4 endings per item)")
    rows = []
    for start in range(0, len(lines), 6):
        context, gold, *endings = lines[start:start + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise TaskDataError(f"{path}, line {start + 2}: gold index {gold!r} is not 0-3")
        rows.append({"query": _preprocess(_capitalize_ctx_b(context)), "choices": [_preprocess(e) for e in endings],
                     "gold": int(gold), "label": gold.strip()})
    return _splits(validation=rows)


_CTX_B = re.compile(r"^(.*[.!?]\s+)([a-z][^.!?]*)$", re.DOTALL)


def _capitalize_ctx_b(context: str) -> str:
    match = _CTX_B.match(context.rstrip())
    return context if match is None else match.group(1) + match.group(2).capitalize()


def _preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")
