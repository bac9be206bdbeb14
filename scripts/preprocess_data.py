#!/usr/bin/env python
"""Tokenize Pile-format text into GPT-NeoX .bin/.idx files.

  python scripts/preprocess_data.py neox_jax/assets/train.jsonl.zst
  python scripts/preprocess_data.py --input 'data/*.jsonl.zst' --output-prefix data/pile --workers 8
  python scripts/preprocess_data.py data/ --output-prefix data/pile    # every Pile-format file under data/

Outputs appear only when every input was read; an existing one is refused unless --overwrite, and with
--split-by-component so are components whose output names would be the same. Ctrl-C stops with one line and leaves
no temporary files; those of a run that was killed (`kill -9`) are removed by the next run of the same prefix.
Exit status: 0 written, 2 bad input (a bad line as file:line, a missing file, no documents at all, an existing or
colliding output: nothing is written then), 130 interrupted, with one FATAL: line on stderr.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax.data.documents import DataError  # noqa: E402
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
    cli.add_overwrite(p, "--output-prefix")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.all_inputs = list(args.inputs) + ([args.input] if args.input else [])
    if not args.all_inputs:
        p.error("no input: give files as arguments or with --input")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if not args.output_prefix:
        first = os.path.basename(os.path.normpath(args.all_inputs[0].split(",")[0]))
        args.output_prefix = re.sub(r"(\.[A-Za-z0-9]+)+$", "", first).replace("*", "") or "data"
    return args


@errors.guarded
def main(argv=None):
    args = parse_args(argv)
    try:
        summary = preprocess(args.all_inputs, args.output_prefix, args.tokenizer or None, workers=args.workers,
                             append_eod=args.append_eod, skip_bad=args.skip_bad,
                             split_by_component=args.split_by_component, dedup=args.dedup,
                             progress=not args.no_progress, keep_whitespace_docs=args.keep_whitespace_docs,
                             add_special_tokens=args.add_special_tokens, neox_names=args.neox_names,
                             overwrite=args.overwrite, text_key=args.text_key)
    except DataError as e:
        raise errors.InputError(f"{e} (--skip-bad skips and counts bad lines)") from e
    except KeyboardInterrupt:  # preprocess has removed its temporary files; outputs are renamed in only at the end
        errors.fatal(f"interrupted (Ctrl-C) before {args.output_prefix} was complete: nothing under that prefix was "
                     "written or replaced, and no temporary file is left; run the same command again to start over",
                     130)
    print(summary.format())


if __name__ == "__main__":
    main()
