"""Evaluate a GPT-NeoX model with lm-evaluation-harness (logic in neox_jax/evaluate.py).

    python scripts/evaluate.py --hf DIR --tasks lambada_openai,piqa,arc_easy,arc_challenge,winogrande,hellaswag
    python scripts/evaluate.py --checkpoint PARAMS_DIR --tasks piqa --num_fewshot 5 --limit 100 --output results.json
    python scripts/evaluate.py --workdir RUN --steps all --tasks lambada_openai,piqa     # every kept checkpoint

--workdir evaluates a series (neox_jax/series.py): a training run's kept checkpoints, or a folder of HF checkpoints
named step1000/, step2000/, ... (Pythia's revisions); --steps picks them (all, A:B, or 1000,2000). Each step's
results go to --output_dir (default RUN/eval) as step_<N>.json as soon as they are done, so the same command again
skips finished steps; then the step x task x metric table and a PNG per metric against step.

The offline tasks: configs/eval_tasks/*.yaml, their data from --data_dir (default $NEOX_JAX_EVAL_DATA, else the
copies bundled in neox_jax/assets/eval/). Any other task name is one of lm-eval's own (data from the HF hub).
Exit status: 0 done, 2 bad flag, model, task or data file (one FATAL: line on stderr; --output is checked before the
evaluation runs).
"""

import json
import os
import sys

from neox_jax import cli, errors
from neox_jax import evaluate as E
from neox_jax.config import DTYPES


def parse(argv):
    p = cli.Parser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF GPTNeoXForCausalLM directory")
    source.add_argument("--checkpoint", help="neox_jax params dir (config.json + params.safetensors) or training workdir")
    source.add_argument("--workdir", help="a series: a training workdir's kept checkpoints, or a folder of HF "
                        "checkpoints step<N>/")
    p.add_argument("--steps", default="all", help="with --workdir: all, A:B, or a list 1000,2000")
    p.add_argument("--output_dir", help="with --workdir: where step_<N>.json and the plots go (default WORKDIR/eval)")
    p.add_argument("--tasks", default=",".join(E.LOCAL_TASKS), help="comma-separated task names")
    p.add_argument("--num_fewshot", type=cli.non_negative_int, default=None,
                   help="solved examples shown before each question (default: the task's own)")
    p.add_argument("--limit", type=float, default=None, help="docs per task (a fraction if < 1)")
    p.add_argument("--output", help="write the harness's results as JSON here")
    cli.add_overwrite(p, "--output")
    p.add_argument("--data_dir", help="folder holding lambada/ piqa/ arc/ winogrande/ hellaswag/")
    p.add_argument("--batch_size", type=cli.positive_int, default=8)
    p.add_argument("--max_length", type=cli.positive_int, default=None,
                   help="default: the model's max_position_embeddings")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--tokenizer", help="tokenizer file (default: the model's own: the HF dir's "
                   "tokenizer.json, the data.tokenizer of the run that wrote a params dir or workdir, else the 20B "
                   "tokenizer)")
    p.add_argument("--tensor_parallel", type=cli.positive_int, default=1)
    p.add_argument("--include_builtin_tasks", action="store_true",
                   help="also offer lm-eval's own tasks (implied by a task name that is not one of ours)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--bootstrap_iters", type=cli.non_negative_int, default=1000, help="resamples for stderrs (0: none)")
    return p.parse_args(argv)


@errors.guarded
def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if limit is not None and limit <= 0:
        raise errors.InputError(f"--limit={args.limit}: expected a number of documents >= 1 or a fraction in (0, 1)")
    cli.check_writable(args.output, "--output", args.overwrite)  # before the evaluation whose results it holds
    tasks = [t for t in args.tasks.split(",") if t]
    if not args.workdir and (args.steps != "all" or args.output_dir):
        raise errors.InputError("--steps and --output_dir choose and hold a series: they go with --workdir")
    if args.workdir:
        return _series(args, tasks, limit)
    try:
        E.check_offline(tasks)  # before the model loads
        lm = E.NeoXLM(hf=args.hf, checkpoint=args.checkpoint, batch_size=args.batch_size, max_length=args.max_length,
                      dtype=args.dtype, tokenizer=args.tokenizer, tensor_parallel=args.tensor_parallel)
        results = E.evaluate(lm, tasks, num_fewshot=args.num_fewshot, limit=limit,
                             data_dir=args.data_dir, include_builtin=args.include_builtin_tasks, seed=args.seed,
                             bootstrap_iters=args.bootstrap_iters)
    except ValueError as e:  # the harness's and the task loaders' verdicts on tasks and data files
        if isinstance(e, errors.UserError):
            raise
        raise errors.InputError(str(e)) from e
    print(E.results_table(results))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.output}")


def _series(args, tasks, limit) -> None:
    from neox_jax import series

    found = series.checkpoints(args.workdir)
    steps = series.select(list(found), args.steps, args.workdir)
    if not steps:
        raise errors.InputError(f"--steps {args.steps}: no checkpoint of {args.workdir} in that range; it holds "
                                f"{sorted(found)}")
    out_dir = args.output_dir or os.path.join(args.workdir, "eval")
    try:
        E.check_offline(tasks)
        results = series.evaluate_steps(
            args.workdir, steps, tasks, out_dir,
            lm_args=dict(batch_size=args.batch_size, max_length=args.max_length, dtype=args.dtype,
                         tokenizer=args.tokenizer, tensor_parallel=args.tensor_parallel),
            num_fewshot=args.num_fewshot, limit=limit, data_dir=args.data_dir, include_builtin=args.include_builtin_tasks,
            seed=args.seed, bootstrap_iters=args.bootstrap_iters)
    except ValueError as e:
        if isinstance(e, errors.UserError):
            raise
        raise errors.InputError(str(e)) from e
    print(series.format_table(results))
    for path in series.plot(results, out_dir):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
