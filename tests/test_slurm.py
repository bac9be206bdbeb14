"""The SLURM path on a real SLURM: a one-node cluster (scripts/slurm/local_cluster.sh: slurmctld + slurmd on
loopback) runs scripts/slurm/train.sbatch and a sweep's job array as a cluster would.

The jobs are submitted together when the module starts (the node is oversubscribed, so they overlap) and each
test waits for its own: 2 tasks as 2 JAX processes found through SLURM's variables; a run stopped by `scancel
--signal=TERM` that requeues itself and finishes; a run whose --time is shorter than itself, warned by
--signal=B:USR1, that requeues itself and finishes; a sweep array with a failing task. SLURM holds a requeued job
for about 2 minutes before it may start again; the tests release it after 5 s (`scontrol update StartTime=now`).

Needs SLURM's daemons (Debian/Ubuntu: apt install slurm-wlm; .ci/run installs them) and root; skipped otherwise.
The checks of train.sbatch's requeue logic with stand-in SLURM commands run everywhere.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import zstandard

from conftest import ROOT, SMALL_VOCAB, script_env
from neox_jax import config as cfg
from neox_jax import metrics, trainer
from neox_jax.data import default_paths, preprocess

SBATCH = str(ROOT / "scripts" / "slurm" / "train.sbatch")
CLUSTER = str(ROOT / "scripts" / "slurm" / "local_cluster.sh")
TINY = str(ROOT / "configs" / "tiny.py")
# the tiny config shrunk further, on the 512-id tokenizer; a constant checkpoint schedule that only the stop signals
# and the end trigger
RUN = {**SMALL_VOCAB, "model.num_layers": 2, "model.hidden_size": 64, "train.seq_len": 32, "train.batch_size": 8,
       "train.log_every": 1, "train.eval_every": 0, "optimizer.warmup_steps": 2, "train.steps": 60,
       "train.checkpoint_every": 1000}
# seconds added to each step of the requeued runs' first attempts (tests/slow_steps.py): the preempted one is still
# running when 3 steps are logged; the time-limited one's 60 steps (240 s) outlast the warning, which comes 30-60 s
# into a 3-minute job
SLOW_STEP = {"preempt": 0.5, "time": 4.0}
# the time-limited job: the warning leaves 120-150 s to finish a step and save, enough for the tiny model's start-up
# and compile on a loaded 2-core CI machine (85 s and 86 s seen there; with @60 in a 2-minute job the limit struck
# before the first step was done). A 3-minute job is the shortest with that margin: the test waits ~1 minute less
# than with a 4-minute one. train.py answers USR1 from its first lines, so an early warning finds the handler.
TIME_LIMIT = ["--time=3", "--signal=B:USR1@150"]
ON_CPU = ["--gpus-per-node=0", "--cpus-per-task=1", "--oversubscribe", "--nodes=1"]
JOB_TIMEOUT = 600  # seconds for any one job, requeues included, on a loaded 2-core machine


def _missing() -> str | None:
    tools = [t for t in ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo") if not shutil.which(t)]
    if tools:
        return f"SLURM not installed ({', '.join(tools)} missing; apt install slurm-wlm)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", 0))
                port = a.getsockname()[1]
                b.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def _args(workdir, **extra) -> list[str]:
    return ["--config", TINY, *(f"--config.{k}={v}" for k, v in {**RUN, **extra}.items()), "--workdir", str(workdir)]


def _job_env(env: dict, devices: int, python: str = sys.executable, **extra) -> dict:
    run = script_env(devices, PYTHON=python, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
                     NEOX_JAX_INIT_TIMEOUT="120", PYTHONUNBUFFERED="1", **extra)
    run.pop("JAX_COMPILATION_CACHE_DIR", None)  # multi-device CPU executables from the cache can deadlock
    run["SLURM_CONF"] = env["SLURM_CONF"]
    return run


def _sbatch(env: dict, *args) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def _jobs(env: dict, job: str) -> list[dict]:
    """scontrol's fields of `job` (one dict per array task; every job for "")."""
    out = subprocess.run(["scontrol", "-o", "show", "job", *([job] if job else [])], capture_output=True, text=True,
                         env=env, timeout=30)
    return [dict(f.split("=", 1) for f in line.split() if "=" in f) for line in out.stdout.splitlines() if line]


_HELD: dict[str, float] = {}  # requeued job -> when it was first seen held
LIFT_LIMIT: set[str] = set()  # jobs whose time limit is lifted once they have requeued (the test's length)


def _release(env: dict) -> None:
    """Start every requeued job SLURM holds (for about 2 minutes after a requeue) 5 s after its requeue rather than
    at once: a job started again within a second of its requeue fails at launch (its credential counts as revoked)."""
    for t in _jobs(env, ""):
        if t["JobState"] == "PENDING" and t.get("Reason") == "BeginTime" and int(t.get("Restarts", 0)):
            key = f"{t['JobId']}.{t['Restarts']}"
            if time.monotonic() - _HELD.setdefault(key, time.monotonic()) >= 5:
                lift = ["TimeLimit=10"] if t["JobId"] in LIFT_LIMIT else []
                subprocess.run(["scontrol", "update", f"JobId={t['JobId']}", "StartTime=now", *lift], env=env,
                               timeout=30)


def _wait(env: dict, job: str, timeout: float = JOB_TIMEOUT) -> list[dict]:
    """Wait until every task of `job` has ended, releasing requeued jobs from SLURM's hold at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _release(env)
        tasks = _jobs(env, job)
        if tasks and all(t["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                         for t in tasks):
            return tasks
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, timeout=30)
    raise AssertionError(f"job {job} did not end within {timeout} s: {_jobs(env, job)}")


def _losses(workdir) -> dict[int, float]:
    """The last logged loss of each step (a step re-run after a resume replaces the earlier one)."""
    return {r["step"]: r["loss"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if r["split"] == "train"}


def _log(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = _missing()
    if missing:
        pytest.skip(missing)
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, NEOX_SLURM_PORT=str(_free_port_pair()), SLURM_CONF=str(state / "slurm.conf"))
    out = subprocess.run([CLUSTER, "start", str(state)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    yield env
    subprocess.run([CLUSTER, "stop", str(state)], env=env, timeout=60)  # ends the jobs, then the daemons


class _Minder(threading.Thread):
    """While the tests' jobs run: releases requeued ones from SLURM's hold, and preempts the `preempt` job (`scancel
    --signal=TERM`) once it has logged a few steps. Runs beside the reference run this process trains meanwhile."""

    def __init__(self, env: dict, job: str, workdir):
        super().__init__(daemon=True)
        self.env, self.job, self.workdir = env, job, workdir
        self.preempted_at: int | None = None  # the number of steps logged when it was preempted
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            _release(self.env)
            steps = len(_losses(self.workdir)) if (self.workdir / "metrics.jsonl").exists() else 0
            if self.preempted_at is None and steps >= 3:
                subprocess.run(["scancel", "--signal=TERM", self.job], env=self.env, check=True, timeout=30)
                self.preempted_at = steps


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    """Every job of the module, submitted at once, minded by a `_Minder`: (tmp dir, {name: job id}, the minder, the
    losses of the uninterrupted 1-process run, trained here meanwhile)."""
    tmp = tmp_path_factory.mktemp("jobs")
    slow = tmp / "slow_python"
    slow.write_text(f"#!/bin/bash\nexec {sys.executable} {ROOT / 'tests' / 'slow_steps.py'} \"$@\"\n")
    slow.chmod(0o755)
    slow_env = {name: _job_env(cluster, 8, str(slow), SLOW_STEP_SECONDS=str(seconds), NEOX_JAX_MAX_REQUEUES="4")
                for name, seconds in SLOW_STEP.items()}
    submitted = {}
    submitted["time"] = _sbatch(slow_env["time"], *ON_CPU, "--ntasks-per-node=1", *TIME_LIMIT,
                                f"--output={tmp}/time.out", SBATCH, *_args(tmp / "time"))
    LIFT_LIMIT.add(submitted["time"])
    submitted["preempt"] = _sbatch(slow_env["preempt"], *ON_CPU, "--ntasks-per-node=1", f"--output={tmp}/preempt.out",
                                   SBATCH, *_args(tmp / "preempt"))
    submitted["two"] = _sbatch(_job_env(cluster, 4), *ON_CPU, "--ntasks-per-node=2", f"--output={tmp}/two.out",
                               SBATCH, *_args(tmp / "two", **{"train.steps": 12}))
    submitted["sweep"] = _submit_sweep(cluster, tmp)
    submitted["data"] = _submit_preprocess(cluster, tmp)
    minder = _Minder(cluster, submitted["preempt"], tmp / "preempt")
    minder.start()
    trainer.train(cfg.from_spec(TINY, RUN), str(tmp / "reference"))  # the jobs mostly sleep meanwhile
    yield tmp, submitted, minder, _losses(tmp / "reference")
    minder.done.set()
    minder.join()


def _submit_sweep(cluster: dict, tmp) -> str:
    sweep = tmp / "three.py"
    sweep.write_text(textwrap.dedent(f"""
        from neox_jax.sweep import Sweep

        def get_sweep():
            return Sweep(config={TINY!r}, fixed={{**{SMALL_VOCAB!r}, "model.num_layers": 1, "model.hidden_size": 32,
                         "model.num_heads": 2, "train.seq_len": 16, "train.batch_size": 8, "train.steps": 3,
                         "train.eval_every": 0, "optimizer.warmup_steps": 1}},
                         runs=[{{"optimizer.lr": 1e-3}}, {{"optimizer.lr": 3e-3}},
                               {{"data.train_paths": "/nonexistent/pile_text_document"}}])
        """))
    out = subprocess.run([sys.executable, "scripts/sweep.py", "--sweep", str(sweep), "--emit", "slurm",
                          "--runs_dir", str(tmp / "runs"), "--gpus_per_node", "1", "--parallel", "2"],
                         capture_output=True, text=True, cwd=ROOT, env=cluster, timeout=120)
    assert out.returncode == 0, out.stderr
    return _sbatch(_job_env(cluster, None), *ON_CPU, "--ntasks-per-node=1",
                   str(tmp / "runs" / "three" / "sweep.sbatch"))


def _submit_preprocess(cluster: dict, tmp) -> str:
    """preprocess_data.py --parts 3 --slurm: one command writes and submits the array and the merge; returns the
    merge's job id."""
    shards = tmp / "shards"
    shards.mkdir()
    lines = zstandard.ZstdDecompressor().decompressobj().decompress(
        open(default_paths()["val"], "rb").read()).splitlines()
    for i in range(4):
        (shards / f"{i}.jsonl").write_bytes(b"\n".join(lines[i::4]) + b"\n")
    out = subprocess.run([sys.executable, "scripts/preprocess_data.py", str(shards), "--output-prefix",
                          str(tmp / "data" / "val"), "--parts", "3", "--workers", "1", "--slurm",
                          "--slurm-args=--oversubscribe --gpus-per-node=0"],
                         capture_output=True, text=True, cwd=ROOT, env=_job_env(cluster, None), timeout=120)
    assert out.returncode == 0, out.stderr
    return re.search(r"and the merge as job (\d+) ", out.stdout)[1]


@pytest.mark.slow
def test_preprocessing_parts_run_as_a_slurm_array_then_merge_into_the_single_run_bytes(cluster, jobs):
    tmp, submitted, _, _ = jobs
    [merge] = _wait(cluster, submitted["data"])
    assert merge["JobState"] == "COMPLETED", _log(tmp / "data" / "val.merge.log")
    assert "merged 3 parts: " in _log(tmp / "data" / "val.merge.log")
    preprocess.preprocess(str(tmp / "shards"), str(tmp / "one"), progress=False)
    for suffix in (".bin", ".idx"):
        assert filecmp.cmp(f"{tmp}/one{suffix}", f"{tmp}/data/val{suffix}", shallow=False)
    assert sorted(os.listdir(tmp / "data")) == ["val.bin", "val.idx", "val.manifest.json", "val.merge.log",
                                                "val.merge.sbatch", "val.part-0.log", "val.part-1.log",
                                                "val.part-2.log", "val.parts.sbatch"]


@pytest.mark.slow
def test_a_preempted_job_checkpoints_requeues_itself_and_ends_with_the_uninterrupted_losses(cluster, jobs):
    tmp, submitted, minder, reference = jobs
    [task] = _wait(cluster, submitted["preempt"])
    log = _log(tmp / "preempt.out")
    assert minder.preempted_at is not None, log  # scancel --signal=TERM once 3 steps were logged
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) == 1, log
    assert "(signal SIGTERM); checkpoint saved" in log and "requeueing (requeue 1 of at most 4)" in log
    assert "resumed from" in log and "done: step 60" in log
    assert _losses(tmp / "preempt") == reference  # bit for bit, every step
    # goodput carried over the requeue: 2 attempts, the time between them counted as downtime
    [*_, last] = [r for r in metrics.read_jsonl(str(tmp / "preempt" / "metrics.jsonl")) if r["split"] == "goodput"]
    assert last["attempt"] == 2 and last["downtime_s"] > 0 and "over 2 attempts" in log.splitlines()[-1], last


@pytest.mark.slow
def test_a_job_shorter_than_its_run_requeues_on_the_time_limit_warning_until_done(cluster, jobs):
    """--time=3 with --signal=B:USR1@150: SLURM warns the batch script, which stops the tasks; they checkpoint and
    the job requeues itself. SLURM checks time limits every 30 s, so the warning lands 30-60 s into an attempt, at
    times while the run is still starting on a loaded machine (then the step after start-up is saved, and the next
    attempt may make as little progress): to bound the test's length, the limit of the requeued job is lifted to 10
    minutes as it is released, and that attempt runs to the end."""
    tmp, submitted, _, reference = jobs
    [task] = _wait(cluster, submitted["time"])
    log = _log(tmp / "time.out")
    assert task["JobState"] == "COMPLETED" and int(task["Restarts"]) == 1, log
    assert log.count("signal received; the tasks finish their step") == 1
    assert "(signal SIGUSR1); checkpoint saved in" in log and "requeueing (requeue 1 of at most 4)" in log
    assert "DUE TO TIME LIMIT" not in log  # the attempt ended on the warning, before SLURM killed it
    assert "done: step 60" in log
    assert _losses(tmp / "time") == reference


@pytest.mark.slow
def test_train_sbatch_runs_two_tasks_as_two_jax_processes_with_the_one_process_losses(cluster, jobs):
    tmp, submitted, _, _ = jobs
    [task] = _wait(cluster, submitted["two"])
    log = _log(tmp / "two.out")
    assert task["JobState"] == "COMPLETED", log
    assert "topology: 2 process(es), 8 cpu devices (4 local" in log and "done: step 12" in log
    got = _losses(tmp / "two")
    # the 1-process run to 12 steps is the reference's first 12 (a cosine over 12 steps decays faster: rerun it)
    first = trainer.train(cfg.from_spec(TINY, {**RUN, "train.steps": 12}), str(tmp / "reference12"))
    assert first["step"] == 12
    want = _losses(tmp / "reference12")
    assert sorted(got) == list(range(1, 13))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)], rtol=2e-5)


@pytest.mark.slow
def test_a_sweep_array_runs_on_slurm_and_its_failed_task_is_summarized_with_its_fatal_line(cluster, jobs):
    tmp, submitted, _, _ = jobs
    tasks = _wait(cluster, submitted["sweep"])
    assert sorted(t["JobState"] for t in tasks) == ["COMPLETED", "COMPLETED", "FAILED"], tasks
    runs = tmp / "runs" / "three"
    failed = runs / "train_paths=_nonexistent_pile_text_document"
    fatal = [line for line in _log(failed / "sweep_run.log").splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and "/nonexistent/pile_text_document" in fatal[0], _log(failed / "sweep_run.log")
    out = subprocess.run([sys.executable, "scripts/sweep.py", "--summarize", str(runs)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.strip()}
    assert "done" in rows["lr=0.001"] and "done" in rows["lr=0.003"], out.stdout
    assert fatal[0] in rows[failed.name], out.stdout


# ---- train.sbatch's requeue logic with stand-in SLURM commands (runs everywhere) ----------------------------

def _stand_ins(tmp_path, srun_body: str) -> dict:
    """A PATH whose srun runs `srun_body` (as bash) and whose scontrol / scancel record their arguments; scancel
    --signal=SIG sends SIG to the running srun, as SLURM would to its tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "srun").write_text(f"#!/bin/bash\necho $$ > {tmp_path}/srun.pid\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"scontrol $*\" >> {calls}\n")
    (bin_dir / "scancel").write_text(f"#!/bin/bash\necho \"scancel $*\" >> {calls}\n"
                                     f"kill -${{1#--signal=}} $(cat {tmp_path}/srun.pid)\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_NNODES="1",
                SLURM_JOB_NODELIST="n1", SLURM_NTASKS="1", PYTHON="python", VENV=str(tmp_path / "no-venv"))


def _calls(tmp_path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("restarts, status, calls", [
    (0, 0, []),                                          # the run finished: nothing to do
    (0, 75, ["scontrol requeue 42"]),                    # stopped with a checkpoint: requeue
    (3, 75, []),                                         # the bound reached: stop, exit 75
    (0, 2, []),                                          # a bad flag: no requeue, its status
])
def test_train_sbatch_requeues_a_resumable_stop_within_the_bound(tmp_path, restarts, status, calls):
    env = _stand_ins(tmp_path, f"exit {status}")
    env.update(SLURM_RESTART_COUNT=str(restarts), NEOX_JAX_MAX_REQUEUES="3")
    out = subprocess.run(["bash", SBATCH], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert _calls(tmp_path) == calls, out.stdout + out.stderr
    assert out.returncode == (0 if calls else status), out.stdout + out.stderr
    if restarts == 3:
        assert "not requeued: already requeued 3 times (NEOX_JAX_MAX_REQUEUES)" in out.stdout


def test_the_time_limit_warning_reaches_the_tasks_and_the_job_requeues(tmp_path):
    """--signal=B:USR1: the batch script passes USR1 on to the tasks (scancel), waits for their exit 75, requeues."""
    env = _stand_ins(tmp_path, "trap 'exit 75' USR1\nwhile :; do sleep 0.1; done")
    proc = subprocess.Popen(["bash", SBATCH], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=ROOT)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert _calls(tmp_path) == ["scancel --signal=USR1 42", "scontrol requeue 42"], out
    assert "signal received; the tasks finish their step and save a checkpoint" in out


def test_summary_marks_a_failed_run_with_its_fatal_line(tmp_path):
    runs = tmp_path / "sweep"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / "sweep_run.log").write_text("sweep run 0: ...\nFATAL: data.train_paths: /x.bin not found\n")
    out = subprocess.run([sys.executable, "scripts/sweep.py", "--summarize", str(runs)], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "failed: FATAL: data.train_paths: /x.bin not found" in out.stdout
