#!/usr/bin/env python
"""Tokenize Pile-format text into GPT-NeoX .bin/.idx files.

  python scripts/preprocess_data.py neox_jax/assets/train.jsonl.zst
  python scripts/preprocess_data.py --input 'data/*.jsonl.zst' --output-prefix data/pile --workers 8
  python scripts/preprocess_data.py data/ --output-prefix data/pile    # every Pile-format file under data/
  python scripts/preprocess_data.py ... --resume                        # continue a run that was killed
  python scripts/preprocess_data.py 'shards/*.parquet' --output-prefix data/pile --parts 16 --slurm
      # 16 SLURM array tasks of whole input files, then a merge job (--parts N alone: N local processes)

Outputs appear only when every input was read; an existing one is refused unless --overwrite, and with
--split-by-component so are components whose output names would be the same. The run records its progress
(PREFIX.progress.json, every --progress-every seconds and when stopped by Ctrl-C or SIGTERM): after any stop,
`kill -9` included, the same command with --resume continues it, and the result is byte-identical to a run never
stopped; without --resume the next run of the prefix starts over, discarding it.
Exit status: 0 written, 2 bad input (a bad line as file:line, a missing file, no documents at all, an existing or
colliding output: nothing is written then), 130 interrupted, with one FATAL: line on stderr.
"""

import argparse
import os
import re
import shlex
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors, sweep  # noqa: E402
from neox_jax.data import parts  # noqa: E402
from neox_jax.data.documents import HUB_PREFIX, DataError, expand_inputs  # noqa: E402
from neox_jax.data.indexed import NEOX_SUFFIX  # noqa: E402
from neox_jax.data.resumable import SUFFIX as PROGRESS  # noqa: E402
from neox_jax.data.preprocess import preprocess  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("inputs", nargs="*", help="input files, globs or directories (same as --input)")
    p.add_argument("--input", default="", help="comma-separated files, globs or directories of .jsonl, .jsonl.zst, "
                   ".jsonl.gz, .parquet, .txt files")
    p.add_argument("--text-key", default="text", help="the JSON field or Parquet column holding the text")
    p.add_argument("--output-prefix", default="",
                   help="writes PREFIX.bin and PREFIX.idx (default: the first input's name without extensions)")
    p.add_argument("--tokenizer", default="", help="HF tokenizers .json or sentencepiece .model (default: bundled 20B)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizer processes")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end-of-document token after each document (default on)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad lines instead of stopping")
    p.add_argument("--split-by-component", action="store_true",
                   help="one PREFIX_<pile_set_name> output per component")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (normalized text)")
    p.add_argument("--keep-whitespace-docs", action="store_true",
                   help="tokenize whitespace-only documents and drop empty ones, as GPT-NeoX does (default: both "
                        "are bad input)")
    p.add_argument("--add-special-tokens", action="store_true",
                   help="HF tokenizers: add the tokenizer's special tokens (e.g. a BOS per document), as GPT-NeoX's "
                        "HFTokenizer does (the 20B tokenizer adds none)")
    p.add_argument("--neox-names", action="store_true",
                   help="name outputs as GPT-NeoX does: PREFIX_text_document.bin/.idx")
    p.add_argument("--resume", action="store_true",
                   help="continue this output prefix's unfinished run from its recorded progress (same inputs, "
                        "tokenizer and settings, else refused); starts from the beginning when there is none")
    p.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress records")
    p.add_argument("--parts", type=int, default=0,
                   help="split the inputs (whole files, in order) into N parts tokenized by N processes, or by a "
                        "SLURM array with --slurm, then merged into PREFIX")
    p.add_argument("--part", type=int, default=None, help="with --parts N: tokenize only part I (0..N-1)")
    p.add_argument("--merge", action="store_true", help="with --parts N: only merge the finished parts into PREFIX")
    p.add_argument("--keep-parts", action="store_true", help="keep the parts' files after the merge")
    p.add_argument("--slurm", action="store_true",
                   help="with --parts N: write a SLURM job array (one task per part) and a merge job that waits for "
                        "it, beside PREFIX, and submit both")
    p.add_argument("--slurm-args", default="", help="more #SBATCH options for both jobs, e.g. "
                   "'--partition=cpu --time=24:00:00'")
    p.add_argument("--no-submit", action="store_true", help="with --slurm: write the scripts, do not submit them")
    cli.add_overwrite(p, "--output-prefix")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.all_inputs = list(args.inputs) + ([args.input] if args.input else [])
    if not args.all_inputs:
        p.error("no input: give files as arguments or with --input")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.parts < 0 or (args.part is not None and not 0 <= args.part < max(args.parts, 1)):
        p.error(f"--part {args.part} needs --parts N with 0 <= part < N (got --parts {args.parts})")
    if (args.part is not None or args.merge or args.slurm) and not args.parts:
        p.error("--part, --merge and --slurm need --parts N")
    if args.parts and (args.dedup or args.split_by_component):
        p.error("--parts: --dedup and --split-by-component need every document in one run (exact duplicates may lie "
                "in different parts); preprocess without --parts")
    if not args.output_prefix:
        first = os.path.basename(os.path.normpath(args.all_inputs[0].split(",")[0]))
        args.output_prefix = re.sub(r"(\.[A-Za-z0-9]+)+$", "", first).replace("*", "") or "data"
    return args


def _preprocess(args, inputs, output_prefix, **extra):
    try:
        return preprocess(inputs, output_prefix, args.tokenizer or None, workers=args.workers,
                          append_eod=args.append_eod, skip_bad=args.skip_bad,
                          split_by_component=args.split_by_component, dedup=args.dedup,
                          progress=not args.no_progress, keep_whitespace_docs=args.keep_whitespace_docs,
                          add_special_tokens=args.add_special_tokens, neox_names=args.neox_names,
                          overwrite=args.overwrite, text_key=args.text_key, resume=args.resume,
                          progress_every=args.progress_every, **extra)
    except DataError as e:
        raise errors.InputError(f"{e} (--skip-bad skips and counts bad lines)") from e
    except KeyboardInterrupt:  # the progress is kept (preprocess); outputs are renamed in only at the end
        kept = ("its progress is kept: the same command with --resume continues it"
                if os.path.exists(output_prefix + PROGRESS) else "no document was written yet")
        errors.fatal(f"interrupted before {output_prefix} was complete: nothing under that prefix was written or "
                     f"replaced; {kept}", 130)


def _task_command(args, *more) -> list[str]:
    """This command as one part's job runs it: the same inputs and settings, absolute paths, no --slurm."""
    flags = {"--append-eod" if args.append_eod else "--no-append-eod": True, "--skip-bad": args.skip_bad,
             "--keep-whitespace-docs": args.keep_whitespace_docs, "--add-special-tokens": args.add_special_tokens,
             "--neox-names": args.neox_names, "--overwrite": args.overwrite, "--keep-parts": args.keep_parts}
    tokenizer = ["--tokenizer", os.path.abspath(args.tokenizer)] if args.tokenizer else []
    return [sweep.python(), os.path.abspath(__file__), "--input", ",".join(_inputs(args)), "--output-prefix",
            os.path.abspath(args.output_prefix), *tokenizer, "--text-key", args.text_key, "--workers",
            str(args.workers), "--progress-every", str(args.progress_every), "--parts", str(args.parts),
            "--no-progress", *(f for f, on in flags.items() if on), *more]


def _part_names(args) -> list[str]:
    """The pairs the parts write (GPT-NeoX's suffix after each part's name with --neox-names)."""
    return [parts.part_prefix(args.output_prefix, i, args.parts) + (NEOX_SUFFIX if args.neox_names else "")
            for i in range(args.parts)]


def _inputs(args) -> list[str]:
    """The input files, absolute: a part's manifest names them so, whichever folder a job runs from."""
    return [i if i.startswith(HUB_PREFIX) else os.path.abspath(i) for i in expand_inputs(args.all_inputs)]


def _merge(args, groups) -> None:
    prefixes = _part_names(args)
    done = parts.merge(prefixes, args.output_prefix + (NEOX_SUFFIX if args.neox_names else ""), args.overwrite,
                       expect_inputs=groups)
    print(f"merged {args.parts} parts: {done['documents']} documents, {done['tokens']} tokens, "
          f"{done['bytes'] / 1e6:.1f} MB in {done['seconds']:.1f} s ({done['bytes'] / 1e6 / done['seconds']:.0f} "
          f"MB/s) into {args.output_prefix}")
    if not args.keep_parts:
        for p in prefixes:
            for suffix in (".bin", ".idx", ".manifest.json"):
                os.remove(p + suffix)


def _parts(args) -> None:
    groups = parts.split(_inputs(args), args.parts)
    prefix_of = lambda i: parts.part_prefix(args.output_prefix, i, args.parts)  # noqa: E731
    if args.part is not None:
        summary = _preprocess(args, groups[args.part], prefix_of(args.part),
                              extra_manifest={"part": [args.part, args.parts]})
        print(summary.format())
    elif args.merge:
        _merge(args, groups)
    elif args.slurm:
        scripts = parts.slurm_scripts(_task_command(args), _task_command(args, "--merge"), args.parts,
                                      os.path.abspath(args.output_prefix), args.workers, shlex.split(args.slurm_args))
        if args.no_submit:
            print(f"wrote {scripts[0]} ({args.parts} array tasks) and {scripts[1]}; submit with:\n"
                  f"  jobid=$(sbatch --parsable {scripts[0]}) && sbatch --dependency=afterok:$jobid {scripts[1]}")
            return
        array_id, merge_id = parts.submit(*scripts)
        print(f"submitted {args.parts} parts as job array {array_id} ({scripts[0]}) and the merge as job {merge_id} "
              f"({scripts[1]}), which starts when every part has succeeded; logs: {args.output_prefix}.part-*.log")
    else:  # N local processes sharing --workers, then the merge
        todo = [i for i, name in enumerate(_part_names(args)) if not parts.complete(name, groups[i])]
        workers = str(max(1, args.workers // max(len(todo), 1)))
        if len(todo) < args.parts:
            print(f"{args.parts - len(todo)} part(s) already complete, not run again")
        parts.run_local([_task_command(args, "--part", str(i), "--workers", workers,
                                       *(["--resume"] if args.resume else [])) for i in todo])
        _merge(args, groups)


@errors.guarded
def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop keeps the progress, as Ctrl-C does
    if args.parts:
        _parts(args)
    else:
        print(_preprocess(args, args.all_inputs, args.output_prefix).format())


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
