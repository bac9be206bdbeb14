#!/usr/bin/env python
"""Run a config sweep (configs/sweeps/*.py) and summarize it (logic in neox_jax/sweep.py).

    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit list     # print one train command per run
    python scripts/sweep.py --sweep configs/sweeps/tiny.py --emit local  # run them one after another
    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit slurm    # write a SLURM job array, then sbatch it
    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit tpu --tpu_name T --zone Z --workdir_root gs://B/runs
    python scripts/sweep.py --config configs/pythia.py:1b --emit skypilot --accelerators H100:8 --nodes 8 \
        --workdir_root gs://B/runs --config.data.train_paths=...          # one config's run: a sweep of one
    python scripts/sweep.py --summarize runs/sweeps/tiny                 # table + summary.csv + summary.png
    python scripts/sweep.py --isoflop 3e13,1e14,3e14 --config configs/tiny.py --family depth:1-6 --emit local
    python scripts/sweep.py --fit runs/sweeps/isoflop --at 1e15          # scaling-law fits + scaling.png

--isoflop BUDGETS: for each FLOP budget, --per_budget sizes of --family (pythia, or depth:A-B[,aspect:W]
[,head_dim:K]) trained on the tokens that spend it, as a sweep named isoflop (neox_jax/scaling.py). --fit DIR:
Chinchilla's approaches 2 and 3 on the finished runs under DIR with bootstrap intervals, the compute-optimal N and
D at --at FLOPs, and the isoflop curves and frontier in DIR/scaling.png (DIR/scaling.json holds the numbers).

Each run trains in <runs_dir>/<sweep name>/<its overrides>, e.g. runs/sweeps/lr/lr=0.0003,batch_size=512 (TPU and
SkyPilot: below --workdir_root); --config.FIELD=VALUE overrides a field in every run. Running the sweep again
resumes unfinished runs. Exit status: 0 ok, 1 a run failed, 2 bad sweep file or flag.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors, files  # noqa: E402
from neox_jax import launch, scaling  # noqa: E402
from neox_jax import sweep as S  # noqa: E402

# Flags that only mean something to one way of emitting (a default left alone passes anywhere).
ONLY_FOR = {"slurm_script": "slurm", "gpus_per_node": "slurm", "parallel": "slurm", "tpu_script": "tpu",
            "tpu_name": "tpu", "zone": "tpu", "project": "tpu", "repo_dir": "tpu", "skypilot_dir": "skypilot",
            "accelerators": "skypilot", "spot": "skypilot", "workdir_root": "tpu skypilot"}


def parse(argv):
    p = cli.Parser(description=__doc__)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--sweep", help="sweep file defining get_sweep()")
    what.add_argument("--summarize", metavar="DIR", help="gather the final metrics of every run under DIR")
    what.add_argument("--isoflop", metavar="BUDGETS", help="comma-separated FLOP budgets: an isoflop sweep of "
                      "--config over --family")
    what.add_argument("--fit", metavar="DIR", help="fit scaling laws to the finished runs under DIR")
    p.add_argument("--family", default="depth:1-8", help="--isoflop: pythia, or depth:A-B[,aspect:W][,head_dim:K]")
    p.add_argument("--per_budget", type=cli.positive_int, default=4, help="--isoflop: sizes per budget (>= 3)")
    p.add_argument("--at", type=float, help="--fit: the budget (FLOPs) to give the compute-optimal N and D at")
    p.add_argument("--resamples", type=cli.non_negative_int, default=100, help="--fit: bootstrap resamples")
    p.add_argument("--config", help="instead of --sweep: one run of this config (" + cli.CONFIG_HELP + ")")
    p.add_argument("--emit", choices=("list", "local", "slurm", "tpu", "skypilot"), default="list")
    p.add_argument("--runs_dir", default=os.path.join("runs", "sweeps"),
                   help="where the runs train (list, local, slurm) and the TPU / SkyPilot files are written")
    p.add_argument("--slurm_script", help="where --emit slurm writes (default <runs_dir>/<sweep>/sweep.sbatch)")
    p.add_argument("--tpu_script", help="where --emit tpu writes (default <runs_dir>/<sweep>/sweep_tpu.sh)")
    p.add_argument("--skypilot_dir", help="where --emit skypilot writes a task YAML per run and launch.sh "
                                          "(default <runs_dir>/<sweep>/skypilot)")
    cli.add_overwrite(p, "--slurm_script / --tpu_script / --skypilot_dir")
    p.add_argument("--nodes", type=cli.positive_int,
                   help="hosts per run: SLURM nodes, SkyPilot num_nodes (default 1); the TPU slice's workers "
                        "(only checked: --nodes 1 allows a relative --workdir_root)")
    p.add_argument("--gpus_per_node", type=cli.positive_int, default=8,
                   help="SLURM GPUs per node (one process per GPU)")
    p.add_argument("--parallel", type=cli.positive_int, default=4, help="SLURM array tasks running at once")
    p.add_argument("--workdir_root", help="TPU / SkyPilot: where the runs' workdirs live, shared by all hosts: a "
                                          "bucket, gs://BUCKET/PATH, or, on a TPU slice, a path mounted on every "
                                          "worker")
    p.add_argument("--tpu_name", help="TPU: the TPU VM (pod slice) to run on")
    p.add_argument("--zone", help="TPU: its zone")
    p.add_argument("--project", help="TPU: its Google Cloud project (default: gcloud's)")
    p.add_argument("--repo_dir", default="neox_jax", help="TPU: the repository on each worker, from the home "
                                                          "directory (`bash SCRIPT setup` puts it there)")
    p.add_argument("--accelerators", help="SkyPilot: per node, NAME[:COUNT] such as H100:8, or a TPU slice "
                                          "such as tpu-v5p-16")
    p.add_argument("--spot", action=cli.Switch, help="SkyPilot: spot instances (preempted jobs are relaunched)")
    args = cli.parse_args_with_config(p, argv)
    if args.isoflop and not args.config:
        raise errors.InputError("--isoflop needs --config SPEC: the base config every size is trained from")
    if bool(args.sweep) + bool(args.summarize) + bool(args.fit) + bool(args.config or args.isoflop) != 1:
        raise errors.InputError("give one of --sweep FILE, --config SPEC (one run), --isoflop BUDGETS --config SPEC, "
                                "--summarize DIR or --fit DIR")
    if args.overrides and (args.summarize or args.fit):
        raise errors.InputError("--config.FIELD overrides go with --sweep, --config or --isoflop, not --summarize "
                                "or --fit")
    if args.per_budget < 3:
        raise errors.InputError(f"--per_budget {args.per_budget}: a budget's parabola needs 3 sizes or more")
    defaults = {k: p.get_default(k) for k in ONLY_FOR}
    wrong = [k for k, emits in ONLY_FOR.items() if getattr(args, k) != defaults[k] and args.emit not in emits.split()]
    if wrong:
        raise errors.InputError(f"--{wrong[0]} is for --emit {ONLY_FOR[wrong[0]].replace(' ', ' / ')}, not --emit "
                                f"{args.emit}")
    return args


def cluster_nodes() -> int | None:
    """The number of nodes of the SLURM cluster this machine submits to (None without SLURM's sinfo)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return len(set(out.stdout.split())) if out.returncode == 0 and out.stdout.strip() else None


@errors.guarded
def main(argv=None) -> int:
    args = parse(argv)
    if args.summarize:
        columns, rows = S.summarize(args.summarize)
        print(S.format_table(columns, rows))
        csv_path, png_path = S.write_summary(args.summarize, columns, rows)
        print(f"{len(rows)} runs; table: {csv_path}; plot: {png_path}")
        return 0
    if args.fit:
        return fit(args)
    if args.isoflop:
        sweep = S.isoflop(args.config, _budgets(args.isoflop), args.family, args.per_budget, args.overrides)
    else:
        sweep = S.load_sweep(args.sweep, args.overrides) if args.sweep else S.single(args.config, args.overrides)
    if args.emit in ("tpu", "skypilot"):
        return emit_remote(args, sweep)
    runs = S.plan(sweep, args.runs_dir)
    if args.emit == "list":
        print("\n".join(S.commands(sweep, runs)))
        return 0
    if args.emit == "slurm":
        path = args.slurm_script or os.path.join(args.runs_dir, sweep.name, "sweep.sbatch")
        files.check_new([path], "--slurm_script", args.overwrite)  # its folder is made if missing
        S.check_devices(sweep, runs, (args.nodes or 1) * args.gpus_per_node)
        S.check_shared(args.runs_dir, args.nodes or 1, cluster_nodes())
        S.slurm_array(sweep, runs, path, nodes=args.nodes or 1, tasks_per_node=args.gpus_per_node,
                      gpus_per_node=args.gpus_per_node, parallel=args.parallel)
        print(f"wrote {path} ({len(runs)} array tasks); submit from the repository root: sbatch {path}")
        return 0
    status = S.run_local(sweep, runs)
    failed = [name for name, rc in status.items() if rc]
    print(f"{len(runs) - len(failed)}/{len(runs)} runs finished; summarize: "
          f"{S.python()} scripts/sweep.py --summarize {os.path.join(args.runs_dir, sweep.name)}")
    return 1 if failed else 0


def _budgets(spec: str) -> list[float]:
    try:
        budgets = sorted(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        budgets = []
    if not budgets or min(budgets) <= 0:
        raise errors.InputError(f"--isoflop {spec!r}: expected positive FLOP budgets such as 3e13,1e14,3e14")
    return budgets


def fit(args) -> int:
    result = scaling.fit(scaling.read_runs(args.fit), args.resamples)
    print(scaling.format_fit(result, args.at))
    path = os.path.join(args.fit, "scaling.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path} and {scaling.plot(result, os.path.join(args.fit, 'scaling.png'))}")
    return 0


def emit_remote(args, sweep) -> int:
    """--emit tpu / skypilot: the launch files, their runs' workdirs below --workdir_root."""
    if args.emit == "tpu":
        if not (args.tpu_name and args.zone):
            raise errors.InputError("--emit tpu needs --tpu_name and --zone: the TPU VM to run on "
                                    "(gcloud compute tpus tpu-vm list --zone ZONE)")
        path = args.tpu_script or os.path.join(args.runs_dir, sweep.name, "sweep_tpu.sh")
        files.check_new([path], "--tpu_script", args.overwrite)
        tpu = launch.TpuSlice(args.tpu_name, args.zone, args.project, args.repo_dir, args.nodes)
        _, runs = launch.tpu_script(sweep, path, tpu, args.workdir_root)
        print(f"wrote {path} ({len(runs)} run(s), workdirs below {os.path.dirname(runs[0].workdir)}); from the "
              f"repository root: bash {path} setup (once per TPU VM), then bash {path}")
        return 0
    if not args.accelerators:
        raise errors.InputError("--emit skypilot needs --accelerators: per node, e.g. H100:8, or a TPU slice such "
                                "as tpu-v5p-16")
    folder = args.skypilot_dir or os.path.join(args.runs_dir, sweep.name, "skypilot")
    res = launch.SkyResources(args.accelerators, args.nodes or 1, args.spot)
    script, tasks = launch.skypilot_tasks(sweep, folder, res, args.workdir_root, args.overwrite)
    print(f"wrote {len(tasks)} SkyPilot task(s) and {script}; submit them all as managed jobs: bash {script} "
          f"(or one: sky jobs launch {tasks[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
