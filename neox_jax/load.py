"""What generation and evaluation start from: a model and its weights (an HF GPTNeoX directory, a params dir or a
training workdir), a tokenizer, and prompts from a file. Shared by scripts/generate.py and the lm-eval adapter."""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from neox_jax import errors, pretrained
from neox_jax.config import DTYPES
from neox_jax.data import tokenizer as tok_lib


def load_model(*, hf: str | None = None, checkpoint: str | None = None, dtype: str | None = None) -> tuple[Any, Any]:
    """(model config, params) from an HF GPTNeoX directory (`hf`) or a neox_jax params dir / training workdir
    (`checkpoint`), cast to `dtype` when given."""
    if (hf is None) == (checkpoint is None):
        raise errors.InputError(
            "give exactly one of hf=<HF GPTNeoX dir> or checkpoint=<params dir or training workdir>")
    if dtype is not None and dtype not in DTYPES:
        raise errors.InputError(f"dtype={dtype!r}: expected {', '.join(DTYPES)}")
    config, params = pretrained.load(hf or checkpoint, "hf" if hf else "checkpoint")
    m = config.model
    if dtype:
        m = ml_collections.ConfigDict(m.to_dict())
        m.dtype = m.param_dtype = dtype
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return m, params


def load_tokenizer(hf: str | None = None, path: str | None = None):
    """`path` if given, else the HF dir's tokenizer.json when it has one, else the bundled 20B tokenizer
    (a `neox_jax.data.tokenizer` object: encode / decode / vocab_size / eod_id)."""
    if not path and hf and os.path.isfile(os.path.join(hf, "tokenizer.json")):
        path = os.path.join(hf, "tokenizer.json")
    return tok_lib.load_tokenizer(path)  # None: the bundled 20B tokenizer


def read_prompts(path: str) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or a .jsonl file ({"prompt": ...} per line)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path} not found")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise errors.InputError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise errors.InputError(f'{path}, line {number}: expected an object with a string "prompt" field')
            prompts.append(record["prompt"])
    if not prompts:
        raise errors.InputError(f"prompt file {path} holds no prompts")
    return prompts
