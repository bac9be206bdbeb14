"""Data: tokenizers, Pile preprocessing to GPT-NeoX .bin/.idx, the grain training pipeline, dedup.

Import what you need from its submodule (`from neox_jax.data.dataset import make_train_iterator`): this package
itself holds only the bundled files' paths, so preprocessing worker processes, which import it, never load grain or
JAX. The submodules, leaf first:

    documents    the Pile-format readers (iter_documents: .jsonl, .jsonl.zst, .jsonl.gz, .txt), DataError; a leaf
    tokenizer    load_tokenizer (HF tokenizers JSON or sentencepiece), check_vocab, train_sentencepiece
    indexed      Megatron/GPT-NeoX .bin/.idx: IndexedDataset, IndexedWriter, IndexedFormatError
    preprocess   text files -> .bin/.idx in worker processes: preprocess(), prepare_dataset (cached)
    neox_index   GPT-NeoX's training sample order: its document, sample and shuffle indices, blending
    dataset      a run's data: resolve_paths, make_train_iterator (TrainIterator), make_val_batches,
                 steps_batches, train_spec, tokenizes_text, run_datasets
    dedup        exact and near-duplicate documents (dedup_report)
    bench        data benchmarks: loader and preprocessing throughput, index builds
"""

from __future__ import annotations

import os

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

