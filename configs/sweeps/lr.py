"""Learning rate x global batch for Pythia-160M (Pythia used lr 6e-4 at batch 1,024 x 2,048 tokens).

    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit slurm    # then: sbatch runs/sweeps/lr/sweep.sbatch

20k steps each (a seventh of the Pythia schedule) is enough to rank the settings.
"""

from neox_jax.sweep import Sweep, grid


def get_sweep():
    return Sweep(config="configs/pythia.py:160m",
                 runs=grid({"optimizer.lr": [3e-4, 6e-4, 1.2e-3], "train.batch_size": [512, 1024]}),
                 fixed={"train.steps": 20_000})
