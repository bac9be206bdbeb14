"""Data: tokenizers, Pile preprocessing to GPT-NeoX .bin/.idx, the grain training pipeline, dedup.

Names are imported lazily so that preprocessing worker processes never import grain or JAX. Submodules:
tokenizer, preprocess (its `preprocess()` writes .bin/.idx), indexed, dataset, dedup, bench.
"""

from __future__ import annotations

import importlib
import os

_EXPORTS = {
    "load_tokenizer": "tokenizer", "check_vocab": "tokenizer", "TokenizerError": "tokenizer",
    "train_sentencepiece": "tokenizer",
    "prepare_dataset": "preprocess", "iter_documents": "preprocess",
    "DataError": "preprocess",
    "IndexedDataset": "indexed", "IndexedWriter": "indexed", "IndexedFormatError": "indexed",
    "make_train_iterator": "dataset", "make_val_batches": "dataset", "resolve_paths": "dataset",
    "TrainIterator": "dataset", "steps_batches": "dataset", "tokenizes_text": "dataset", "run_datasets": "dataset",
    "dedup_report": "dedup",
}

__all__ = ["default_paths", *_EXPORTS]


def default_paths() -> dict[str, str]:
    """The bundled Pile sample and 20B tokenizer (see neox_jax/assets/README.md)."""
    assets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
    return {
        "train": os.path.join(assets, "train.jsonl.zst"),
        "val": os.path.join(assets, "val.jsonl.zst"),
        "tokenizer": os.path.join(assets, "20B_tokenizer.json"),
    }


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
