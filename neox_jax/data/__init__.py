"""Data: tokenizers, Pile preprocessing to GPT-NeoX .bin/.idx, the grain training pipeline, dedup.

Names are imported lazily so that preprocessing worker processes never import grain or JAX. Submodules:
documents (the readers, a leaf), tokenizer, preprocess (its `preprocess()` writes .bin/.idx), indexed, dataset,
neox_index, dedup, bench.
"""

from __future__ import annotations

import importlib
import os

_EXPORTS = {
    "load_tokenizer": "tokenizer", "check_vocab": "tokenizer", "TokenizerError": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "prepare_dataset": "preprocess", "iter_documents": "documents", "DataError": "documents",
    "IndexedDataset": "indexed", "IndexedWriter": "indexed", "IndexedFormatError": "indexed",
    "make_train_iterator": "dataset", "make_val_batches": "dataset", "resolve_paths": "dataset",
    "TrainIterator": "dataset", "steps_batches": "dataset", "tokenizes_text": "dataset", "run_datasets": "dataset",
    "train_spec": "dataset",
    "dedup_report": "dedup",
}

__all__ = ["default_paths", "eval_data_dir", "EVAL_DATA_ENV", *_EXPORTS]

EVAL_DATA_ENV = "NEOX_JAX_EVAL_DATA"  # the folder the evaluation tasks read (configs/eval_tasks/utils.py)


def default_paths() -> dict[str, str]:
    """The bundled Pile sample, 20B tokenizer and evaluation sets (see neox_jax/assets/README.md)."""
    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
    return {
        "train": os.path.join(assets, "train.jsonl.zst"),
        "val": os.path.join(assets, "val.jsonl.zst"),
        "tokenizer": os.path.join(assets, "20B_tokenizer.json"),
        "eval": os.path.join(assets, "eval"),
    }


def eval_data_dir() -> str:
    """Where the evaluation tasks read their files: `$NEOX_JAX_EVAL_DATA` if set, else the bundled copies."""
    return os.environ.get(EVAL_DATA_ENV) or default_paths()["eval"]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
