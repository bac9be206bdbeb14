#!/usr/bin/env python
"""Train a GPT-NeoX model.

    python scripts/train.py                                   # configs/tiny.py on the bundled Pile sample
    python scripts/train.py --config configs/pythia.py:160m --config.optimizer.lr=3e-4 \
        --config.mesh.tensor=2 --workdir runs/x

Any config field can be overridden with --config.path.to.field=value. A --workdir holding a checkpoint resumes.
Exit status: 0 done or preempted (SIGTERM/SIGINT: the step finishes and a checkpoint is saved), 2 bad flag,
config or data, 1 the run cannot go on (checkpoint mismatch, no intact checkpoint, full disk, workdir in use, too
many non-finite steps in a row); both with one `FATAL:` line on stderr (README, "When something goes wrong").
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402

from neox_jax import cli, errors  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, plots); default runs/<config>.")
# multi-process runs without a cluster launcher that JAX detects (SLURM, Open MPI): see README "Running on a cluster"
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


@errors.guarded
def main(argv, config, config_spec):
    if len(argv) > 1:
        raise errors.InputError(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    from neox_jax import targets

    targets.apply_xla_flags()  # GPU-only flags; must precede JAX's backend start-up
    import jax

    from neox_jax import distributed, trainer

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and grain log every save and read at INFO
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    workdir = _WORKDIR.value or cli.default_workdir(config_spec)
    logging.info("workdir %s", workdir)
    try:
        last = trainer.train(config, workdir)
    except Exception as e:  # noqa: BLE001 - a lost peer must not wait in the runtime's shutdown barrier
        if distributed.is_peer_failure(e):
            distributed.abort_peer_failure(e, workdir)
        raise
    if jax.process_index() == 0:
        print(cli.summary(last, workdir), flush=True)


if __name__ == "__main__":
    cli.run_with_config(main, DEFAULT_CONFIG)
