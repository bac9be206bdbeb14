"""A tiny GPT-NeoX that trains in minutes on a laptop CPU: the default of scripts/train.py.

Sized for 2 CPU cores: the 50,304-wide output head is most of the cost, so each step sees only 16 x 32 tokens;
800 steps (~410k tokens) take the validation loss well below the unigram baseline of the bundled Pile sample
(measured numbers in the README's train section).
"""

from neox_jax.config import default_config


def get_config(arg=None):
    c = default_config()
    m = c.model
    m.hidden_size = 128
    m.num_layers = 4
    m.num_heads = 4
    m.max_position_embeddings = 256
    m.rotary_pct = 0.25
    m.scan_unroll = m.num_layers  # no layer loop: 4-5% faster steps on CPU at this size (README, Benchmarks)
    c.optimizer.lr = 3e-3
    c.optimizer.weight_decay = 0.1
    c.optimizer.warmup_steps = 50
    c.train.steps = 800
    c.train.batch_size = 16
    c.train.seq_len = 32
    c.train.log_every = 50
    c.train.eval_every = 200
    c.train.eval_batches = 16  # 8k validation tokens: a steady estimate
    c.train.checkpoint_every = 200
    c.data.bundled_sample = True  # the 6 MB Pile sample in neox_jax/assets, when no data.train_paths is given
    return c
