"""A tiny GPT-NeoX that trains in minutes on a laptop CPU: the default of scripts/train.py."""

from neox_jax.config import default_config


def get_config(arg=None):
    c = default_config()
    m = c.model
    m.hidden_size = 128
    m.num_layers = 4
    m.num_heads = 4
    m.max_position_embeddings = 256
    m.rotary_pct = 0.25
    c.optimizer.lr = 2e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 30
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.log_every = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 200
    return c
