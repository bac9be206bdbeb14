"""Every Pythia size: `--config configs/pythia.py:410m` (70m, 160m, 410m, 1b, 1.4b, 2.8b, 6.9b, 12b, 14m, 31m).

Sizes, learning rates and padded vocabularies from the Pythia configs (see neox_reference.md);
batch 1,024 x 2,048 tokens, 143,000 steps, weight decay 0.1.
"""

from neox_jax.config import default_config

# name: (layers, hidden, heads, lr, padded vocab)
SIZES = {
    "14m": (6, 128, 4, 1.0e-3, 50304),
    "31m": (6, 256, 8, 1.0e-3, 50304),
    "70m": (6, 512, 8, 1.0e-3, 50304),
    "160m": (12, 768, 12, 6.0e-4, 50304),
    "410m": (24, 1024, 16, 3.0e-4, 50304),
    "1b": (16, 2048, 8, 2.5e-4, 50304),
    "1.4b": (24, 2048, 16, 2.0e-4, 50304),
    "2.8b": (32, 2560, 32, 1.6e-4, 50304),
    "6.9b": (32, 4096, 32, 1.2e-4, 50432),
    "12b": (36, 5120, 40, 1.2e-4, 50688),
}


def get_config(arg="70m"):
    if arg not in SIZES:
        raise ValueError(f"configs/pythia.py: unknown size {arg!r}; choose one of {', '.join(SIZES)}")
    layers, hidden, heads, lr, vocab = SIZES[arg]
    c = default_config()
    m = c.model
    m.num_layers, m.hidden_size, m.num_heads, m.padded_vocab_size = layers, hidden, heads, vocab
    m.max_position_embeddings = 2048
    m.hidden_act = "gelu"
    if arg in ("6.9b", "12b"):
        m.init = "normal"  # with scaled_normal output projections
    c.optimizer.lr = lr
    c.optimizer.weight_decay = 0.1
    c.train.steps = 143_000
    c.train.batch_size = 1024
    c.train.seq_len = 2048
    c.train.log_every = 10
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
