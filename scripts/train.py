#!/usr/bin/env python
"""Train a GPT-NeoX model.

    python scripts/train.py                                   # configs/tiny.py on the bundled Pile sample
    python scripts/train.py --config configs/pythia.py:160m --config.optimizer.lr=3e-4 \
        --config.mesh.tensor=2 --workdir runs/x

Any config field can be overridden with --config.path.to.field=value. A --workdir holding a checkpoint resumes.
Exit status: 0 done (train.steps reached), 75 stopped early by SIGTERM, SIGINT or SIGUSR1 (the step finishes and a
checkpoint is saved: run the same command again to resume; SLURM jobs requeue themselves on it), 2 bad flag,
config or data, 1 the run cannot go on (checkpoint mismatch, no intact checkpoint, full disk, workdir in use, too
many non-finite steps in a row); both with one `FATAL:` line on stderr (README, "When something goes wrong").
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402  (orbax and grain log through absl)

from neox_jax import cli, errors, goodput  # noqa: E402
from neox_jax import workdir as workdir_lib  # noqa: E402
from neox_jax import config as cfg  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def verbosity(text: str) -> str:
    """argparse type: an absl logging level, by name or absl's number (-3 fatal .. 0 info, 1 debug)."""
    try:
        int(text)
    except ValueError:
        if text.upper() not in logging.converter.ABSL_NAMES:
            raise argparse.ArgumentTypeError(f"expected debug, info, warning, error, fatal or a number, got {text!r}"
                                             ) from None
    return text


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=cli.CONFIG_HELP)
    p.add_argument("--workdir", help="Run directory (checkpoints, metrics, plots); default runs/<config>.")
    # multi-process runs without a cluster launcher that JAX detects (SLURM, Open MPI): see README "Running on a
    # cluster"
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (multi-process runs).")
    p.add_argument("--num_processes", type=int, help="Number of processes (multi-process runs).")
    p.add_argument("--process_id", type=int, help="This process's index in [0, num_processes).")
    p.add_argument("--preflight", action=cli.Switch, help="Check this launch on every process and exit, training "
                   "nothing: hosts and devices, the mesh, a shared writable workdir, the data, free disk for the "
                   "checkpoints, the coordinator (README, \"Preflight\"); exit 0 all passed, 2 one line per problem.")
    p.add_argument("--verbosity", "-v", type=verbosity, help="absl logging level (orbax, grain); default warning: "
                   "they log every save and read at info")
    return cli.parse_args_with_config(p, argv)


@errors.guarded
def main(argv=None):
    args = parse(argv)
    # a cluster's stop signal during start-up (the time-limit warning, a preemption) is kept for the loop, which
    # then saves after its first step: unhandled it would kill the process with nothing saved. Ctrl-C still
    # interrupts start-up at once.
    stop = workdir_lib.StopFlag()
    stop.install((signal.SIGTERM, signal.SIGUSR1))
    config = cfg.from_spec(args.config, args.overrides, "--config")
    from neox_jax import targets

    targets.apply_xla_flags()  # GPU-only flags; must precede JAX's backend start-up
    import jax

    from neox_jax import distributed, preflight, trainer

    logging.set_verbosity(args.verbosity or logging.WARNING)
    workdir = args.workdir or cli.default_workdir(args.config)
    if args.preflight:
        return preflight.run(config, workdir, args.coordinator_address, args.num_processes, args.process_id)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    logging.info("workdir %s", workdir)
    try:
        task_eval = None
        if config.train.eval_tasks:  # lm-eval is optional: loaded only for a run that scores tasks
            from neox_jax import evaluate

            task_eval = evaluate.LoopEvaluator(config)
        last = trainer.train(config, workdir, stop=stop, started=goodput.process_start(),  # start-up counts from there
                             task_eval=task_eval)
    except Exception as e:  # noqa: BLE001 - a lost peer must not wait in the runtime's shutdown barrier
        if distributed.is_peer_failure(e):
            distributed.abort_peer_failure(e, workdir)
        raise
    if jax.process_index() == 0:
        print(cli.final_line(last, workdir), flush=True)
    return 0 if last["step"] >= config.train.steps else errors.EXIT_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())
