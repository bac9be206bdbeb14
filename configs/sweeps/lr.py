"""Learning rate x global batch for Pythia-160M (Pythia used lr 6e-4 at batch 1,024 x 2,048 tokens).

    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit slurm    # then: sbatch runs/sweeps/lr/sweep.sbatch

20k steps each (a seventh of the Pythia schedule) is enough to rank the settings. Each run is sized for one 8-GPU
node: 32 sequences per GPU per micro-batch (Pythia's), so batch 512 takes 2 micro-batches and 1,024 takes 4
(`scripts/inspect_sharding.py --config configs/pythia.py:160m --mesh data=8 --batch_size 1024 --micro_batches 4`).
Point `data.train_paths` at your tokenized Pile (README, "Data") with `--config.data.train_paths=...` on sweep.py.
"""

from neox_jax.sweep import Sweep, grid


def get_sweep():
    return Sweep(config="configs/pythia.py:160m",
                 runs=[{**lr, **batch} for lr in grid({"optimizer.lr": [3e-4, 6e-4, 1.2e-3]})
                       for batch in ({"train.batch_size": 512, "train.micro_batches": 2},
                                     {"train.batch_size": 1024, "train.micro_batches": 4})],
                 fixed={"train.steps": 20_000})
