"""The run directory a training run owns: its lock, the stop signals the run answers, and its config.json."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import time

import numpy as np

from neox_jax import errors, files

# jax is imported by the functions that use it: scripts/train.py installs the stop signals before JAX loads


class WorkdirBusyError(errors.RunFailure):
    """Another training run holds the workdir."""


def any_process(flag: bool) -> bool:
    """True on every process when it is true on one (a preemption signal may reach only some hosts)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


@contextlib.contextmanager
def hold_workdir(workdir: str):
    """This process's exclusive hold on `workdir` for the length of a run: an flock on `workdir/.lock.<process
    index>` (the processes of one run lock different files, so it also works with several processes per host).
    The kernel releases it when the process ends, kill -9 included, so a dead run never leaves it stuck. A second
    run on the same workdir (which would interleave metrics.jsonl and race the checkpoints) stops at once with
    one WorkdirBusyError naming the holder, on every process (the verdicts are gathered)."""
    import jax

    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, f".lock.{jax.process_index()}"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder = None
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
    if any_process(holder is not None):
        f.close()
        holder = holder or "its lock file for another process of this run is held"
        raise WorkdirBusyError(f"workdir {workdir} is in use by another training run ({holder}); wait for it to "
                               "end, or give another --workdir")
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclasses.dataclass
class StopFlag:
    """Set by SIGTERM, SIGINT or SIGUSR1: the loop finishes the current step, saves and returns. SIGUSR1 is what
    clusters send ahead of a time limit when asked (`sbatch --signal=USR1@300`); unhandled, it kills the process."""

    signal: int | None = None

    def __call__(self, signum, frame):
        self.signal = signum

    def install(self, signals=STOP_SIGNALS):
        """Answer `signals` from now on; returns the function that puts the previous handlers back."""
        previous = {s: signal.signal(s, self) for s in signals}
        return lambda: [signal.signal(s, h) for s, h in previous.items()]


def write_config(workdir: str, config) -> None:
    """`workdir/config.json`: the resolved run config, for the tools that read a workdir."""
    with files.atomic_path(f"{workdir}/config.json") as tmp:  # never a torn file for the tools that read it
        tmp.write_text(config.to_json(indent=1))
