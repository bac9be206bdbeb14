"""Sweeps: sweep files -> one train command per override set, run locally or as a SLURM array, summarized."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import runpy
import subprocess
import sys

import pytest
import yaml

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
    script, runs = tmp_path / "array.sbatch", tmp_path / "runs"
    proc = _sweep_cli("--sweep", _write(tmp_path, GRID_2X2), "--emit", "slurm", "--slurm_script", str(script),
                      "--runs_dir", str(runs), "--nodes", "1", "--gpus_per_node", "8")
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    assert "#SBATCH --array=0-3%4" in text and "#SBATCH --nodes=1" in text and "--ntasks-per-node=8" in text
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text  # train.sbatch's own directives
    assert "#SBATCH --exclusive" in text and f"#SBATCH --output={runs}/grid/slurm/%A_%a.out" in text
    assert (runs / "grid" / "slurm").is_dir()  # SLURM opens the tasks' logs there before the script runs
    assert text.count("#SBATCH --nodes=") == 1 and text.count("#SBATCH --ntasks-per-node=") == 1
    assert text.count("'--config configs/tiny.py --config.") == 4 and "exec bash scripts/slurm/train.sbatch" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    # run array task 2 with a stand-in srun: train.sbatch starts it with the interpreter that ran sweep.py and the
    # timeouts; the task's output also lands in its workdir's sweep_run.log
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\necho "srun $* heartbeat=$NEOX_JAX_HEARTBEAT_TIMEOUT '
                               'init=$NEOX_JAX_INIT_TIMEOUT"\n')
    (fake / "srun").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", VENV=str(tmp_path / "no_venv"), SLURM_ARRAY_TASK_ID="2",
               SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_JOB_NODELIST="n1", SLURM_NTASKS="8")
    env.pop("PYTHON", None)
    (tmp_path / "scripts").symlink_to(ROOT / "scripts")  # a repository root for the array's relative paths
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    srun = [line for line in done.stdout.splitlines() if line.startswith("srun ")]
    workdir = runs / "grid" / "lr=0.003,batch_size=8"
    assert srun == [f"srun {S.python()} scripts/train.py --config configs/tiny.py --config.train.steps=5 "
                    f"--config.optimizer.lr=0.003 --config.train.batch_size=8 --workdir {workdir} heartbeat=100 "
                    "init=600"]
    assert srun[0] in (workdir / "sweep_run.log").read_text()


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
        assert 0 < float(r["goodput"]) < 1
        assert r["run"] == f"lr={float(r['optimizer.lr']):g},seed={r['train.seed']}"
    assert os.path.getsize(tmp_path / "tiny" / "summary.png") > 0


# ---- TPU pod and SkyPilot launch specs (emitted and parsed, or run with stand-ins for gcloud / sky / python) ----

GRID_RUNS = [(lr, batch) for lr in ("0.001", "0.003") for batch in (8, 16)]  # GRID_2X2 in its order
FAKE_PYTHON = f'''#!{sys.executable}
import json, os, sys
with open(os.environ["TRAIN_LOG"], "a") as f:
    env = {{k: os.environ.get(k) for k in ("NEOX_JAX_DISTRIBUTED", "JAX_LOCAL_DEVICE_IDS")}}
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:], "env": env}}) + "\\n")
sys.exit(int(os.environ.get("TRAIN_EXIT", "0")))
'''
# gcloud as the TPU script calls it: logs its arguments; `scp` copies into $HOME (one worker stands for all);
# `ssh --command CMD` runs CMD with bash in $HOME, as a worker's login would
FAKE_GCLOUD = f'''#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[3] == "scp":
    shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
if args[3] == "ssh":
    sys.exit(subprocess.call(["bash", "-c", args[args.index("--command") + 1]], cwd=os.environ["HOME"]))
'''


@pytest.fixture(scope="module")
def sweep_main():
    """scripts/sweep.py's main in this process (no interpreter start-up per call)."""
    return runpy.run_path(SCRIPT, run_name="sweep")["main"]


def _emit(main, capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of sweep.py's main."""
    try:
        status = main(list(args))
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err


def _tool(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_emit_tpu_script_starts_each_run_on_every_worker(tmp_path, sweep_main, capsys):
    script = tmp_path / "sweep_tpu.sh"
    status, err = _emit(sweep_main, capsys, "--sweep", _write(tmp_path, GRID_2X2), "--emit", "tpu", "--tpu_name",
                        "my-tpu", "--zone", "us-central2-b", "--project", "proj", "--workdir_root", "gs://bkt/runs",
                        "--tpu_script", str(script))
    assert status == 0, err
    header = re.sub(r"\n#\s*", " ", script.read_text())  # its comment lines as one text
    assert "run the same command again: each run resumes from the last checkpoint" in header
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    bin_, home = tmp_path / "bin", tmp_path / "home"
    _tool(bin_, "gcloud", FAKE_GCLOUD)
    _tool(home / "neox_jax" / ".venv" / "bin", "python", FAKE_PYTHON)
    _tool(bin_, "mountpoint", "#!/bin/bash\nexit 1\n")  # not mounted yet
    for tool in ("sudo", "gcsfuse"):
        _tool(bin_, tool, f'#!/bin/bash\necho "{tool} $*" >> "$MOUNT_LOG"\n')
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", HOME=str(home), GCLOUD_LOG=str(tmp_path / "gcloud"),
               TRAIN_LOG=str(tmp_path / "train"), MOUNT_LOG=str(tmp_path / "mount"))
    done = subprocess.run(["bash", str(script), "2"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = _jsonl(tmp_path / "gcloud")
    assert [c[:5] for c in calls] == [["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]] * 2  # runs 2 and 3 (0-based)
    assert all(c[-5:] == ["--zone", "us-central2-b", "--project", "proj", "--worker=all"] for c in calls)
    trains = _jsonl(tmp_path / "train")
    for (lr, batch), train in zip(GRID_RUNS[2:], trains, strict=True):
        workdir = f"/mnt/gcs/bkt/runs/grid/lr={lr},batch_size={batch}"
        assert train["argv"][:3] == ["scripts/train.py", "--config", "configs/tiny.py"]
        assert {"--config.train.steps=5", f"--config.optimizer.lr={lr}", f"--config.train.batch_size={batch}"} \
            <= set(train["argv"]) and train["argv"][-2:] == ["--workdir", workdir]
        assert train["cwd"] == str(home / "neox_jax") and train["env"]["NEOX_JAX_DISTRIBUTED"] == "1"
    mounts = (tmp_path / "mount").read_text().splitlines()
    assert "gcsfuse --implicit-dirs --rename-dir-limit 10000 bkt /mnt/gcs/bkt" in mounts and len(mounts) == 2 * 3

    # a run that stops (preempted, exit 75) stops the script there: the next run is not started
    (tmp_path / "train").unlink()
    stopped = subprocess.run(["bash", str(script)], env=dict(env, TRAIN_EXIT="75"), cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert stopped.returncode == 75 and len(_jsonl(tmp_path / "train")) == 1
    bad = subprocess.run(["bash", str(script), "x"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


# make as setup_host.sh calls it: logs its arguments and whether the PY= it was given is a Python >= 3.11
MAKE_WITH_PY = """#!/bin/bash
py=python3
for a in "$@"; do case $a in PY=*) py=${a#PY=};; esac; done
echo "make $* $("$py" -c 'import sys; print(sys.version_info >= (3, 11))')" >> "$MAKE_LOG"
"""


@pytest.mark.slow
def test_emit_tpu_setup_copies_the_checkout_and_sets_up_each_worker(tmp_path, sweep_main, capsys):
    """`bash SCRIPT setup`: the checkout's files reach the worker, and scripts/setup_host.sh there runs
    `make setup JAX=tpu` with a Python >= 3.11 (make and gcsfuse are stand-ins; nothing is installed)."""
    script = tmp_path / "one.sh"
    status, err = _emit(sweep_main, capsys, "--config", "configs/tiny.py", "--emit", "tpu", "--tpu_name", "t",
                        "--zone", "z", "--workdir_root", "gs://bkt", "--tpu_script", str(script), "--repo_dir", "code")
    assert status == 0, err
    bin_, home = tmp_path / "bin", tmp_path / "home"
    home.mkdir()
    _tool(bin_, "gcloud", FAKE_GCLOUD)
    _tool(bin_, "gcsfuse", "#!/bin/bash\n")
    _tool(bin_, "make", MAKE_WITH_PY)
    _tool(bin_, "sudo", '#!/bin/bash\necho "sudo $*" >> "$MAKE_LOG"\nexit 1\n')  # nothing here needs installing
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", HOME=str(home), GCLOUD_LOG=str(tmp_path / "gcloud"),
               MAKE_LOG=str(tmp_path / "make"))
    done = subprocess.run(["bash", str(script), "setup"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [c[3] for c in _jsonl(tmp_path / "gcloud")] == ["scp", "ssh"]
    assert (home / "code" / "scripts" / "train.py").read_bytes() == (ROOT / "scripts" / "train.py").read_bytes()
    assert not (home / "code" / ".venv").exists()  # ignored files stay behind
    make = (tmp_path / "make").read_text().split()
    assert make[:3] == ["make", "setup", "JAX=tpu"] and make[-1] == "True", make


def test_emit_skypilot_tasks_start_one_process_per_node(tmp_path, sweep_main, capsys):
    folder = tmp_path / "sky"
    status, err = _emit(sweep_main, capsys, "--sweep", _write(tmp_path, GRID_2X2), "--emit", "skypilot",
                        "--accelerators", "H100:8", "--nodes", "2", "--spot", "--workdir_root", "gs://bkt/runs/",
                        "--skypilot_dir", str(folder))
    assert status == 0, err
    tasks = sorted(folder.glob("*.yaml"))
    assert len(tasks) == 4
    skypilot_name = re.compile(r"[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*")  # SkyPilot's rule for task names
    runs = {}
    for path in tasks:
        task = yaml.safe_load(path.read_text())
        assert skypilot_name.fullmatch(task["name"]) and path.stem == task["name"]
        assert task["num_nodes"] == 2 and task["resources"]["accelerators"] == "H100:8"
        assert task["resources"]["use_spot"] is True
        assert task["resources"]["job_recovery"]["recover_on_exit_codes"] == [75]  # a signal's stop is resumed
        assert task["file_mounts"] == {"/neox_runs": {"source": "gs://bkt/runs", "mode": "MOUNT"}}
        assert task["workdir"] == str(ROOT) and "setup_host.sh cuda13" in task["setup"]
        runs[task["name"]] = task["run"]

    # the run script on node 1 of 2: process 1, the coordinator on the first node's address
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    _tool(tmp_path / ".venv" / "bin", "python", FAKE_PYTHON)
    env = dict(os.environ, SKYPILOT_NODE_IPS="10.0.0.7\n10.0.0.8\n", SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1",
               SKYPILOT_NUM_GPUS_PER_NODE="8", TRAIN_LOG=str(tmp_path / "train"), TRAIN_EXIT="75")
    for name, run in sorted(runs.items()):
        assert subprocess.run(["bash", "-c", run], env=env, cwd=tmp_path).returncode == 75  # its status, as it is
    trains = _jsonl(tmp_path / "train")
    assert sorted(t["argv"][-7] for t in trains) == sorted(f"/neox_runs/grid/lr={lr},batch_size={b}"
                                                            for lr, b in GRID_RUNS)
    for t in trains:
        assert t["argv"][-6:] == ["--coordinator_address", "10.0.0.7:12345", "--num_processes", "2",
                                  "--process_id", "1"]
        assert t["env"]["JAX_LOCAL_DEVICE_IDS"] == ",".join(map(str, range(8)))  # one process drives all 8

    status, err = _emit(sweep_main, capsys, "--sweep", _write(tmp_path, GRID_2X2), "--emit", "skypilot",
                        "--accelerators", "H100:8", "--workdir_root", "gs://b", "--skypilot_dir", str(folder))
    assert status == 2 and f"--skypilot_dir {folder}/launch.sh: the file exists" in err  # nothing replaced
    assert yaml.safe_load(tasks[0].read_text())["num_nodes"] == 2

    _tool(tmp_path / "bin", "sky", '#!/bin/bash\necho "sky $*" >> "$SKY_LOG"\n')
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SKY_LOG=str(tmp_path / "sky.log"))
    assert subprocess.run(["bash", str(folder / "launch.sh")], env=env, cwd=tmp_path).returncode == 0
    assert (tmp_path / "sky.log").read_text().splitlines() == [  # every run, in the sweep's order
        f"sky jobs launch -y -d grid-lr-{lr}-batch_size-{b}.yaml" for lr, b in GRID_RUNS]


def test_skypilot_task_loads_in_skypilot(tmp_path, sweep_main, capsys):
    sky = pytest.importorskip("sky", reason="SkyPilot is not installed (optional: pip install skypilot)")
    for accelerators, nodes in (("A100-80GB:8", "4"), ("tpu-v5p-16", "1")):
        folder = tmp_path / accelerators
        status, err = _emit(sweep_main, capsys, "--config", "configs/tiny.py", "--emit", "skypilot", "--accelerators",
                            accelerators, "--nodes", nodes, "--workdir_root", "gs://bkt", "--skypilot_dir", str(folder))
        assert status == 0, err
        task = sky.Task.from_yaml(str(folder / "tiny.yaml"))
        resources = next(iter(task.resources))
        name, _, count = accelerators.partition(":")
        assert task.name == "tiny" and task.num_nodes == int(nodes)
        assert resources.accelerators == {name: int(count or 1)}
        assert {k: (v.source, v.mode.value) for k, v in task.storage_mounts.items()} == {"/neox_runs": ("gs://bkt",
                                                                                                       "MOUNT")}


@pytest.mark.parametrize("args, message", [
    (["--emit", "skypilot", "--accelerators", "H100:8", "--workdir_root", "/mnt/shared/runs"],
     "--workdir_root /mnt/shared/runs: SkyPilot needs a bucket"),
    (["--emit", "skypilot", "--accelerators", "H100:8", "--nodes", "2", "--workdir_root", "runs/x"],
     "--workdir_root runs/x: SkyPilot needs a bucket"),
    (["--emit", "skypilot", "--accelerators", "H100:8"], "--emit skypilot needs --workdir_root"),
    (["--emit", "skypilot", "--workdir_root", "gs://b"], "--emit skypilot needs --accelerators"),
    (["--emit", "skypilot", "--accelerators", "H100:x", "--workdir_root", "gs://b"], "--accelerators 'H100:x'"),
    (["--emit", "skypilot", "--accelerators", "tpu-v5p-16", "--nodes", "2", "--workdir_root", "gs://b"],
     "a TPU slice is one SkyPilot node"),
    (["--emit", "tpu", "--zone", "z", "--workdir_root", "gs://b"], "--emit tpu needs --tpu_name and --zone"),
    (["--emit", "tpu", "--tpu_name", "t", "--workdir_root", "gs://b"], "--emit tpu needs --tpu_name and --zone"),
    (["--emit", "tpu", "--tpu_name", "t", "--zone", "z", "--nodes", "2", "--workdir_root", "runs/x"],
     "--workdir_root runs/x: a relative path is a different folder on each worker"),
    (["--emit", "tpu", "--tpu_name", "t", "--zone", "z", "--workdir_root", "runs/x"],  # slice size not given
     "--workdir_root runs/x: a relative path is a different folder on each worker"),
    (["--emit", "tpu", "--tpu_name", "t", "--zone", "z", "--workdir_root", "s3://b"], "buckets are gs://BUCKET"),
    (["--emit", "skypilot", "--accelerators", "H100:8", "--workdir_root", "s3://b/runs"],
     "--workdir_root s3://b/runs: buckets are gs://BUCKET[/PATH], mounted with gcsfuse"),
    (["--emit", "skypilot", "--accelerators", "H100:8", "--workdir_root", "gs://"], "buckets are gs://BUCKET"),
    (["--emit", "skypilot", "--tpu_name", "t"], "--tpu_name is for --emit tpu, not --emit skypilot"),
    (["--emit", "list", "--workdir_root", "gs://b"], "--workdir_root is for --emit tpu / skypilot, not --emit list"),
    (["--emit", "slurm", "--gpus_per_node", "3"],  # more tasks than the batch can use
     "run lr=0.001,batch_size=8 on 3 devices (--nodes x --gpus_per_node, one process per GPU): config field "
     "train.batch_size: 8 sequences in 1 micro-batches give 8 per micro-batch, not divisible by mesh.data x "
     "mesh.fsdp = 3"),
    (["--emit", "slurm", "--nodes", "2", "--gpus_per_node", "4"],  # the tests' tmp is a local disk
     "is on a local filesystem"),
])
def test_bad_launch_flags_are_one_line(tmp_path, sweep_main, capsys, args, message):
    status, err = _emit(sweep_main, capsys, "--sweep", _write(tmp_path, GRID_2X2), "--runs_dir", str(tmp_path / "o"),
                        *args)
    assert status == 2 and err.startswith("FATAL: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()  # nothing written


def test_launch_specs_need_the_config_inside_the_repository(tmp_path, sweep_main, capsys):
    config = tmp_path / "mine.py"
    config.write_text((ROOT / "configs" / "tiny.py").read_text())
    status, err = _emit(sweep_main, capsys, "--config", str(config), "--emit", "skypilot", "--accelerators", "H100:8",
                        "--workdir_root", "gs://b", "--runs_dir", str(tmp_path / "o"))
    assert status == 2 and "is outside the repository" in err, err
    # a single-host slice may keep its workdirs on the VM's disk, relative to the repository there
    status, err = _emit(sweep_main, capsys, "--config", "configs/tiny.py", "--config.train.steps=7", "--emit", "tpu",
                        "--tpu_name", "t", "--zone", "z", "--nodes", "1", "--workdir_root", "runs",
                        "--runs_dir", str(tmp_path / "o"))
    assert status == 0, err
    script = tmp_path / "o" / "tiny" / "sweep_tpu.sh"
    assert "--config.train.steps=7 --workdir runs/tiny'" in script.read_text()
    again = ["--config", "configs/tiny.py", "--emit", "tpu", "--tpu_name", "u", "--zone", "z", "--nodes", "1",
             "--workdir_root", "runs", "--runs_dir", str(tmp_path / "o")]
    status, err = _emit(sweep_main, capsys, *again)  # an emitted script is not replaced without --overwrite
    assert status == 2 and f"--tpu_script {script}: the file exists" in err and " t --command" in script.read_text()
    assert _emit(sweep_main, capsys, *again, "--overwrite")[0] == 0 and " u --command" in script.read_text()


def test_config_overrides_reach_every_run_and_one_config_is_a_sweep_of_one(tmp_path, sweep_main, capsys):
    sweep = _write(tmp_path, GRID_2X2)
    out = sweep_main(["--sweep", sweep, "--config.train.seq_len=32", "--runs_dir", "out"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert out == 0 and len(lines) == 4 and all("--config.train.seq_len=32 " in line for line in lines)
    assert {line.split("--workdir ")[1] for line in lines} == {f"out/grid/lr={lr},batch_size={b}"
                                                                for lr, b in GRID_RUNS}
    assert sweep_main(["--config", "configs/tiny.py", "--config.train.steps=3", "--runs_dir", "out"]) == 0
    assert capsys.readouterr().out.strip().endswith(
        "scripts/train.py --config configs/tiny.py --config.train.steps=3 --workdir out/tiny")
    for args, message in ((["--config.train.nope=1"], "unknown config field 'train.nope'"),
                          (["--config", "configs/tiny.py"], "give one of --sweep FILE, --config SPEC")):
        status, err = _emit(sweep_main, capsys, "--sweep", sweep, *args)
        assert status == 2 and message in err, err
