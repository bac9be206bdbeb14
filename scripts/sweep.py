#!/usr/bin/env python
"""Run a config sweep (configs/sweeps/*.py) and summarize it (logic in neox_jax/sweep.py).

    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit list     # print one train command per run
    python scripts/sweep.py --sweep configs/sweeps/tiny.py --emit local  # run them one after another
    python scripts/sweep.py --sweep configs/sweeps/lr.py --emit slurm    # write a SLURM job array, then sbatch it
    python scripts/sweep.py --summarize runs/sweeps/tiny                 # table + summary.csv + summary.png

Each run trains in <runs_dir>/<sweep name>/<its overrides>, e.g. runs/sweeps/lr/lr=0.0003,batch_size=512;
running the sweep again resumes unfinished runs. Exit status: 0 ok, 1 a run failed, 2 bad sweep file or flag.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax import sweep as S  # noqa: E402


def parse(argv):
    p = cli.Parser(description=__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sweep", help="sweep file defining get_sweep()")
    what.add_argument("--summarize", metavar="DIR", help="gather the final metrics of every run under DIR")
    p.add_argument("--emit", choices=("list", "local", "slurm"), default="list")
    p.add_argument("--runs_dir", default=os.path.join("runs", "sweeps"))
    p.add_argument("--slurm_script", help="where --emit slurm writes (default <runs_dir>/<sweep>/sweep.sbatch)")
    p.add_argument("--nodes", type=cli.positive_int, default=1, help="SLURM nodes per run")
    p.add_argument("--gpus_per_node", type=cli.positive_int, default=8,
                   help="SLURM GPUs per node (one process per GPU)")
    p.add_argument("--parallel", type=cli.positive_int, default=4, help="SLURM array tasks running at once")
    return p.parse_args(argv)


@errors.guarded
def main(argv=None) -> int:
    args = parse(argv)
    if args.summarize:
        columns, rows = S.summarize(args.summarize)
        print(S.format_table(columns, rows))
        csv_path, png_path = S.write_summary(args.summarize, columns, rows)
        print(f"{len(rows)} runs; table: {csv_path}; plot: {png_path}")
        return 0
    sweep = S.load_sweep(args.sweep)
    runs = S.plan(sweep, args.runs_dir)
    if args.emit == "list":
        print("\n".join(S.commands(sweep, runs)))
        return 0
    if args.emit == "slurm":
        path = args.slurm_script or os.path.join(args.runs_dir, sweep.name, "sweep.sbatch")
        S.slurm_array(sweep, runs, path, nodes=args.nodes, tasks_per_node=args.gpus_per_node,
                      gpus_per_node=args.gpus_per_node, parallel=args.parallel)
        print(f"wrote {path} ({len(runs)} array tasks); submit from the repository root: sbatch {path}")
        return 0
    status = S.run_local(sweep, runs)
    failed = [name for name, rc in status.items() if rc]
    print(f"{len(runs) - len(failed)}/{len(runs)} runs finished; summarize: "
          f"{S.python()} scripts/sweep.py --summarize {os.path.join(args.runs_dir, sweep.name)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
