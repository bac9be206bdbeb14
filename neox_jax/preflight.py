"""Preflight: the checks a cluster launch can fail at start, on every process, before anything is trained.

`scripts/train.py --preflight` with the flags, config and workdir of the real run joins the processes (with a
start-up timeout of DEFAULT_TIMEOUT s, or $NEOX_JAX_PREFLIGHT_TIMEOUT), then checks on each
process: its host and devices, that the config's mesh fits the devices, that the workdir is one directory shared
by every process and writable, that the data opens and passes the run's own checks (the trainer's functions, not
copies), and that the workdir's filesystem has room for the checkpoints the config keeps. Each process's findings
are gathered to process 0, which prints one line per process and per check, then one `FATAL:` line per problem
naming the processes it was found on (a problem every process has is one line); the status is 0 when every check
passed, 2 otherwise, on every process. Nothing is written but a token file (removed again) and the workdir's lock
files, which a run rewrites.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import secrets
import socket
import sys
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from neox_jax import checkpoint as ckpt_lib
from neox_jax import config as cfg
from neox_jax import distributed, errors, setup, sharding, trainer
from neox_jax import train as train_lib
from neox_jax import workdir as workdir_lib
from neox_jax.data import dataset, indexed
from neox_jax.layout import gb

# Seconds to wait for every process to join. A run's start-up timeout (NEOX_JAX_INIT_TIMEOUT, 300 by default,
# 600 in scripts/slurm/train.sbatch) is sized for slow starts of big jobs; a preflight is run to find a launch
# that cannot join, so it says so sooner, whatever the run's variable says.
ENV_TIMEOUT, DEFAULT_TIMEOUT = "NEOX_JAX_PREFLIGHT_TIMEOUT", 60
TOKEN = ".preflight_token"  # written by process 0, read by the others: the workdir is one shared directory


@dataclasses.dataclass
class Findings:
    """One process's view: who it is, what passed (`facts`, printed by process 0 from its own) and what did not."""

    process: int
    host: str
    devices: str
    facts: list = dataclasses.field(default_factory=list)
    problems: list = dataclasses.field(default_factory=list)

    def check(self, what: str, fn):
        """fn()'s value; a fault the user can fix (a UserError, an OSError) is a problem `what: message`, and None."""
        try:
            return fn()
        except errors.UserError as e:
            self.problems.append(f"{what}{str(e).strip()}")
        except OSError as e:
            self.problems.append(f"{what}{errors.os_error_line(e)}")
        return None


def run(config, workdir: str, coordinator_address=None, num_processes=None, process_id=None) -> int:
    """Run every check of a launch of `config` in `workdir` on this process; returns the exit status (0 all
    passed, 2 a problem on any process), the same on every process. Process 0 prints the report."""
    start = time.perf_counter()
    timeout = distributed.env_int(ENV_TIMEOUT) or DEFAULT_TIMEOUT
    distributed.initialize(coordinator_address, num_processes, process_id, initialization_timeout=timeout)
    joined = time.perf_counter() - start
    d = jax.local_devices()[0]
    mine = Findings(jax.process_index(), socket.gethostname(),
                    f"{jax.local_device_count()} {d.platform} device(s) ({d.device_kind}), pid {os.getpid()}")
    if jax.process_count() > 1:
        mine.facts.append(f"joined {jax.process_count()} processes through the coordinator in {joined:.1f} s")
    run_setup = mine.check("", lambda: setup.build(cfg.validate(config), sharding.make_mesh(config)))
    if run_setup is not None:
        mine.facts.append(trainer.describe_devices(run_setup.mesh))
    workdir = os.path.abspath(workdir)
    usable = check_workdir(mine, workdir)
    check_data(mine, config, run_setup)
    if usable and run_setup is not None:
        check_disk(mine, run_setup, workdir)
    everyone = [Findings(**f) for f in gather(dataclasses.asdict(mine))]
    status = 2 if any(f.problems for f in everyone) else 0
    if mine.process == 0:
        report(everyone, mine.facts, time.perf_counter() - start)
    if jax.process_count() > 1:  # srun --kill-on-bad-exit would stop process 0 mid-report when another exits 2
        multihost_utils.sync_global_devices("neox_jax preflight reported")
    return status


def check_workdir(mine: Findings, workdir: str) -> bool:
    """Process 0 writes a random token into `workdir`; every other process must read the same token there (one
    directory on storage they all share), and every process creates and removes a file of its own. Then the
    workdir's lock, as a run takes it (a run holding it is a problem). Returns whether every process passed."""
    where, before = f"--workdir {workdir}: ", len(mine.problems)
    token_path = os.path.join(workdir, TOKEN)
    token = secrets.token_bytes(16) if mine.process == 0 else bytes(16)
    wrote = mine.process == 0 and mine.check(where, lambda: _write(token_path, token)) is not None
    if jax.process_count() > 1:  # also the barrier: process 0 has written the token when this returns
        sent = multihost_utils.broadcast_one_to_all(np.frombuffer(bytes([wrote]) + token, np.uint8))
        if mine.process != 0 and sent[0]:
            mine.check(where, lambda: _compare_token(token_path, bytes(np.asarray(sent[1:], np.uint8))))
    scratch = os.path.join(workdir, f".preflight.{mine.process}.{os.getpid()}")
    mine.check(where, lambda: _write(scratch, b"preflight") and os.remove(scratch))
    usable = not workdir_lib.any_process(len(mine.problems) > before)  # the others have read the token
    if wrote:
        mine.check(where, lambda: os.remove(token_path))
    if usable:
        mine.check("", lambda: _take_lock(workdir))
    if usable and len(mine.problems) == before:
        shared = "shared by every process, " if jax.process_count() > 1 else ""
        mine.facts.append(f"workdir {workdir}: {shared}writable, not in use by another run")
    return usable


def _take_lock(workdir: str) -> None:
    """Take and release the workdir's lock as a run does: another run holding it is a WorkdirBusyError."""
    with workdir_lib.hold_workdir(workdir):
        pass


def _write(path: str, content: bytes) -> bool:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    return True


class NotSharedError(errors.InputError):
    """The workdir a process sees is not the directory process 0 wrote its token into."""


def _compare_token(path: str, token: bytes) -> None:
    hint = ("every process needs the same --workdir, on storage all hosts mount (a node-local disk is not; "
            "checkpoints are written by every process into one directory)")
    if not os.path.isfile(path):
        raise NotSharedError(f"not shared with process 0: the token file ({TOKEN}) process 0 just wrote into its "
                             f"--workdir is not there; {hint}")
    with open(path, "rb") as f:
        if f.read() != token:
            raise NotSharedError(f"not shared with process 0: {TOKEN} there holds another token than the one "
                                 f"process 0 just wrote (another preflight at the same time?); {hint}")


def check_data(mine: Findings, config, run_setup) -> None:
    """The checks a run makes of its data before its first step: the tokenizer against the padded vocabulary, each
    training dataset opened with its ids checked (`dataset.run_datasets`); once every process passed those, the
    training order built and fingerprinted and the validation batches made, as the trainer makes them."""
    before = len(mine.problems)
    if run_setup is not None:
        mine.check("", lambda: trainer.check_tokenizer(run_setup.config, run_setup.model_config))
    prefixes = mine.check("", lambda: dataset.run_datasets(config, dataset.train_spec(config), "data.train_paths"))
    # the order index is built by process 0 first, behind a barrier: every process must get there
    if workdir_lib.any_process(prefixes is None):
        return
    it = mine.check("", lambda: dataset.make_train_iterator(config))
    if it is not None:
        mine.check("", it.fingerprints)
        it.close()
    val = mine.check("", lambda: dataset.make_val_batches(config) if config.train.eval_every else None)
    if len(mine.problems) == before:
        tokens = sum(indexed.IndexedDataset(p).num_tokens for p in prefixes)
        mine.facts.append(f"data: {len(prefixes)} training dataset(s), {tokens:,} tokens, order {config.data.order}"
                          + (f"; validation: {len(val)} batches" if val is not None else "; no validation set"))


def checkpoint_bytes(run_setup: setup.RunSetup) -> int:
    """Bytes of one checkpoint's arrays: the whole train state (params, optimizer state, master weights if any)
    at its global shapes, as orbax writes it (each shard once, whatever the process count)."""
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(train_lib.state_shapes(run_setup)))


def checkpoints_to_come(t, saved: list[int]) -> int:
    """How many checkpoints the disk must find room for, beyond the `saved` steps already in the workdir, for the
    run of train config `t` at its peak: a save, while the ones rotation keeps are still there (the newest
    train.keep_checkpoints, 0: all, every multiple of train.keep_every and the train.checkpoint_steps;
    checkpoint._Rotation). A save comes every train.checkpoint_every steps, at each scheduled step (step 0 first,
    when the schedule holds it and nothing is saved) and at train.steps."""
    every, keep, forever_every = t.checkpoint_every, t.keep_checkpoints, t.keep_every
    start = max(saved, default=0)
    if t.steps <= start:
        return 0
    schedule = set(cfg.checkpoint_schedule(getattr(t, "checkpoint_steps", ""), t.steps))
    saves = set(range(start // every * every + every, t.steps, every)) | {t.steps}
    saves |= {s for s in schedule if start < s or (s == 0 and not saved)}
    if not keep:
        return len(saves)
    permanent = {s for s in saved if s in schedule or (forever_every and s % forever_every == 0)}
    recent = collections.deque(sorted(saved)[-keep:], maxlen=keep)  # saves arrive in order: the newest K
    peak = len(permanent | set(recent))
    for s in sorted(saves):
        peak = max(peak, len(permanent | set(recent) | {s}))
        recent.append(s)
        if s in schedule or (forever_every and s % forever_every == 0):
            permanent.add(s)
    return max(0, peak - len(saved))


def saved_steps(workdir: str) -> list[int]:
    """The step folders of `workdir`'s checkpoints (intact or not: each takes its room)."""
    folder = ckpt_lib.checkpoint_dir(workdir)
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def check_disk(mine: Findings, run_setup: setup.RunSetup, workdir: str) -> None:
    """Free space on the workdir's filesystem against the checkpoints this run will add to it."""
    line = mine.check(f"--workdir {workdir}: ", lambda: _disk_line(run_setup, workdir))
    if line is not None:
        mine.facts.append(line)


def _disk_line(run_setup: setup.RunSetup, workdir: str) -> str:
    t = run_setup.config.train
    each = checkpoint_bytes(run_setup)
    count = checkpoints_to_come(t, saved_steps(workdir))
    stat = os.statvfs(workdir)
    free = stat.f_bavail * stat.f_frsize
    if not count:
        return f"disk: {gb(free)} free in the workdir's filesystem; the run adds no checkpoint (it is at train.steps)"
    need = f"{gb(count * each)} for {count} more checkpoint(s) of {gb(each)}"
    if count * each > free:
        raise errors.InputError(
            f"{gb(free)} free on its filesystem, the run needs {need} (those train.keep_checkpoints="
            f"{t.keep_checkpoints} and train.keep_every={t.keep_every} keep, and the one being written); free space, "
            "use another --workdir, or lower train.keep_checkpoints")
    return f"disk: {gb(free)} free in the workdir's filesystem; the run needs {need}"


def gather(obj) -> list:
    """`obj` (JSON-able) of every process, in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _who(processes: list[Findings], count: int) -> str:
    if len(processes) == count > 1:
        return f"all {count} processes"
    hosts = sorted({f.host for f in processes})
    ids = ", ".join(str(f.process) for f in processes)
    return f"process{'es' if len(processes) > 1 else ''} {ids} on {', '.join(hosts)}"


def report(everyone: list[Findings], facts: list[str], seconds: float) -> None:
    """Process 0's output: one line per process and per passed check (stdout), one `FATAL:` line per problem,
    naming the processes that found it (stderr), then the verdict."""
    print(f"preflight: {len(everyone)} process(es)", flush=True)
    for f in everyone:
        print(f"  process {f.process} on {f.host}: {f.devices}")
    for line in facts:
        print(f"  {line}")
    found: dict[str, list[Findings]] = {}
    for f in everyone:
        for problem in f.problems:
            found.setdefault(problem, []).append(f)
    for problem, where in found.items():
        print(f"FATAL: {_who(where, len(everyone))}: {problem}", file=sys.stderr)
    verdict = f"{len(found)} problem(s), one FATAL line each on stderr" if found else "every check passed; nothing was trained"
    print(f"preflight: {verdict} ({seconds:.1f} s)", flush=True)
