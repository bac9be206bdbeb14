"""Tokenizers: HF `tokenizers` JSON files (the GPT-NeoX-20B tokenizer) and sentencepiece models.

Both are wrapped in one small interface (`encode_batch`, `decode`, `vocab_size`, `eod_id`) so
preprocessing and evaluation don't care which kind they hold. `train_sentencepiece` trains a new BPE
model on Pile-format files; `check_vocab` refuses a tokenizer whose ids don't fit the model's embedding.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm
import tokenizers

from neox_jax import errors
from neox_jax.data import default_paths
from neox_jax.data.documents import iter_documents

EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


class TokenizerError(errors.InputError):
    """A tokenizer file that can't be used; the message names the file."""


class HFTokenizer:
    """An HF `tokenizers` JSON file (e.g. 20B_tokenizer.json: 50,277 ids, <|endoftext|> = 0).

    add_special_tokens: encode with the file's post-processor (e.g. a BOS before every text), as GPT-NeoX's
    HFTokenizer and transformers do by default; off, the ids are the text's alone."""

    kind = "hf"

    def __init__(self, path: str, add_special_tokens: bool = False):
        self.path, self.add_special_tokens = path, add_special_tokens
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{path}: not a valid HF tokenizers JSON file ({e})") from None
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        ids = [self._tok.token_to_id(n) for n in EOD_NAMES]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise TokenizerError(f"{path}: no end-of-document token (looked for {', '.join(EOD_NAMES)})")
        self.eod_id = ids[0]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking (newer tokenizers releases); same ids
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=self.add_special_tokens)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    """A sentencepiece `.model` file; its eos piece is the end-of-document token. It adds no BOS (neither does
    GPT-NeoX's SentencePieceTokenizer), so `add_special_tokens` changes nothing."""

    kind = "sentencepiece"
    add_special_tokens = False

    def __init__(self, path: str):
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = self._sp.eos_id()
        if self.eod_id < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no eos piece to use as end-of-document")

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


Tokenizer = HFTokenizer | SentencePieceTokenizer


def load_tokenizer(path: str | None = None, add_special_tokens: bool = False, *, hf_dir: str | None = None
                   ) -> Tokenizer:
    """Load an HF JSON tokenizer or a sentencepiece model: `path` if given, else the tokenizer.json of the HF model
    directory `hf_dir` when it has one, else (None or "") the bundled 20B tokenizer."""
    if not path and hf_dir and os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        path = os.path.join(hf_dir, "tokenizer.json")
    if not path:
        path = default_paths()["tokenizer"]
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TokenizerError(
            f"tokenizer file {path} not found (expected an HF tokenizers .json or a sentencepiece .model)")
    if path.endswith((".json", ".model")):
        is_json = path.endswith(".json")
    else:  # no telling name: HF files are JSON objects, sentencepiece models binary protobufs
        with open(path, "rb") as f:
            is_json = f.read(64).lstrip()[:1] == b"{"
    return HFTokenizer(path, add_special_tokens) if is_json else SentencePieceTokenizer(path)


def check_vocab(tokenizer: Tokenizer | str, padded_vocab_size: int) -> None:
    """Refuse a tokenizer that can produce ids outside the model's (padded) embedding."""
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    if tok.vocab_size > padded_vocab_size:
        raise TokenizerError(
            f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's padded vocabulary holds only "
            f"{padded_vocab_size} (set model.vocab_size >= {tok.vocab_size})")


def train_sentencepiece(inputs: Sequence[str], model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", max_docs: int | None = None,
                        character_coverage: float = 0.9999, skip_bad: bool = False) -> str:
    """Train a sentencepiece model on Pile-format files; returns the `.model` path.

    Ids follow the 20B tokenizer's convention: end-of-document (eos) = 0, padding = 1; unknown = 2.
    No normalization and byte fallback: every input is encodable and decodes back to itself, as with a
    byte-level BPE.
    """
    failed = []  # sentencepiece turns an exception of the iterator into a RuntimeError: keep the original

    def lines():
        try:
            for n, doc in enumerate(iter_documents(inputs, skip_bad=skip_bad)):
                if max_docs is not None and n >= max_docs:
                    return
                for line in doc.text.splitlines():
                    if line.strip():
                        yield line
        except Exception as e:  # noqa: BLE001 - re-raised below, as itself
            failed.append(e)
            raise

    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            eos_id=0, pad_id=1, unk_id=2, bos_id=-1, eos_piece="<|endoftext|>", pad_piece="<|padding|>",
            byte_fallback=True, character_coverage=character_coverage, minloglevel=2,
            # keep text as is (code indentation, newlines via byte fallback) so decode(encode(x)) == x
            normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True,
        )
    except RuntimeError as e:  # sentencepiece's verdict on its input, e.g. a vocabulary larger than the text allows
        if failed:
            raise failed[0] from None
        where = inputs if isinstance(inputs, (str, os.PathLike)) else ", ".join(map(str, inputs))
        raise TokenizerError(f"training a {vocab_size}-id tokenizer on {where}: "
                             f"{str(e).strip().splitlines()[-1]}") from None
    return model_prefix + ".model"
