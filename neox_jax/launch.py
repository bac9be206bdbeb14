"""Launch specs for machines that come and go: a sweep's runs (or one config's run) as a shell script of
`gcloud compute tpus tpu-vm ssh --worker=all` commands for a TPU pod slice, or as SkyPilot task YAMLs for
`sky jobs launch`.

Every run's workdir lives on storage that all hosts share and that outlives them (a bucket, or a filesystem
mounted on every host): all processes write their checkpoint shards there, and a run that was preempted resumes
from its last checkpoint when it is started again, on the same slice or on a new cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

import yaml  # PyYAML: a dependency of ml_collections, flax and orbax

from neox_jax import distributed, errors, files
from neox_jax import sweep as S

# Buckets are Google Cloud Storage ones, mounted with gcsfuse (by SkyPilot too): orbax finishes each checkpoint
# by renaming its temporary folder, which gcsfuse does (up to --rename-dir-limit objects) and goofys, SkyPilot's
# mount for S3-style buckets, does not for a folder that holds files.
BUCKET = "gs://"
GCS_MOUNTS = "/mnt/gcs"  # a TPU worker mounts gs://BUCKET at /mnt/gcs/BUCKET (gcsfuse): train.py needs a filesystem
SKY_MOUNT = "/neox_runs"  # where every SkyPilot node mounts --workdir_root
VENV_PYTHON = ".venv/bin/python"  # `make setup JAX=...` on the machine, relative to the repository
COORDINATOR_PORT = 12345  # process 0's port on a SkyPilot GPU cluster (the cluster is the run's own)
# Like scripts/slurm/train.sbatch: a dead peer stops the others after 100 s; slow storage gets 10 min to start.
TIMEOUTS = {distributed.ENV_HEARTBEAT: "100", distributed.ENV_INIT_TIMEOUT: "600"}
# gcsfuse as SkyPilot mounts GCS: directories listed without marker objects, and checkpoint directories renamed
# (orbax's tmp dir -> step dir) up to this many objects
GCSFUSE = "gcsfuse --implicit-dirs --rename-dir-limit 10000"
SETUP_HOST = "scripts/setup_host.sh"  # a Python >= 3.11 and .venv with the JAX of the machine
ARCHIVE = "neox_jax.tar.gz"  # the checkout `bash SCRIPT setup` copies to each TPU worker's home


class LaunchError(S.SweepError):
    """A launch flag that cannot work on the machines it targets: the message names the flag."""


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    name: str  # the TPU VM (`gcloud compute tpus tpu-vm create NAME`)
    zone: str
    project: str | None = None
    repo_dir: str = "neox_jax"  # on every worker, relative to the ssh user's home
    workers: int | None = None  # hosts of the slice, when the user said; None: taken as several

    def gcloud(self, verb: str, *args: str) -> str:
        """`gcloud compute tpus tpu-vm VERB ARGS` on every worker of this slice, as a shell line."""
        where = ["--zone", self.zone] + (["--project", self.project] if self.project else [])
        return _gcloud_line(["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *where, "--worker=all"])


def _gcloud_line(argv: list[str]) -> str:
    """shlex.join, except for "$variables", which the script expands."""
    return " ".join(a if a.startswith('"$') else shlex.quote(a) for a in argv)


@dataclasses.dataclass(frozen=True)
class SkyResources:
    accelerators: str  # SkyPilot's NAME[:COUNT]: H100:8, or a TPU slice such as tpu-v5p-16
    nodes: int = 1
    spot: bool = False

    @property
    def tpu(self) -> bool:
        return self.accelerators.startswith("tpu-")


def is_bucket(root: str) -> bool:
    return root.startswith(BUCKET) and len(root[len(BUCKET):].strip("/")) > 0


def check_root(root: str | None, emit: str, multi_host: bool) -> None:
    """One error naming --workdir_root when the run's hosts could not all reach, or would lose, its workdir."""
    if not root:
        raise LaunchError(f"--emit {emit} needs --workdir_root: where the runs' workdirs live, shared by every host "
                          "and kept when the machines go (" + ("a bucket such as gs://BUCKET/runs" if emit == "skypilot"
                                                              else "gs://BUCKET/runs, or a filesystem mounted on "
                                                                   "every worker such as /mnt/shared/runs") + ")")
    if "://" in root and not is_bucket(root):
        raise LaunchError(f"--workdir_root {root}: buckets are gs://BUCKET[/PATH], mounted with gcsfuse; orbax "
                          "finishes each checkpoint by renaming its temporary folder, which gcsfuse does and goofys "
                          "(SkyPilot's mount for S3-style buckets) does not")
    if emit == "skypilot" and not is_bucket(root):
        raise LaunchError(f"--workdir_root {root}: SkyPilot needs a bucket for the workdirs (gs://BUCKET/PATH), "
                          f"mounted on every node at {SKY_MOUNT}: a cluster's own disks go with it when it is "
                          "preempted, and a recovered job starts on new machines")
    if emit == "tpu" and not is_bucket(root) and not os.path.isabs(root) and multi_host:
        raise LaunchError(f"--workdir_root {root}: a relative path is a different folder on each worker of a "
                          "multi-host slice (and is lost with the VM); give gs://BUCKET/PATH or an absolute path "
                          "mounted on every worker (--nodes 1 for a single-host slice)")


def tpu_root(root: str) -> tuple[str, str | None]:
    """(the workdir root as a TPU worker sees it, the gs:// bucket it mounts there or None)."""
    if not is_bucket(root):
        return root, None
    bucket, _, rest = root[len(BUCKET):].strip("/").partition("/")
    return os.path.join(GCS_MOUNTS, bucket, rest).rstrip("/"), bucket


def repo_config(spec: str) -> str:
    """The config spec as the remote machines, which hold only the repository, find it: relative to its root."""
    path, sep, arg = S.resolve_config(spec).partition(":")
    rel = os.path.relpath(os.path.abspath(path), S.ROOT)
    if rel.startswith(".."):
        raise LaunchError(f"config {spec}: {os.path.abspath(path)} is outside the repository ({S.ROOT}); the remote "
                          "machines get only the repository's files: move it into configs/")
    return rel + sep + arg


def _top(root: str, sweep: S.Sweep) -> str:
    """Where the runs' workdirs are, for a script's header."""
    return os.path.join(root.rstrip("/"), sweep.name) + ("" if sweep.is_single else "/<run>")


def _env(extra: dict) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in {**extra, **TIMEOUTS}.items())


# ---- TPU pod slice: a shell script of gcloud commands ---------------------------------------------------------

TPU_HEADER = """#!/bin/bash
# Sweep {name} on the TPU pod slice {tpu} ({zone}): {count} run(s), one after another.
# Each run is one `gcloud compute tpus tpu-vm ssh --worker=all` command starting scripts/train.py on every worker
# of the slice, in {repo}, with {force}=1: the workers find each other through the TPU metadata.
# Run it from the repository root, on a machine with gcloud logged in to the TPU's project:
#
#   bash {path} setup
#       once per TPU VM (again after it is recreated): copy this checkout (the files git does not ignore) to
#       {repo} on every worker and run `{setup} tpu` there: a Python >= 3.11 and .venv with
#       jax[tpu] (`make setup JAX=tpu`){gcsfuse}
#   bash {path} [K]
#       the runs, from run K (0-based; default 0)
#
# Workdirs: {where}.
# Preemption: when the slice is preempted or deleted, or a run is stopped by a signal (exit {resumable}, its
# checkpoint saved), this script stops at that run. Once the TPU is back (`setup` first if it was recreated), run
# the same command again: each run resumes from the last checkpoint in its workdir, and a finished run only
# restores its checkpoint and stops (pass K to skip the first K runs).
set -euo pipefail
"""


def _tpu_setup(tpu: TpuSlice, bucket: str | None) -> list[str]:
    """`bash SCRIPT setup`: this checkout to every worker (through the ssh user's home), unpacked and set up."""
    repo = shlex.quote(tpu.repo_dir)
    unpack = (f"mkdir -p {repo} && tar -xzf {ARCHIVE} -C {repo} && cd {repo} && bash {SETUP_HOST} tpu"
              + (" --gcsfuse" if bucket else ""))
    return ['if [ "${1:-}" = setup ]; then',
            f'  archive="$(mktemp -d)/{ARCHIVE}"',
            '  git ls-files -z --cached --others --exclude-standard |',
            '    tar -czf "$archive" --null --ignore-failed-read -T -',
            "  " + tpu.gcloud("scp", '"$archive"', f"{tpu.name}:{ARCHIVE}"),
            "  " + tpu.gcloud("ssh", tpu.name, "--command", unpack),
            "  exit 0", "fi"]


def _tpu_run_command(run: S.Run, config: str, tpu: TpuSlice, bucket: str | None) -> str:
    """What every worker runs for `run`: into the repository, mount the bucket if it is not, train."""
    steps = [f"cd {shlex.quote(tpu.repo_dir)}"]
    if bucket:
        m = shlex.quote(os.path.join(GCS_MOUNTS, bucket))
        steps.append(f'{{ mountpoint -q {m} || {{ sudo mkdir -p {m} && sudo chown "$(id -u)" {m} && '
                     f"{GCSFUSE} {shlex.quote(bucket)} {m}; }}; }}")
    steps.append(f"{_env({distributed.FORCE_VAR: '1'})} {shlex.join(run.argv(config, VENV_PYTHON))}")
    return " && ".join(steps)


def tpu_script(sweep: S.Sweep, path: str, tpu: TpuSlice, root: str) -> tuple[str, list[S.Run]]:
    """Write the TPU script for `sweep` with its workdirs below `root` (gs://BUCKET/PATH, or a path every worker
    mounts); returns its path and the runs, with their workdirs as the workers see them."""
    check_root(root, "tpu", tpu.workers != 1)
    worker_root, bucket = tpu_root(root)
    runs = S.plan(sweep, worker_root)
    config = repo_config(sweep.config)
    repo = tpu.repo_dir if os.path.isabs(tpu.repo_dir) else f"~/{tpu.repo_dir}"
    where = (f"{_top(root, sweep)}, mounted with gcsfuse at {GCS_MOUNTS}/{bucket} on every worker by each run's command"
             if bucket else f"{_top(root, sweep)}, which every worker must see")
    lines = [TPU_HEADER.format(name=sweep.name, tpu=tpu.name, zone=tpu.zone, count=len(runs), repo=repo,
                               force=distributed.FORCE_VAR, path=path, setup=SETUP_HOST, where=where,
                               resumable=errors.EXIT_RESUMABLE, gcsfuse=" and gcsfuse" if bucket else "")]
    lines += _tpu_setup(tpu, bucket)
    usage = f"usage: bash {path} [setup | K (the first run, 0-{len(runs) - 1})]"
    lines += ["FIRST=${1:-0}", f'case "$FIRST" in ""|*[!0-9]*) echo {shlex.quote(usage)} >&2; exit 2;; esac']
    for i, run in enumerate(runs):
        lines += [f'if [ "$FIRST" -le {i} ]; then',
                  f"  echo {shlex.quote(f'run {i + 1}/{len(runs)}: {run.name} -> {run.workdir}')}",
                  "  " + tpu.gcloud("ssh", tpu.name, "--command", _tpu_run_command(run, config, tpu, bucket)),
                  "fi"]
    _write(path, "\n".join(lines) + "\n", executable=True)
    return path, runs


def _write(path: str, text: str, executable: bool = False) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with files.atomic_path(path) as tmp:
        tmp.write_text(text)
    if executable:
        os.chmod(path, os.stat(path).st_mode | 0o111)


# ---- SkyPilot: one task YAML per run --------------------------------------------------------------------------

SKY_LAUNCH_HEADER = """#!/bin/bash
# Sweep {name} as SkyPilot managed jobs: {count} task YAML(s) beside this script, one per run, each submitted as a
# job of its own (its own cluster, the runs in parallel) on {nodes} node(s) x {accelerators}{spot}.
# Code: this checkout, {root}, which SkyPilot copies to every node; `setup` builds .venv there.
# Workdirs: {top}, the bucket mounted at {mount} on every node (file_mounts, mode MOUNT).
# Needs `pip install skypilot` and `sky check` passing for your cloud; then: bash {script}
#
# Preemption: SkyPilot's managed-job controller relaunches a preempted job on new machines, and a run stopped by a
# signal (exit {resumable}, its checkpoint saved) is relaunched too (job_recovery.recover_on_exit_codes); either
# way the run resumes from the last checkpoint in the bucket. `sky jobs queue` shows them; a job that ended for
# good resumes the same way when launched again: sky jobs launch -y -d ITS.yaml
set -euo pipefail
cd "$(dirname "$0")"
"""


def sky_name(text: str) -> str:
    """A SkyPilot task name (letters, digits, and single or double [._-] between them) for a run's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text)
    return re.sub(r"[._-]{3,}", "-", name).strip("._-")


def check_resources(res: SkyResources) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*(:[1-9][0-9]*)?", res.accelerators):
        raise LaunchError(f"--accelerators {res.accelerators!r}: expected SkyPilot's NAME[:COUNT] per node, e.g. "
                          "H100:8, A100-80GB:8, or a TPU slice such as tpu-v5p-16")
    if res.tpu and res.nodes > 1:
        raise LaunchError(f"--nodes {res.nodes} with --accelerators {res.accelerators}: a TPU slice is one SkyPilot "
                          "node (its hosts all run the task); for more chips choose a larger slice")


def sky_run(run: S.Run, config: str, res: SkyResources) -> str:
    """The task's `run` script. GPUs: one process per node driving all its GPUs (train.sbatch's MODE=node), the
    coordinator process 0 on the first of SKYPILOT_NODE_IPS; a TPU slice: every host joins through the TPU
    metadata, as on a pod slice without SkyPilot."""
    train = f"exec {shlex.join(run.argv(config, VENV_PYTHON))}"
    if res.tpu:
        return f"set -e\nexport {_env({distributed.FORCE_VAR: '1'})}\n{train}\n"
    return ("set -e\n"
            f"export {_env({})}\n"
            "export JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((SKYPILOT_NUM_GPUS_PER_NODE - 1)))\n"
            f'COORDINATOR="$(echo "$SKYPILOT_NODE_IPS" | head -n1):{COORDINATOR_PORT}"\n'
            f'{train} --coordinator_address "$COORDINATOR" --num_processes "$SKYPILOT_NUM_NODES" '
            '--process_id "$SKYPILOT_NODE_RANK"\n')


def sky_task(name: str, run: S.Run, config: str, res: SkyResources, bucket: str) -> dict:
    """The SkyPilot task of one run, as the YAML's mapping."""
    return {"name": name,
            "num_nodes": res.nodes,
            "resources": {"accelerators": res.accelerators, "use_spot": res.spot,
                          "job_recovery": {"max_restarts_on_errors": 0,
                                           "recover_on_exit_codes": [errors.EXIT_RESUMABLE]}},
            "workdir": S.ROOT,
            "file_mounts": {SKY_MOUNT: {"source": bucket, "mode": "MOUNT"}},
            "setup": f"bash {SETUP_HOST} {'tpu' if res.tpu else 'cuda13'}\n",
            "run": sky_run(run, config, res)}


def skypilot_tasks(sweep: S.Sweep, folder: str, res: SkyResources, root: str, overwrite: bool = False
                   ) -> tuple[str, list[str]]:
    """Write one SkyPilot task YAML per run into `folder` and `launch.sh` submitting them all as managed jobs;
    returns (launch.sh, the YAMLs)."""
    check_root(root, "skypilot", True)
    check_resources(res)
    runs = S.plan(sweep, SKY_MOUNT)
    config = repo_config(sweep.config)
    names = [sky_name(r.name if len(runs) == 1 else f"{sweep.name}-{r.name}") for r in runs]
    if len(set(names)) < len(names):
        raise LaunchError(f"sweep {sweep.name}: two runs have the same SkyPilot task name ({names}); rename a field "
                          "value")
    paths = [os.path.join(folder, f"{n}.yaml") for n in names]
    launch = os.path.join(folder, "launch.sh")
    files.check_new([launch, *paths], "--skypilot_dir", overwrite)
    for name, run, path in zip(names, runs, paths):
        _write(path, _yaml(sky_task(name, run, config, res, root.rstrip("/"))))
    header = SKY_LAUNCH_HEADER.format(name=sweep.name, count=len(runs), nodes=res.nodes,
                                      accelerators=res.accelerators, spot=", spot instances" if res.spot else "",
                                      root=S.ROOT, top=_top(root, sweep), mount=SKY_MOUNT, script=launch,
                                      resumable=errors.EXIT_RESUMABLE)
    _write(launch, header + "".join(f"sky jobs launch -y -d {shlex.quote(os.path.basename(p))}\n" for p in paths),
           executable=True)
    return launch, paths


def _yaml(task: dict) -> str:
    """YAML with the multi-line scripts as literal blocks, as one would write them."""
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper, value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)

    Dumper.add_representer(str, text)
    return yaml.dump(task, Dumper=Dumper, sort_keys=False, width=10_000)
