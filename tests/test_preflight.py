"""`scripts/train.py --preflight`: every check of a launch, nothing trained. One process runs in this process (its
checks need no compile); the launches that need their own processes (two processes joined over loopback, a small
tmpfs, a coordinator nobody answers) run as subprocesses, each bounded by a timeout."""

import itertools
import os
import re
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from conftest import ROOT
from neox_jax import checkpoint as ckpt_lib
from neox_jax import config as cfg
from neox_jax import preflight, setup, sharding
from neox_jax.data import indexed
from test_distributed import _env, _free_port
from test_faults import _unshare_available
from tiny_configs import TINY_PY, script, tiny_config

TRAIN = str(ROOT / "scripts" / "train.py")
TOKENS = 999  # in the test dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A good .bin/.idx pair and one whose .idx is cut short."""
    tmp = tmp_path_factory.mktemp("preflight_data")
    with indexed.IndexedWriter(str(tmp / "good"), np.uint16) as w:
        w.add(np.arange(1, 500))
        w.add(np.arange(500, 1000))
    for ext in (".bin", ".idx"):
        (tmp / f"bad{ext}").write_bytes((tmp / f"good{ext}").read_bytes())
    os.truncate(tmp / "bad.idx", 40)
    return {"good": str(tmp / "good"), "bad": str(tmp / "bad")}


def _flags(workdir, train_paths, *more):
    return ["--preflight", "--config", TINY_PY, f"--workdir={workdir}", f"--config.data.train_paths={train_paths}",
            "--config.train.eval_every=0", *map(str, more)]


def _preflight(argv, capsys) -> tuple[int, str, list[str]]:
    """scripts/train.py --preflight in this process: (exit status, stdout, the FATAL lines of stderr)."""
    try:
        status = script("train").main(argv)  # returns the preflight's status; bad flags exit (errors.fatal)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def _fatal(lines: list[str]) -> list[str]:
    assert all(line.startswith("FATAL: ") for line in lines), lines
    return lines


# ---- the arithmetic --------------------------------------------------------------------------------------------

def _rotation_peak(t, saved: list[int]) -> int:
    """The reference: the run's saves played through the trainer's own rotation policy, counting folders."""
    schedule = cfg.checkpoint_schedule(getattr(t, "checkpoint_steps", ""), t.steps)
    policy = ckpt_lib._Rotation("/nonexistent", t.keep_checkpoints, t.keep_every, frozenset(schedule))
    held, peak = list(saved), len(saved)
    first = max(saved, default=0) + 1
    if not saved and 0 in schedule:  # the initial weights
        first, held, peak = 1, [0], 1
    for step in range(first, t.steps + 1):
        if step % t.checkpoint_every == 0 or step in schedule or step == t.steps:
            held.append(step)
            peak = max(peak, len(held))
            keep = policy.should_preserve([types.SimpleNamespace(step=s) for s in held], context=None)
            held = [s for s, k in zip(held, keep) if k]
    return peak - len(saved)


def test_checkpoints_to_come_follows_the_rotation():
    for steps, every, keep, keep_every, schedule in itertools.product(
            range(1, 21), (1, 2, 3, 5), (0, 1, 3), (0, 2, 4, 6), ("", "log2", "0,3,7")):
        if schedule == "0,3,7" and steps < 7:
            continue
        t = types.SimpleNamespace(steps=steps, checkpoint_every=every, keep_checkpoints=keep, keep_every=keep_every,
                                  checkpoint_steps=schedule)
        resumed = [s for s in range(every, steps // 2 + 1, every)][-keep:] if keep else []  # what a resume holds
        for saved in ([], resumed):
            assert preflight.checkpoints_to_come(t, saved) == _rotation_peak(t, saved), (t, saved)


@pytest.mark.parametrize("mode, bytes_per_param", [("fp32_params", 4 + 8), ("master_weights", 2 + 4 + 8)])
def test_checkpoint_bytes_are_the_params_and_adams_moments(mode, bytes_per_param):
    """fp32 params and Adam's two fp32 moments; with master weights the params in bf16 and the fp32 master too; plus
    a few scalars (step counters, the loss scale)."""
    config = tiny_config(model=dict(dtype="bfloat16"), precision=dict(mode=mode))
    run = setup.build(cfg.validate(config), sharding.make_mesh(config, jax.devices()[:1]))
    expected = cfg.param_count(run.model_config) * bytes_per_param
    assert expected <= preflight.checkpoint_bytes(run) <= expected + 1024


def test_a_problem_every_process_found_is_one_line(capsys):
    found = [preflight.Findings(i, f"node{i // 2}", "4 gpu device(s)", problems=["config field mesh: x"])
             for i in range(4)]
    found[3].problems.append("--workdir /w: not shared")
    found[1].problems.append("--workdir /w: not shared")
    preflight.report(found, [], 1.0)
    assert capsys.readouterr().err.splitlines() == [
        "FATAL: all 4 processes: config field mesh: x",
        "FATAL: processes 1, 3 on node0, node1: --workdir /w: not shared"]


# ---- one process, in this one ----------------------------------------------------------------------------------

def test_one_process_passes_and_reports_what_it_checked(tmp_path, data, capsys):
    status, out, err = _preflight(_flags(tmp_path / "w", data["good"]), capsys)
    assert (status, err) == (0, []), out
    assert f"process 0 on {socket.gethostname()}: 8 cpu device(s)" in out
    assert f"workdir {tmp_path / 'w'}: writable, not in use by another run" in out
    assert f"data: 1 training dataset(s), {TOKENS:,} tokens" in out
    assert "the run needs " in out and "for 4 more checkpoint(s)" in out  # tiny.py: keep 3, +1 being written
    assert sorted(os.listdir(tmp_path / "w")) == [".lock.0"]  # the token and the scratch file are gone


def test_damaged_data_and_a_mesh_that_does_not_fit_are_one_line_each(tmp_path, data, capsys):
    status, _, err = _preflight(_flags(tmp_path / "w", data["bad"], "--config.mesh.data=3"), capsys)
    assert status == 2
    host = socket.gethostname()
    assert sorted(_fatal(err)) == [
        f"FATAL: process 0 on {host}: config field mesh: mesh.data=3, mesh.fsdp=1, mesh.tensor=1 uses 3 devices but 8 "
        "are available; set one axis to -1 or make the product equal the device count",
        f"FATAL: process 0 on {host}: data.train_paths: {data['bad']}.idx: truncated (40 bytes, header says 2 "
        f"sequences and 3 doc_idx entries = {34 + 2 * (4 + 8) + 3 * 8} bytes)"]  # header, sizes + pointers, doc_idx


# ---- launches of their own -------------------------------------------------------------------------------------

def _launch(workdirs, data_prefix, *more, ids=(0, 1), init_timeout=120) -> list[subprocess.Popen]:
    """Processes `ids` of a 2-process preflight, one per workdir, 4 simulated CPU devices each, over loopback."""
    port, env = _free_port(), _env(4)
    env[preflight.ENV_TIMEOUT] = str(init_timeout)
    return [subprocess.Popen([sys.executable, TRAIN, *_flags(w, data_prefix, *more),
                              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for i, w in zip(ids, workdirs)]


def _results(procs, timeout=180) -> list[tuple[int, str, str]]:
    try:
        return [(p.wait(timeout=timeout), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_two_processes_pass_on_a_shared_workdir_and_stop_on_two_local_ones(tmp_path, data):
    """Both pairs started at once (their start-up overlaps). The second pair is given two directories and a mesh
    of 4 devices for their 8 (as an sbatch of more tasks than the mesh uses): one line says which process does not
    see process 0's workdir, one line that the mesh does not fit, found by both; both processes exit 2."""
    start = time.monotonic()
    shared = _launch([tmp_path / "shared"] * 2, data["good"])
    split = _launch([tmp_path / "local0", tmp_path / "local1"], data["good"], "--config.mesh.data=4")
    (s0, out, err), (s1, _, _) = _results(shared)
    print(f"two pairs of preflight processes: {time.monotonic() - start:.1f} s")
    assert (s0, s1) == (0, 0), out + err
    assert "preflight: 2 process(es)" in out and "process 1 on " in out
    assert f"workdir {tmp_path / 'shared'}: shared by every process, writable" in out
    (s0, out, err), (s1, _, err1) = _results(split)
    assert (s0, s1) == (2, 2), out + err
    assert _fatal(err.strip().splitlines()) == [
        "FATAL: all 2 processes: config field mesh: mesh.data=4, mesh.fsdp=1, mesh.tensor=1 uses 4 devices but 8 are "
        "available; set one axis to -1 or make the product equal the device count",
        f"FATAL: process 1 on {socket.gethostname()}: --workdir {tmp_path / 'local1'}: not shared with process 0: the "
        f"token file ({preflight.TOKEN}) process 0 just wrote into its --workdir is not there; every process needs "
        "the same --workdir, on storage all hosts mount (a node-local disk is not; checkpoints are written by every "
        "process into one directory)"]
    assert "FATAL" not in err1  # process 0 alone reports


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged user namespaces to mount a small tmpfs")
def test_a_disk_too_small_for_the_checkpoints_is_one_line(tmp_path, data):
    """A 20 MB tmpfs: the token and scratch files fit, tiny.py's 164 MB checkpoints do not."""
    (tmp_path / "disk").mkdir()
    flags = " ".join(_flags(tmp_path / "disk" / "run", data["good"]))
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=20m tmpfs {tmp_path}/disk && {sys.executable} {TRAIN} {flags}"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(1), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = _fatal(proc.stderr.strip().splitlines())
    found = re.fullmatch(rf"FATAL: process 0 on {re.escape(socket.gethostname())}: --workdir {tmp_path}/disk/run: "
                         r"(\S+) MB free on its filesystem, the run needs (\S+) MB for 4 more checkpoint\(s\) .*"
                         r"lower train\.keep_checkpoints", line)
    assert found, line
    params = cfg.param_count(cfg.resolve_model(cfg.from_spec(TINY_PY)))
    assert float(found[1]) == pytest.approx(20 * 2**20 / 1e6, abs=0.1)  # less the lock file's page
    assert float(found[2]) == pytest.approx(4 * params * (4 + 8) / 1e6, rel=1e-4)  # fp32 params, Adam's moments


@pytest.mark.slow
def test_an_unreachable_coordinator_is_one_line_within_the_timeout(tmp_path, data):
    """Process 1 of 2, its coordinator's port closed: one line naming the coordinator and this process, exit 2,
    seconds after the start-up timeout (3 s here) instead of a hang."""
    start = time.monotonic()
    [(status, out, err)] = _results(_launch([tmp_path / "w"], data["good"], ids=(1,), init_timeout=3), timeout=120)
    took = time.monotonic() - start
    assert status == 2, out + err
    [line] = _fatal(err.strip().splitlines())
    assert line.startswith("FATAL: could not join the 2-process run through coordinator 127.0.0.1:"), line
    assert f"within 3s (process 1 on {socket.gethostname()})" in line
    assert took < 60, took  # the imports, then 3 s: not JAX's 5 minutes
    print(f"unreachable coordinator: exit 2 after {took:.1f} s")
