"""Sweeps: sweep files -> one train command per override set, run locally or as a SLURM array, summarized."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, script_env
from neox_jax import sweep as S

SCRIPT = str(ROOT / "scripts" / "sweep.py")

GRID_2X2 = '''
from neox_jax.sweep import Sweep, grid

def get_sweep():
    return Sweep(config="configs/tiny.py", runs=grid({"optimizer.lr": [1e-3, 3e-3], "train.batch_size": [8, 16]}),
                 fixed={"train.steps": 5})
'''


def _sweep_cli(*args, cwd=ROOT, compile_cache=None):
    env = script_env()  # the runs train on one CPU device: cheaper than the tests' 8 simulated ones
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    if compile_cache:  # one device, no collectives: safe to share compiled steps between the runs (conftest)
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=240, cwd=cwd,
                          env=env)


def _write(tmp_path, text, name="grid.py"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_grid_is_the_cross_product():
    runs = S.grid({"a.x": [1, 2], "b.y": ["p", "q", "r"]})
    assert len(runs) == 6 and len({tuple(r.items()) for r in runs}) == 6
    assert runs[0] == {"a.x": 1, "b.y": "p"} and runs[-1] == {"a.x": 2, "b.y": "r"}
    with pytest.raises(S.SweepError, match="grid field 'a.x'"):
        S.grid({"a.x": []})


def test_emit_list_prints_one_command_per_run(tmp_path):
    proc = _sweep_cli("--sweep", _write(tmp_path, GRID_2X2), "--emit", "list", "--runs_dir", "out")
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.strip().splitlines()
    assert len(commands) == 4 and len(set(commands)) == 4
    workdirs = {c.split("--workdir ")[1] for c in commands}
    assert workdirs == {f"out/grid/lr={lr},batch_size={b}" for lr in ("0.001", "0.003") for b in (8, 16)}
    for c in commands:
        # the interpreter that ran sweep.py, so the command works without an activated environment
        assert c.startswith(f"{S.python()} scripts/train.py --config configs/tiny.py --config.train.steps=5 ")
    assert sum("--config.optimizer.lr=0.003" in c for c in commands) == 2
    assert sum("--config.train.batch_size=16" in c for c in commands) == 2


def test_emit_slurm_writes_a_job_array(tmp_path):
    script = tmp_path / "array.sbatch"
    proc = _sweep_cli("--sweep", _write(tmp_path, GRID_2X2), "--emit", "slurm", "--slurm_script", str(script),
                      "--nodes", "2", "--gpus_per_node", "4")
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "#SBATCH --array=0-3%4" in text and "#SBATCH --nodes=2" in text and "--ntasks-per-node=4" in text
    assert "#SBATCH --signal=TERM@300" in text and "#SBATCH --exclusive" in text  # train.sbatch's own directives
    assert text.count("#SBATCH --nodes=") == 1 and text.count("#SBATCH --ntasks-per-node=") == 1
    assert text.count("'--config configs/tiny.py --config.") == 4 and "exec bash scripts/slurm/train.sbatch" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # run array task 2 with a stand-in srun: train.sbatch starts it with the interpreter that ran sweep.py,
    # --kill-on-bad-exit and the timeouts
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $* heartbeat=$NEOX_JAX_HEARTBEAT_TIMEOUT '
                               'init=$NEOX_JAX_INIT_TIMEOUT"\n')
    (fake / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", VENV=str(tmp_path / "no_venv"), SLURM_ARRAY_TASK_ID="2",
               SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]", SLURM_NTASKS="8")
    env.pop("PYTHON", None)
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")  # a repository root whose runs/ is the test's
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    srun = [line for line in done.stdout.splitlines() if line.startswith("srun ")]
    assert srun == [f"srun --kill-on-bad-exit=1 {S.python()} scripts/train.py --config configs/tiny.py "
                    "--config.train.steps=5 --config.optimizer.lr=0.003 --config.train.batch_size=8 "
                    "--workdir runs/sweeps/grid/lr=0.003,batch_size=8 heartbeat=100 init=600"]


@pytest.mark.parametrize("body, message", [
    ('from neox_jax.sweep import Sweep\ndef get_sweep():\n    return Sweep("configs/tiny.py", [{"optimizer.lrr": 1}])',
     "run 0 {'optimizer.lrr': 1}: unknown config field 'optimizer.lrr'"),
    ('from neox_jax.sweep import Sweep\ndef get_sweep():\n    return Sweep("configs/nope.py", [{"train.seed": 1}])',
     "config 'configs/nope.py' not found"),
    ('def get_sweep():\n    return [{"train.seed": 1}]', "get_sweep() returned list, expected a Sweep"),
    ('from neox_jax.sweep import Sweep\ndef get_sweep():\n    return Sweep("configs/tiny.py", [{"train.seed": 1}] * 2)',
     "runs 0 and 1 have the same overrides (seed=1)"),
])
def test_bad_sweep_files_name_the_problem(tmp_path, body, message):
    proc = _sweep_cli("--sweep", _write(tmp_path, body), "--emit", "list")
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr


def test_summarize_without_runs_is_an_error(tmp_path):
    proc = _sweep_cli("--summarize", str(tmp_path))
    assert proc.returncode == 2 and "no run folders with a metrics.jsonl" in proc.stderr


@pytest.mark.slow
def test_local_sweep_then_summary(tmp_path):
    """configs/sweeps/tiny.py (2 x 2, 3 steps of a very small model) runs to the end; the summary has all 4."""
    proc = _sweep_cli("--sweep", str(ROOT / "configs" / "sweeps" / "tiny.py"), "--emit", "local",
                      "--runs_dir", str(tmp_path), cwd=tmp_path, compile_cache=tmp_path / "xla_cache")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4/4 runs finished" in proc.stdout
    proc = _sweep_cli("--summarize", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr
    assert "4 runs" in proc.stdout
    with open(tmp_path / "tiny" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["run"] for r in rows) == sorted(f"lr={lr},seed={s}" for lr in ("0.001", "0.003") for s in (0, 1))
    for r in rows:
        assert r["step"] == "3" and math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"]))
        assert r["run"] == f"lr={float(r['optimizer.lr']):g},seed={r['train.seed']}"
    assert os.path.getsize(tmp_path / "tiny" / "summary.png") > 0
