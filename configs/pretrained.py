"""Fine-tune or continue pretrained weights: `--config configs/pretrained.py:DIR`, DIR an HF GPTNeoX directory
(a Pythia download, what `save_pretrained` wrote) or a params dir.

The model fields come from DIR's config.json and `train.init_from` is DIR, so the weights fit by construction;
the training fields are the defaults below (override any with --config.train.* / --config.optimizer.*). For a
released model with its own config file, `--config configs/pythia.py:160m --config.train.init_from=DIR` is the
same thing.
"""

from neox_jax import weights
from neox_jax.config import default_config


def get_config(path=None):
    if not path:
        raise ValueError("configs/pretrained.py needs the checkpoint: --config configs/pretrained.py:DIR")
    c = default_config()
    c.model = weights.model_config(path)
    c.train.init_from = path
    c.train.seq_len = min(c.train.seq_len, c.model.max_position_embeddings)
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 0
    return c
