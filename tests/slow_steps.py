"""`python tests/slow_steps.py scripts/train.py ARGS...`: train.py with every step $SLOW_STEP_SECONDS longer (a
sleep before each batch is placed) in a SLURM job's first attempt, so that the tiny model's run spans SLURM's
time-limit warning the way a real model's does; a requeued attempt runs at full speed. The numbers are untouched:
the run's losses are the plain run's, bit for bit."""

import os
import runpy
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import sharding  # noqa: E402

_place = sharding.global_batch


def _slow(*args, **kwargs):
    time.sleep(float(os.environ.get("SLOW_STEP_SECONDS", "0.5")))
    return _place(*args, **kwargs)


if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sharding.global_batch = _slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
