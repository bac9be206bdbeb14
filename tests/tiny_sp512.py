"""configs/tiny.py on a 512-id sentencepiece tokenizer of the bundled Pile sample (tests/fixtures/README.md), as a
config file. The runs of the tiny config that test a loop or a script, not the 20B tokenizer, take it, so their
steps are not spent in a 50,688-row embedding and head (1.3 -> 0.05 CPU-s a step on 8 devices): as overrides
(SMALL_VOCAB, SMALL_VOCAB_FLAGS) or, for commands that take a config file but no overrides, as `--config` SPEC.
"""

import pathlib

from neox_jax.config import from_spec

TESTS = pathlib.Path(__file__).resolve().parent
SPEC = str(TESTS / "tiny_sp512.py")
SMALL_TOKENIZER = str(TESTS / "fixtures" / "tokenizers" / "pile_sp512.model")
SMALL_VOCAB = {"data.tokenizer": SMALL_TOKENIZER, "model.vocab_size": 512}
SMALL_VOCAB_FLAGS = [f"--config.{field}={value}" for field, value in SMALL_VOCAB.items()]


def get_config(arg=None):
    return from_spec(str(TESTS.parent / "configs" / "tiny.py"), SMALL_VOCAB)
