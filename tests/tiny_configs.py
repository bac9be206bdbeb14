"""The small model and run every unit test builds on: configs/tiny.py's architecture shrunk for speed (2 layers,
hidden 64, 4 heads, so heads and mlp still divide tensor=4; 500 ids, padded to a multiple of 128 x tensor),
16 sequences of 16 tokens in 2 micro-batches. A test states only what it changes, so shapes (and compiled
steps) repeat across tests.

Tests that run `configs/tiny.py` itself through the trainer or a script take its overrides from test_trainer.py.
"""

from neox_jax.config import default_config, model_defaults

MODEL = dict(hidden_size=64, num_layers=2, num_heads=4, vocab_size=500, max_position_embeddings=64)
TRAIN = dict(steps=10, batch_size=16, micro_batches=2, seq_len=16)
OPTIMIZER = dict(lr=1e-3, warmup_steps=1, weight_decay=0.1)


def tiny_model(**fields):
    """The tiny model config, `fields` changed."""
    m = model_defaults()
    m.update({**MODEL, **fields})
    return m


def tiny_config(data=1, fsdp=1, tensor=1, zero_stage=0, *, stage=1, **sections):
    """The tiny run on a (stage, data, fsdp, tensor) mesh; `sections` update config sections, e.g.
    `model=dict(dtype="bfloat16"), precision=dict(mode="master_weights")`."""
    c = default_config()
    c.model.update(MODEL)
    c.optimizer.update(OPTIMIZER)
    c.train.update(TRAIN)
    c.mesh.update(dict(stage=stage, data=data, fsdp=fsdp, tensor=tensor))
    c.zero_stage = zero_stage
    for name, fields in sections.items():
        c[name].update(fields)
    return c
