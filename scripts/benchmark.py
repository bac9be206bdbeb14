#!/usr/bin/env python
"""Benchmarks; each prints a table and, with --json FILE, writes the rows.

  python scripts/benchmark.py train --preset cpu-small --compare-hf     # vs HF torch on the same shape
  python scripts/benchmark.py train --preset gpu-anchor --compare-hf --torch-compile
  python scripts/benchmark.py train --config configs/pythia.py:160m --config.train.batch_size=8
  python scripts/benchmark.py train --preset gpu-410m --variant train.loss_chunks=8 --variant model.remat_policy=dots
  python scripts/benchmark.py generate --config configs/pythia.py:1.4b --batches 1,32 --compare-hf
  python scripts/benchmark.py data                                      # loader tokens/s, preprocessing MB/s,
                                                                        # gpt_neox index build and load seconds
  python scripts/benchmark.py train --preset cpu-small --profile /tmp/prof   # + where the step's time goes
  python scripts/benchmark.py profile runs/tiny-profile/profile --steps 2    # the same for a training trace
                                                  # (written by --config.train.profile_steps=10,12: 2 steps)
  python scripts/benchmark.py energy --pairs 10                             # energy tracking's cost per step
  python scripts/benchmark.py eval --config configs/pythia.py:70m           # lm-eval: neox_jax vs the hf backend
  python scripts/benchmark.py checkpoint                                    # a 160m save with and without checksums
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax import config as cfg  # noqa: E402


# The documented way to get a trace: steps 10 and 11 of a fresh tiny run (one that finished returns at once).
PROFILE_RUN = (".venv/bin/python scripts/train.py --config configs/tiny.py --workdir runs/tiny-profile "
               "--config.train.profile_steps=10,12")


def _write(rows, path):
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)


def train(args):
    from neox_jax import targets

    targets.apply_xla_flags()
    from neox_jax.bench import train as bench

    if not args.preset and not args.config:
        raise errors.InputError("train: give --preset NAME or --config FILE[:ARG]")
    variants = [cfg.parse_overrides(v.split(","), "--variant") for v in args.variant or []]
    try:
        rows = bench.run(preset=args.preset, config_spec=args.config, overrides=args.overrides,
                         steps=args.steps, warmup=args.warmup, windows=args.windows, compare_hf=args.compare_hf,
                         torch_compile=args.torch_compile, variants=variants, profile_dir=args.profile)
    except (cfg.ConfigError, FileNotFoundError) as e:  # a mistyped field or config file: one line, before any timing
        raise errors.InputError(f"train: {e}") from None
    print(bench.format_rows(rows))
    _write(rows, args.json)
    if args.profile:
        from neox_jax.bench import profile as prof

        for name in sorted({r["name"] for r in rows}):
            trace = bench.profile_subdir(args.profile, name)
            print(f"\n--- {name}: where the step's time goes (trace in {trace})")
            try:
                print(prof.format_table(prof.busiest(trace, steps=bench.PROFILE_STEPS), top=args.top))
            except FileNotFoundError as e:  # the profiler wrote nothing readable: the timings above still stand
                print(f"profile: {e}")


def profile(args):
    from neox_jax.bench import profile as prof

    try:
        groups = prof.busiest(args.trace_dir, steps=args.steps)
    except FileNotFoundError as e:  # a run writes a trace only when asked: say how
        raise errors.InputError(f"profile: {e}; a training run writes one when config field train.profile_steps "
                                f"is set, e.g. {PROFILE_RUN}, then: benchmark.py profile runs/tiny-profile/profile "
                                "--steps 2") from None
    print(prof.format_table(groups, top=args.top))
    _write(groups, args.json)


def generate(args):
    from neox_jax import targets

    targets.apply_xla_flags()
    from neox_jax.bench import generate as bench

    rows = bench.run(args.config, batches=[int(b) for b in args.batches.split(",")], prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, dtype=args.dtype, compare_hf=args.compare_hf,
                     layer_loops=args.layer_loops.split(","))
    print(bench.format_rows(rows))
    _write(rows, args.json)


def data(args):
    from neox_jax.data import bench

    results = bench.run(seq_len=args.seq_len, batch_size=args.batch_size, batches=args.batches,
                        num_tokens=args.num_tokens, workers=args.workers, preprocess_input=args.input or None,
                        skip_preprocess=args.skip_preprocess, index_docs=args.index_docs,
                        index_samples=args.index_samples, skip_index=args.skip_index,
                        skip_loader=args.skip_loader, formats=not args.skip_formats, merge_mb=args.merge_mb)
    print(bench.format_results(results))
    _write(results, args.json)


def energy(args):
    from neox_jax import targets

    targets.apply_xla_flags()
    from neox_jax.bench import energy as bench

    from neox_jax.bench.train import preset_spec

    spec = preset_spec(args.preset) if args.preset else args.config
    result = bench.overhead(spec, args.overrides, steps=args.steps, pairs=args.pairs)
    print(bench.format_result(result))
    _write(result, args.json)


def _offline() -> None:
    """The evaluation benchmarks read only local files: the HF libraries never reach for the hub."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def evaluation(args):
    _offline()
    from neox_jax.bench import eval as bench

    tasks = {}
    for item in args.tasks.split(","):
        task, sep, limit = item.partition("=")
        if not task or (sep and not limit.isdigit()):
            raise errors.InputError(f"eval: --tasks expects TASK[=LIMIT],..., got {item!r}")
        tasks[task] = int(limit) if sep else None
    rows = bench.run(args.config, tasks, batch_size=args.batch_size, passes=args.passes, model_dir=args.model_dir,
                     seed=args.seed, row_length=args.row_length)
    print(bench.format_rows(rows))
    _write(rows, args.json)


def eval_loop(args):
    _offline()
    from neox_jax import table
    from neox_jax.bench import eval as bench

    steps = tuple(int(x) for x in args.steps.split(","))
    if len(steps) != 2:
        raise errors.InputError(f"eval-loop: --steps expects two kept steps A,B, got {args.steps!r}")
    rows = bench.loop_vs_after(args.workdir, steps, args.tasks.split(","), args.limit, args.passes)
    print(table.render([table.Column("pass", "pass"), table.Column("how", "how", align="<", width=30),
                        table.Column("seconds", "seconds", ".2f")], rows))
    _write(rows, args.json)


def checkpoint(args):
    from neox_jax import targets

    targets.apply_xla_flags()
    from neox_jax.bench import checkpoint as bench

    rows = bench.run(args.config, args.overrides, args.repeats, args.dir)
    print(bench.format_rows(rows))
    _write(rows, args.json)


def checkpoint_flags(c):
    c.add_argument("--config", default="configs/pythia.py:160m", help="the model whose train state is saved")
    c.add_argument("--repeats", type=int, default=3, help="timed saves (after one warm-up)")
    c.add_argument("--dir", default="", help="where to write (default: the system's temporary folder)")
    c.add_argument("--json")


def train_flags(t):
    from neox_jax.bench.train import presets

    named = presets()
    t.add_argument("--preset", choices=[*named.PRESETS, *named.GROUPS],
                   help="a named shape of configs/bench.py (gpu-anchor: 410m and 1.4b)")
    t.add_argument("--config", help="config spec, e.g. configs/pythia.py:160m (instead of --preset); "
                   "--config.FIELD=VALUE overrides a field (of the preset's config too), repeatable")
    t.add_argument("--variant", action="append", metavar="FIELD=VALUE[,FIELD=VALUE]",
                   help="also time the step with these overrides (one more row each), repeatable")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--windows", type=int, default=3, help="time this many runs of --steps steps; report the best")
    t.add_argument("--compare-hf", action="store_true", help="also time HF transformers (PyTorch) on the same shape")
    t.add_argument("--torch-compile", action="store_true", help="with --compare-hf: also time torch.compile")
    t.add_argument("--profile", metavar="DIR", help="trace a few more steps of each shape into DIR and print where "
                   "the time goes")
    t.add_argument("--top", type=int, default=25, help="with --profile: names listed per thread")
    t.add_argument("--json", help="write the rows here")


def profile_flags(pr):
    pr.add_argument("trace_dir")
    pr.add_argument("--steps", type=int, default=1, help="steps the trace holds (STOP - START of the run's "
                    "train.profile_steps=START,STOP): times are divided by it")
    pr.add_argument("--top", type=int, default=25, help="names listed per thread")
    pr.add_argument("--json", help="write the per-thread tables here")


def generate_flags(g):
    g.add_argument("--config", default="configs/pythia.py:1.4b")
    g.add_argument("--batches", default="1,32")
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--dtype", default="bfloat16")
    g.add_argument("--compare-hf", action="store_true")
    g.add_argument("--layer-loops", default="scan,unstacked",
                   help="how decode walks the layers, any of scan,unrolled,unstacked (one row each)")
    g.add_argument("--json")


def data_flags(d):
    d.add_argument("--seq-len", type=int, default=2048)
    d.add_argument("--batch-size", type=int, default=8)
    d.add_argument("--batches", type=int, default=500)
    d.add_argument("--num-tokens", type=int, default=20_000_000, help="size of the synthetic loader dataset")
    d.add_argument("--workers", type=int, default=2, help="preprocessing worker processes")
    d.add_argument("--input", default="", help="preprocessing input (default: the bundled Pile sample)")
    d.add_argument("--skip-preprocess", action="store_true")
    d.add_argument("--index-docs", type=int, default=200_000_000, help="documents of the gpt_neox index build")
    d.add_argument("--index-samples", type=int, default=150_000_000, help="samples of the gpt_neox index build")
    d.add_argument("--skip-index", action="store_true", help="skip the gpt_neox index build (it needs ~5 GB)")
    d.add_argument("--skip-loader", action="store_true", help="skip the loader's tokens/s")
    d.add_argument("--skip-formats", action="store_true", help="skip jsonl vs Parquet on one worker")
    d.add_argument("--merge-mb", type=int, default=2048, help="size of the merge benchmark's pairs (0: skip it)")
    d.add_argument("--json")


def energy_flags(e):
    from neox_jax.bench.train import presets

    e.add_argument("--config", default="configs/tiny.py")
    e.add_argument("--preset", choices=presets().PRESETS, help="a named shape of `train` instead of --config "
                   "(--config.FIELD=VALUE overrides as for train)")
    e.add_argument("--steps", type=int, default=50, help="train steps per timed window (a multiple of log_every)")
    e.add_argument("--pairs", type=int, default=6, help="ABBA pairs of windows (off, on)")
    e.add_argument("--json")


def eval_flags(v):
    v.add_argument("--config", default="configs/pythia.py:70m", help="the random model's config (written as HF)")
    v.add_argument("--tasks", default="lambada_openai=300,piqa=200,hellaswag=200", help="TASK[=LIMIT],...")
    v.add_argument("--batch-size", type=int, default=16, help="both backends' batch_size")
    v.add_argument("--passes", type=int, default=2, help="runs of every task per backend, in ABBA order")
    v.add_argument("--model-dir", help="use (or write the random model to) this HF directory")
    v.add_argument("--row-length", type=int, default=None, help="neox_jax's packed row length")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json")


def eval_loop_flags(v):
    v.add_argument("--workdir", required=True, help="a training run with two kept checkpoints")
    v.add_argument("--steps", required=True, help="A,B: step A compiles, step B is timed")
    v.add_argument("--tasks", default="piqa,arc_easy")
    v.add_argument("--limit", type=int, default=200, help="documents per task")
    v.add_argument("--passes", type=int, default=2, help="ABBA passes")
    v.add_argument("--json")


# subcommand: (what it runs, its help, what adds its flags)
COMMANDS = {
    "train": (train, "train-step tokens/s, MFU and memory (optionally vs HF torch)", train_flags),
    "profile": (profile, "where the time goes in a jax.profiler trace (e.g. a run's workdir/profile)", profile_flags),
    "generate": (generate, "prefill / decode tokens/s against the bandwidth roofline", generate_flags),
    "data": (data, "data loader and preprocessing throughput", data_flags),
    "energy": (energy, "energy tracking's overhead per train step (interleaved A/B), J/token", energy_flags),
    "checkpoint": (checkpoint, "a train state's save time and the share its integrity checksums take",
                   checkpoint_flags),
    "eval": (evaluation, "lm-eval requests/s: the neox_jax backend vs lm-eval's hf backend, same model", eval_flags),
    "eval-loop": (eval_loop, "train.eval_tasks inside the loop vs evaluating the checkpoint afterwards",
                  eval_loop_flags),
}
TAKE_OVERRIDES = ("train", "energy", "checkpoint")  # the subcommands whose config --config.FIELD=VALUE changes


@errors.guarded
def main(argv=None):
    p = cli.Parser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (_, help_text, add_flags) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        add_flags(command)
        cli.add_overwrite(command, "--json")
    args = cli.parse_args_with_config(p, argv)
    cli.check_writable(args.json, "--json", args.overwrite)  # before the benchmark runs
    if args.overrides and args.command not in TAKE_OVERRIDES:
        raise errors.InputError(f"{args.command}: --config.FIELD=VALUE overrides are for train, energy and checkpoint only "
                                f"(got --config.{next(iter(args.overrides))})")
    COMMANDS[args.command][0](args)


if __name__ == "__main__":
    main()
