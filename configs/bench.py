"""The benchmark's named shapes: `scripts/benchmark.py train --preset NAME` (and `energy --preset NAME`) times
`--config configs/bench.py:NAME`, which any script takes too. seq_len, batch_size and dtype are the benchmark's
shape; `--preset gpu-anchor` is the pair of GPU rows of the README's table.

  cpu-small   the issue's CPU probe: configs/tiny.py at 4 layers, d 256, seq 256, batch 8, fp32
  cpu-tiny    configs/tiny.py as it is
  gpu-410m    pythia-410m at seq 2048, batch 16, as the README's GPU table measured it (below)
  gpu-1.4b    pythia-1.4b at seq 2048, batch 8, the same
"""

import os

from neox_jax.config import from_spec

_HERE = os.path.dirname(os.path.abspath(__file__))
# The GPU rows' step, as the README's table measured it (fp32 params, bf16 compute, no remat, the head whole, one
# micro-batch): not the Pythia recipe (configs/pythia.py), whose remat and master weights change what is timed.
_AS_MEASURED = {"model.dtype": "bfloat16", "precision.mode": "fp32_params", "precision.loss_scale": "none",
                "model.remat_policy": "none", "train.loss_chunks": 1, "train.micro_batches": 1}
# name: (config file beside this one[:arg], overrides)
PRESETS = {
    "cpu-small": ("tiny.py", {"model.num_layers": 4, "model.hidden_size": 256, "model.num_heads": 4,
                              "train.seq_len": 256, "train.batch_size": 8}),
    "cpu-tiny": ("tiny.py", {}),
    "gpu-410m": ("pythia.py:410m", {"train.seq_len": 2048, "train.batch_size": 16, **_AS_MEASURED}),
    "gpu-1.4b": ("pythia.py:1.4b", {"train.seq_len": 2048, "train.batch_size": 8, **_AS_MEASURED}),
}
# name: the presets it times, one row each
GROUPS = {"gpu-anchor": ("gpu-410m", "gpu-1.4b")}


def get_config(name=None):
    if name not in PRESETS:
        raise ValueError(f"configs/bench.py: unknown preset {name!r}; one of {', '.join(PRESETS)}")
    spec, overrides = PRESETS[name]
    return from_spec(os.path.join(_HERE, spec), overrides)
