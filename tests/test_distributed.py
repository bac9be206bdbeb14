"""Multi-process training through jax.distributed, for real: `scripts/train.py` as 2 processes x 4 simulated CPU
devices talking over loopback (gloo), against the same run as 1 process x 8 devices.

The slow tests share one pair of runs (started concurrently to overlap their start-up on 2 cores); every child is
bounded by a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, SMALL_VOCAB_FLAGS, script_env
from neox_jax import distributed
from tiny_configs import script

TRAIN = str(ROOT / "scripts" / "train.py")
STEPS, CKPT_STEP = 6, 3
# the tiny config shrunk further, on the 512-id tokenizer: what is compared is the multi-process plumbing, not
# the model
TINY = ["--config", str(ROOT / "configs" / "tiny.py"), *SMALL_VOCAB_FLAGS, "--config.model.num_layers=2",
        "--config.model.hidden_size=64", "--config.train.seq_len=32", "--config.train.batch_size=8",
        "--config.train.log_every=1", "--config.train.eval_every=0", "--config.optimizer.warmup_steps=2"]
RUN_TIMEOUT = 240  # seconds for one run of STEPS steps on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_job_id() -> int:
    """A job id whose derived coordinator port (JAX: 61440 + id % 4096) is free here."""
    for port in range(61440 + os.getpid() % 4000, 65536):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 4096 * 1000 + port - 61440
    raise RuntimeError("no free port in 61440..65535")


def _env(devices: int) -> dict:
    env = script_env(devices)
    # multi-device CPU executables loaded from JAX's persistent compilation cache can deadlock in collectives
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.update(JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", NEOX_JAX_INIT_TIMEOUT="120", PYTHONUNBUFFERED="1")
    return env


class Run:
    """One training run as `processes` x `devices` (each process's output in <workdir>.p<i>.log), joined by
    the explicit flags or, with `slurm`, by the environment SLURM gives each task (JAX detects it)."""

    def __init__(self, workdir, processes: int, devices: int, steps: int = STEPS, checkpoint_every: int = CKPT_STEP,
                 slurm: bool = False, heartbeat_timeout: int = 100):
        self.workdir, self.procs, self.logs = str(workdir), [], []
        cluster, job = [], _slurm_job_id() if slurm else None
        if processes > 1 and not slurm:
            cluster = [f"--coordinator_address=127.0.0.1:{_free_port()}", f"--num_processes={processes}"]
        for i in range(processes):
            args = [sys.executable, TRAIN, *TINY, f"--config.train.steps={steps}",
                    f"--config.train.checkpoint_every={checkpoint_every}", f"--workdir={self.workdir}", *cluster]
            env = _env(devices)
            env["NEOX_JAX_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout)
            if slurm:
                env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS=str(processes),
                           SLURM_PROCID=str(i), SLURM_LOCALID=str(i))
            elif processes > 1:
                args.append(f"--process_id={i}")
            log = open(f"{self.workdir}.p{i}.log", "w")
            self.logs.append(log)
            self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT))

    def output(self, i: int = 0) -> str:
        with open(self.logs[i].name) as f:
            return f.read()

    def wait(self, timeout: float = RUN_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        try:
            for i, p in enumerate(self.procs):
                rc = p.wait(timeout=max(deadline - time.monotonic(), 1))
                assert rc == 0, f"process {i} of {self.workdir} exited with {rc}:\n{self.output(i)[-3000:]}"
        finally:
            self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in self.logs:
            log.close()

    def losses(self) -> dict[int, float]:
        with open(os.path.join(self.workdir, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def _resume_from(source: Run, workdir) -> str:
    """A fresh workdir holding only `source`'s checkpoint of step CKPT_STEP."""
    shutil.copytree(os.path.join(source.workdir, "checkpoints", str(CKPT_STEP)),
                    os.path.join(workdir, "checkpoints", str(CKPT_STEP)))
    return workdir


def _assert_losses(got: dict, want: dict, steps) -> None:
    assert sorted(got) == list(steps), got
    np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=2e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (1 process x 8 devices) and 2 processes x 4 devices, each STEPS steps from scratch."""
    tmp = tmp_path_factory.mktemp("distributed")
    one, two = Run(tmp / "one", 1, 8), Run(tmp / "two", 2, 4)
    try:
        two.wait()
        one.wait()
    finally:
        one.kill()
        two.kill()
    return {"one": one, "two": two, "tmp": tmp}


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    assert "topology: 2 process(es), 8 cpu devices (4 local" in runs["two"].output(0)
    _assert_losses(runs["two"].losses(), runs["one"].losses(), range(1, STEPS + 1))
    # energy: each line's window is gathered from both processes (the host counted once, by process 0)
    with open(os.path.join(runs["two"].workdir, "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert sum(r["energy_kwh"] for r in rows) == pytest.approx(rows[-1]["energy_kwh_total"])
    assert rows[-1]["energy_cpu_kwh_total"] > 0 and rows[-1]["energy_gpu_kwh_total"] == 0


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(runs):
    """2-process checkpoint -> 1-process resume, and 1-process checkpoint -> 2-process resume, both continue
    exactly like the uninterrupted run."""
    tmp, reference = runs["tmp"], runs["one"].losses()
    to_one = Run(_resume_from(runs["two"], tmp / "two_to_one"), 1, 8)
    to_one.wait()  # one after the other: fewer processes competing for the CI machine's 2 cores
    to_two = Run(_resume_from(runs["one"], tmp / "one_to_two"), 2, 4)
    to_two.wait()
    for run in (to_one, to_two):
        assert f"resumed from {run.workdir}/checkpoints at step {CKPT_STEP}" in run.output(0)
        _assert_losses(run.losses(), reference, range(CKPT_STEP + 1, STEPS + 1))


@pytest.mark.slow
def test_dead_process_stops_the_other(tmp_path):
    """kill -9 of process 1 mid-training: process 0 exits with an error naming the cause, well before any
    default timeout (heartbeat 10 s here), instead of waiting in a collective forever. The two processes are
    started the way scripts/slurm/train.sbatch starts them: no flags, SLURM's environment only."""
    run = Run(tmp_path / "killed", 2, 4, steps=10_000, checkpoint_every=10_000, slurm=True, heartbeat_timeout=10)
    try:
        metrics = os.path.join(run.workdir, "metrics.jsonl")
        deadline = time.monotonic() + RUN_TIMEOUT
        while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
            assert time.monotonic() < deadline, f"no training steps logged:\n{run.output(0)[-3000:]}"
            assert run.procs[0].poll() is None, f"process 0 exited early:\n{run.output(0)[-3000:]}"
            time.sleep(0.5)
        run.procs[1].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            rc = run.procs[0].wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("process 0 still running 90 s after its peer died:\n" + run.output(0)[-3000:])
        took = time.monotonic() - killed_at
    finally:
        run.kill()
    out = run.output(0)
    assert "topology: 2 process(es), 8 cpu devices (4 local" in out
    assert rc != 0
    assert "another task died" in out or "lost contact with another process" in out, out[-3000:]
    print(f"process 0 stopped {took:.1f} s after its peer was killed")


@pytest.mark.slow
def test_a_workdir_in_use_stops_every_process_at_once(tmp_path):
    """A 2-process run on a workdir another run holds: process 0's lock is taken, process 1's is free; the verdicts
    are gathered, so both stop at start with the same one line (not process 1 waiting for the heartbeat)."""
    from neox_jax.workdir import hold_workdir

    workdir = tmp_path / "busy"
    with hold_workdir(str(workdir)):  # this process holds .lock.0, as process 0 of a running job would
        run = Run(workdir, 2, 4)
        try:
            codes = [p.wait(timeout=RUN_TIMEOUT) for p in run.procs]
        finally:
            run.kill()
    outputs = [run.output(i) for i in range(2)]
    assert codes == [1, 1], outputs
    fatal = [[line for line in out.splitlines() if line.startswith("FATAL: ")] for out in outputs]
    assert [len(f) for f in fatal] == [1, 1], outputs
    busy = f"FATAL: workdir {workdir} is in use by another training run ("
    assert fatal[0][0].startswith(f"{busy}pid {os.getpid()} on {socket.gethostname()}, started ")  # the holder
    assert fatal[1][0].startswith(busy)  # process 1's own lock was free: it stops on process 0's verdict
    assert not os.path.exists(workdir / "metrics.jsonl")


@pytest.mark.slow
def test_missing_peer_at_start_is_a_clear_error(tmp_path):
    """Process 0 of 2 started alone gives up after the initialization timeout with a message naming the flags."""
    env = _env(4)
    env["NEOX_JAX_INIT_TIMEOUT"] = "3"
    proc = subprocess.run([sys.executable, TRAIN, *TINY, f"--workdir={tmp_path / 'w'}",
                           f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "FATAL: could not join the 2-process run through coordinator 127.0.0.1:" in proc.stderr
    assert "within 3s" in proc.stderr


def test_incomplete_flags_name_what_is_missing(tmp_path, capsys):
    """Refused before the runtime is joined, so the script's main runs in this process."""
    with pytest.raises(SystemExit) as e:
        script("train").main([*TINY, f"--workdir={tmp_path / 'w'}", "--num_processes=2"])
    assert e.value.code == 2
    assert "FATAL: --coordinator_address, --process_id not given" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (("127.0.0.1:1234", 2, None), "--process_id not given"),
    (("localhost", 2, 0), "expected HOST:PORT"),
    (("10.0.0.1:99999", 2, 0), "expected HOST:PORT"),
    (("10.0.0.1:1234", 0, 0), "--num_processes=0"),
    (("10.0.0.1:1234", 2, 2), "--process_id=2: must be in [0, 2)"),
])
def test_check_flags(flags, message):
    with pytest.raises(distributed.DistributedError, match=re.escape(message)):
        distributed.check_flags(*flags)
    distributed.check_flags("10.0.0.1:1234", 2, 1)
    distributed.check_flags(None, None, None)


@pytest.mark.parametrize("env, multi", [
    ({}, False), ({"SLURM_NTASKS": "1"}, False), ({"SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True), ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),
    ({"NEOX_JAX_DISTRIBUTED": "1"}, True), ({"NEOX_JAX_DISTRIBUTED": "0"}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_launch_detection(env, multi):
    assert distributed.launched_multi_process(env) is multi
