"""The small model and run every unit test builds on: configs/tiny.py's architecture shrunk for speed (2 layers,
hidden 64, 4 heads, so heads and mlp still divide tensor=4; 500 ids, padded to a multiple of 128 x tensor),
16 sequences of 16 tokens in 2 micro-batches. A test states only what it changes, so shapes (and compiled
steps) repeat across tests.

Tests that run `configs/tiny.py` itself (what the trainer and the scripts load) take `tiny_py`: the same
architecture, with the run shape the test needs; test_trainer.py's runs and script flags keep their own overrides.
"""

import importlib.util

from conftest import ROOT
from neox_jax.config import default_config, from_spec, model_defaults

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=500, max_position_embeddings=64)
TRAIN = dict(steps=10, batch_size=16, micro_batches=2, seq_len=16)
OPTIMIZER = dict(lr=1e-3, warmup_steps=1, weight_decay=0.1)
TINY_PY = str(ROOT / "configs" / "tiny.py")


def tiny_model(**fields):
    """The tiny model config, `fields` changed."""
    m = model_defaults()
    m.update({**MODEL, **fields})
    return m


def tiny_config(data=1, fsdp=1, tensor=1, zero_stage=0, *, stage=1, context=1, **sections):
    """The tiny run on a (stage, data, fsdp, context, tensor) mesh; `sections` update config sections, e.g.
    `model=dict(dtype="bfloat16"), precision=dict(mode="master_weights")`."""
    c = default_config()
    c.model.update(MODEL)
    c.optimizer.update(OPTIMIZER)
    c.train.update(TRAIN)
    c.data.bundled_sample = True
    c.mesh.update(dict(stage=stage, data=data, fsdp=fsdp, context=context, tensor=tensor))
    c.zero_stage = zero_stage
    for name, fields in sections.items():
        c[name].update(fields)
    return c


def tiny_py(**overrides):
    """configs/tiny.py with the tiny model's layers, width and heads (its own vocabulary), then `overrides`
    (dotted field -> value, as the scripts' --config.FIELD flags)."""
    shape = {f"model.{k}": MODEL[k] for k in ("hidden_size", "num_layers", "num_heads")}
    return from_spec(TINY_PY, {**shape, **overrides})


def script(name):
    """scripts/<name>.py as a module, for tests that call its `main(argv)` in this process (those not about the
    process boundary: each subprocess costs seconds of imports before any work)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
