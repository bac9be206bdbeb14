"""Config sweeps: a sweep file names a base config and a list of override sets; each set becomes one
`scripts/train.py` run in its own workdir, named after its overrides.

A sweep file (configs/sweeps/*.py) defines `get_sweep()` returning a `Sweep`; `grid()` builds the cross product
of value lists and plain lists of dicts add hand-picked runs; `single()` makes one config's run a sweep of one.
The runs can be printed, executed one after another, or written out as a SLURM job array (TPU pod scripts and
SkyPilot tasks: neox_jax/launch.py); `summarize()` gathers every run's final metrics into one table.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Sequence

from neox_jax import cli
from neox_jax import config as cfg
from neox_jax import errors
from neox_jax import metrics as metrics_lib
from neox_jax import scaling
from neox_jax import table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = "scripts/train.py"
RUN_LOG = "sweep_run.log"  # a sweep run's output, in its workdir (--emit local and the SLURM array write it)


class SweepError(errors.InputError):
    """A sweep file or its overrides are malformed: the message names the file and the run."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    config: str  # base config as `path[:arg]`, relative to the repository root or absolute
    runs: Sequence[dict]  # one {"dotted.field": value} override set per run
    fixed: dict = dataclasses.field(default_factory=dict)  # overrides shared by every run
    name: str = ""  # default: the sweep file's name

    @property
    def is_single(self) -> bool:
        """One config's run (`single()`): its workdir is `<runs_dir>/<name>` itself."""
        return list(self.runs) == [{}]


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    workdir: str
    overrides: dict  # fixed + this run's overrides, in command-line order

    def args(self, config: str) -> list[str]:
        """scripts/train.py's arguments for this run."""
        return ["--config", config, *(f"--config.{k}={_flag_value(v)}" for k, v in self.overrides.items()),
                "--workdir", self.workdir]

    def argv(self, config: str, python: str = "python", script: str = TRAIN_SCRIPT) -> list[str]:
        return [python, script, *self.args(config)]


def grid(axes: dict[str, Sequence]) -> list[dict]:
    """Every combination of the value lists, the first field varying slowest:
    grid({"optimizer.lr": [1e-4, 3e-4], "train.batch_size": [8, 16]}) -> 4 override sets."""
    for key, values in axes.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__") or not len(values):
            raise SweepError(f"grid field {key!r}: expected a non-empty list of values, got {values!r}")
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def load_sweep(path: str, fixed: dict | None = None) -> Sweep:
    """Import a sweep file and check every run's overrides against its base config (one error naming the run).
    `fixed`: overrides for every run on top of the file's own (sweep.py's --config.FIELD=VALUE)."""
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} not found")
    try:  # a sweep file is the user's code: what it raises is a bad sweep file
        module = cfg.import_file(path, "_neox_sweep_")
        if not hasattr(module, "get_sweep"):
            raise SweepError(f"sweep file {path}: defines no get_sweep() (expected one returning "
                             "neox_jax.sweep.Sweep)")
        sweep = module.get_sweep()
    except SweepError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"sweep file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(sweep, Sweep):
        raise SweepError(f"sweep file {path}: get_sweep() returned {type(sweep).__name__}, expected a Sweep")
    if not sweep.runs:
        raise SweepError(f"sweep file {path}: Sweep.runs is empty")
    sweep = dataclasses.replace(sweep, name=sweep.name or os.path.splitext(os.path.basename(path))[0],
                                fixed={**sweep.fixed, **(fixed or {})})
    config = resolve_config(sweep.config, path)
    for i, overrides in enumerate(sweep.runs):
        if not isinstance(overrides, dict) or not overrides:
            raise SweepError(f"sweep file {path}: run {i} is {overrides!r}, expected a non-empty dict of overrides")
        _check_run(config, {**sweep.fixed, **overrides}, f"sweep file {path}: run {i} {overrides}")
    return sweep


def single(config: str, overrides: dict) -> Sweep:
    """One run of `config` (sweep.py --config SPEC --config.FIELD=VALUE) as a sweep, named as train.py names its
    default workdir (pythia_1b): it trains in `<runs_dir>/<that name>`."""
    _check_run(resolve_config(config, "--config"), overrides, f"--config {config}")
    return Sweep(config, [{}], dict(overrides), os.path.basename(cli.default_workdir(config)))


def isoflop(config: str, budgets: list[float], family: str, per_budget: int, fixed: dict) -> Sweep:
    """An isoflop sweep of `config` (neox_jax/scaling.py): per budget, `per_budget` sizes of `family`, each for the
    steps that spend the budget. Named isoflop: its runs train in <runs_dir>/isoflop/<overrides>."""
    path = resolve_config(config, "--config")
    base = cfg.from_spec(path, fixed)
    plan = scaling.isoflop_plan(base, budgets, scaling.family(family), per_budget)
    runs = [r.overrides() for r in plan]
    for overrides in runs:
        _check_run(path, {**fixed, **overrides}, f"--isoflop run {overrides}")
    return Sweep(config, runs, dict(fixed), "isoflop")


def _check_run(config: str, overrides: dict, where: str) -> None:
    try:
        cfg.validate(cfg.from_spec(config, overrides))
    except (cfg.ConfigError, TypeError, ValueError) as e:
        raise SweepError(f"{where}: {e}") from None


def resolve_config(spec: str, where: str = "") -> str:
    """`path[:arg]` with a relative path taken from the repository root when it does not exist here."""
    path, sep, arg = spec.partition(":")
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(ROOT, path)
    if not os.path.exists(path):
        raise SweepError(f"{where or 'sweep'}: config {spec!r} not found")
    return path + sep + arg


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _name_value(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else _flag_value(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def run_name(overrides: dict, short: dict[str, str]) -> str:
    return ",".join(f"{short[k]}={_name_value(v)}" for k, v in overrides.items())


def plan(sweep: Sweep, runs_dir: str) -> list[Run]:
    """The runs of `sweep`, each in `runs_dir/<sweep name>/<its overrides>` (e.g. lr=0.0003,batch_size=256); a
    `single()` config's run in `runs_dir/<its name>`."""
    if sweep.is_single:
        return [Run(sweep.name, os.path.join(runs_dir, sweep.name), dict(sweep.fixed))]
    keys = list(dict.fromkeys(k for o in sweep.runs for k in o))
    leaf = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (s if leaf.count(s) == 1 else k) for k, s in zip(keys, leaf)}  # full name only when ambiguous
    runs, seen = [], {}
    for i, overrides in enumerate(sweep.runs):
        name = run_name(overrides, short)
        if name in seen:
            raise SweepError(f"sweep {sweep.name}: runs {seen[name]} and {i} have the same overrides ({name})")
        seen[name] = i
        runs.append(Run(name, os.path.join(runs_dir, sweep.name, name), {**sweep.fixed, **overrides}))
    return runs


def python() -> str:
    """The interpreter running this, as the emitted commands' python (relative to the working directory when it
    lies below it, e.g. .venv/bin/python), so that they run without an activated environment."""
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def commands(sweep: Sweep, runs: list[Run]) -> list[str]:
    """Shell commands, run from the repository root."""
    return [shlex.join(r.argv(sweep.config, python())) for r in runs]


def run_local(sweep: Sweep, runs: list[Run], log=print) -> dict[str, int]:
    """Run one after another (this Python, any working directory); returns exit status per run name.
    A failed run does not stop the others; a finished run's workdir resumes (and returns at once)."""
    config = resolve_config(sweep.config)
    status = {}
    for i, r in enumerate(runs):
        log(f"[{i + 1}/{len(runs)}] {r.name}")
        os.makedirs(r.workdir, exist_ok=True)
        with open(os.path.join(r.workdir, RUN_LOG), "w") as out:
            status[r.name] = subprocess.call(r.argv(config, sys.executable, os.path.join(ROOT, TRAIN_SCRIPT)),
                                             stdout=out, stderr=subprocess.STDOUT)
        if status[r.name]:
            log(f"  failed with exit status {status[r.name]}: see {r.workdir}/{RUN_LOG}")
    return status


SBATCH_SCRIPT = "scripts/slurm/train.sbatch"  # from the repository root, where sbatch is run
TRAIN_SBATCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), SBATCH_SCRIPT)
# The directives the array sets per sweep; every other #SBATCH line of train.sbatch (--signal, --exclusive,
# --cpus-per-task) is copied, so the two scripts cannot drift apart.
_ARRAY_DIRECTIVES = ("--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--output", "--array")

SLURM_HEADER = """#!/bin/bash
#SBATCH --job-name={name}
#SBATCH --array=0-{last}%{parallel}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --output={log_dir}/%A_%a.out
{shared}
# One array task per sweep run; each task is a whole (possibly multi-node) training run started by
# scripts/slurm/train.sbatch (the heartbeat and start-up timeouts, a checkpoint and a requeue on the --signal
# before the time limit or on a preemption). Submit from the repository root:  sbatch {path}
set -euo pipefail
"""


def shared_directives(sbatch: str = TRAIN_SBATCH) -> list[str]:
    """train.sbatch's #SBATCH lines that are not the array's own (`_ARRAY_DIRECTIVES`)."""
    with open(sbatch) as f:
        lines = [line.strip() for line in f if line.startswith("#SBATCH ")]
    return [line for line in lines if line.split()[1].split("=")[0] not in _ARRAY_DIRECTIVES]


# filesystems one machine owns: a run's workdir there is invisible to the other nodes (and to a requeued job
# that SLURM starts on another node)
_LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "f2fs", "vfat", "zfs", "ramfs"}


def check_devices(sweep: Sweep, runs: list[Run], devices: int) -> None:
    """Each run's mesh and batch fit `devices` devices (--nodes x --gpus_per_node): one SweepError naming the run,
    at emit time rather than once the job has waited in the queue."""
    config = resolve_config(sweep.config)
    for r in runs:
        c = cfg.from_spec(config, r.overrides)
        try:
            sizes = cfg.mesh_shape({a: c.mesh.get(a, 1) for a in cfg.MESH_AXES}, devices)
            for axis, size in sizes.items():
                c.mesh[axis] = size
            cfg.check_batch(c)
        except cfg.ConfigError as e:
            raise SweepError(f"sweep {sweep.name}: run {r.name} on {devices} devices (--nodes x --gpus_per_node, one "
                             f"process per GPU): {e}") from None


def filesystem_type(path: str) -> tuple[str, str]:
    """(type, mount point) of the filesystem holding `path` (or its nearest existing parent), from /proc/mounts."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    best = ("", "/")
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            mount = mount.replace("\\040", " ")
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (kind, mount)
    return best


def check_shared(runs_dir: str, nodes: int, cluster_nodes: int | None) -> None:
    """A cluster's runs need a workdir every node sees: refuse a local filesystem when a run spans nodes or the
    cluster has several (`cluster_nodes`, from sinfo; None when unknown)."""
    if not os.path.exists("/proc/mounts"):
        return
    kind, mount = filesystem_type(runs_dir)
    if kind not in _LOCAL_FILESYSTEMS or (nodes == 1 and (cluster_nodes or 1) == 1):
        return
    why = (f"each run's {nodes} nodes write their shards of every checkpoint there" if nodes > 1 else
           f"the cluster has {cluster_nodes} nodes: array tasks and requeued jobs land on any of them")
    raise SweepError(f"--runs_dir {runs_dir} is on a local filesystem ({kind} mounted at {mount}) but {why}; "
                     "put it on storage every node shares (NFS, Lustre, GPFS, a bucket mount)")


def slurm_array(sweep: Sweep, runs: list[Run], path: str, *, nodes: int = 1, tasks_per_node: int = 8,
                gpus_per_node: int = 8, parallel: int = 4) -> str:
    """Write a SLURM job-array script running one sweep run per array task through scripts/slurm/train.sbatch
    (with this interpreter as its PYTHON); returns its path."""
    log_dir = os.path.join(os.path.dirname(runs[0].workdir), "slurm")
    header = SLURM_HEADER.format(name=f"sweep-{sweep.name}", last=len(runs) - 1, parallel=parallel, nodes=nodes,
                                 tasks_per_node=tasks_per_node, gpus_per_node=gpus_per_node, log_dir=log_dir,
                                 path=path, shared="\n".join(shared_directives()))
    os.makedirs(log_dir, exist_ok=True)  # SLURM opens each task's --output there before the script runs
    lines = [header, f"export PYTHON=${{PYTHON:-{shlex.quote(python())}}}",
             "RUNS=("]
    lines += [f"  {shlex.quote(shlex.join(r.args(sweep.config)))}" for r in runs]
    lines += [")", "WORKDIRS=(", *(f"  {shlex.quote(r.workdir)}" for r in runs), ")",
              'workdir=${WORKDIRS[$SLURM_ARRAY_TASK_ID]}',
              f'# every attempt of the run is also appended to its workdir\'s {RUN_LOG} (as --emit local writes it),',
              '# where --summarize finds a failed run\'s FATAL line',
              'mkdir -p "$workdir"',
              f'exec > >(tee -a "$workdir/{RUN_LOG}") 2>&1',
              'echo "sweep run $SLURM_ARRAY_TASK_ID: ${RUNS[$SLURM_ARRAY_TASK_ID]}"',
              'eval "set -- ${RUNS[$SLURM_ARRAY_TASK_ID]}"',
              f'exec bash {SBATCH_SCRIPT} "$@"', ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


# ---- summaries --------------------------------------------------------------------------------------------

def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def run_status(workdir: str, step: int | None, steps: int | None) -> str:
    """"done" when the run reached its train.steps; else the last `FATAL:` line of its sweep_run.log as
    "failed: ..."; else "stopped" (preempted, still running, or killed)."""
    if step is not None and steps is not None and step >= steps:
        return "done"
    fatal = None
    if os.path.exists(os.path.join(workdir, RUN_LOG)):
        with open(os.path.join(workdir, RUN_LOG), errors="replace") as f:
            fatal = next((line.strip() for line in reversed(f.readlines()) if line.startswith("FATAL:")), None)
    return f"failed: {fatal}" if fatal else "stopped"


def summarize(runs_dir: str) -> tuple[list[str], list[dict]]:
    """(columns, one row per run) for every workdir under `runs_dir` holding a metrics.jsonl or a sweep_run.log:
    its status (`run_status`), the config fields that differ between the runs, then the final train loss, the last
    validation loss, the step, throughput and goodput (the productive share of the run's wall time over all its
    attempts)."""
    workdirs = sorted(d for d, _, files in os.walk(runs_dir) if "metrics.jsonl" in files or RUN_LOG in files)
    if not workdirs:
        raise SweepError(f"{runs_dir}: no run folders with a metrics.jsonl or {RUN_LOG} below it")
    rows, configs = [], []
    for d in workdirs:
        has_metrics = os.path.exists(os.path.join(d, "metrics.jsonl"))
        metrics = metrics_lib.read_jsonl(os.path.join(d, "metrics.jsonl")) if has_metrics else []
        train = [m for m in metrics if m.get("split") == "train" and m.get("loss") is not None]
        val = [m for m in metrics if m.get("split") == "val" and m.get("loss") is not None]
        config_path = os.path.join(d, "config.json")
        configs.append(_flat(json.load(open(config_path))) if os.path.exists(config_path) else {})
        step = train[-1]["step"] if train else None
        rows.append({"run": os.path.relpath(d, runs_dir),
                     "status": run_status(d, step, configs[-1].get("train.steps")),
                     "step": step,
                     "train_loss": train[-1]["loss"] if train else None,
                     "val_loss": val[-1]["loss"] if val else None,
                     "tokens_per_s": next((m["tokens_per_s"] for m in reversed(train) if m.get("tokens_per_s")),
                                          None),
                     "goodput": next((m.get("goodput") for m in reversed(metrics) if m.get("split") == "goodput"),
                                     None)})
    keys = sorted({k for c in configs for k in c})
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1
               and not k.startswith("data.") and k != "model.name"]
    for row, c in zip(rows, configs):
        row.update({k: c.get(k) for k in varying})
    return ["run", "status", *varying, "step", "train_loss", "val_loss", "tokens_per_s", "goodput"], rows


def format_table(columns: list[str], rows: list[dict]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    percent = lambda v: f"{v:.0%}" if isinstance(v, (int, float)) else str(v)  # noqa: E731 - goodput: a share
    return table.render([table.Column(c, c, percent if c == "goodput" else cell, align="<") for c in columns], rows,
                        gap="  ")


def write_summary(runs_dir: str, columns: list[str], rows: list[dict]) -> tuple[str, str]:
    """summary.csv and summary.png (each run's train-loss curve, validation points) in `runs_dir`."""
    csv_path = os.path.join(runs_dir, "summary.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({c: r.get(c) for c in columns} for r in rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if not os.path.exists(os.path.join(runs_dir, r["run"], "metrics.jsonl")):
            continue
        metrics = metrics_lib.read_jsonl(os.path.join(runs_dir, r["run"], "metrics.jsonl"))
        train = [m for m in metrics if m.get("split") == "train" and m.get("loss") is not None]
        line, = ax.plot([m["step"] for m in train], [m["loss"] for m in train], label=r["run"])
        val = [m for m in metrics if m.get("split") == "val" and m.get("loss") is not None]
        if val:
            ax.plot([m["step"] for m in val], [m["loss"] for m in val], "o", color=line.get_color())
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"sweep {os.path.basename(os.path.abspath(runs_dir))}"
           " (lines: train, dots: validation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = os.path.join(runs_dir, "summary.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return csv_path, png_path
