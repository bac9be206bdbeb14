"""A 2 x 2 sweep of a very small model for a few steps: checks the sweep machinery on a laptop CPU in about a
minute (`python scripts/sweep.py --sweep configs/sweeps/tiny.py --emit local`)."""

from neox_jax.sweep import Sweep, grid


def get_sweep():
    return Sweep(config="configs/tiny.py",
                 runs=grid({"optimizer.lr": [1e-3, 3e-3], "train.seed": [0, 1]}),
                 fixed={"model.num_layers": 1, "model.hidden_size": 32, "model.num_heads": 2,
                        "train.seq_len": 16, "train.batch_size": 8, "train.steps": 3, "train.log_every": 1,
                        "train.eval_every": 3, "train.eval_batches": 1, "train.checkpoint_every": 3,
                        "optimizer.warmup_steps": 1})
