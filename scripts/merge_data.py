#!/usr/bin/env python
"""Concatenate .bin/.idx pairs into one, without tokenizing again (GPT-NeoX's merge_datasets): each pair's documents
after the previous pair's, in the order given, or, with --input DIR, every pair in DIR sorted by name.

  python scripts/merge_data.py data/a data/b --output-prefix data/ab
  python scripts/merge_data.py --input data/shards/ --output-prefix data/all

Streams a block at a time (memory stays flat) and writes the merged pair's manifest, hashed as it is written.
Pairs of different token types or tokenizers (their manifests say) are refused before anything is written.
Exit status: 0 merged, 2 bad input (a missing pair, mixed tokenizers, an existing output without --overwrite).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax.data import indexed, parts  # noqa: E402


def parse_args(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("prefixes", nargs="*", help="the pairs to merge, in order (PREFIX, PREFIX.bin or PREFIX.idx)")
    p.add_argument("--input", default="", help="a folder: merge every pair in it, sorted by name")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin, PREFIX.idx, PREFIX.manifest.json")
    cli.add_overwrite(p, "--output-prefix")
    args = p.parse_args(argv)
    if bool(args.prefixes) == bool(args.input):
        p.error("give the pairs to merge, or --input DIR (not both)")
    return args


def pairs_in(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise errors.InputError(f"--input {folder}: not a folder")
    found = sorted(os.path.join(folder, n[:-4]) for n in os.listdir(folder)
                   if n.endswith(".idx") and os.path.isfile(os.path.join(folder, n[:-4] + ".bin")))
    if not found:
        raise errors.InputError(f"--input {folder}: no .bin/.idx pairs in it")
    return found


@errors.guarded
def main(argv=None):
    args = parse_args(argv)
    prefixes = pairs_in(args.input) if args.input else [indexed.strip_suffix(p) for p in args.prefixes]
    done = parts.merge(prefixes, args.output_prefix, args.overwrite)
    print(f"merged {len(prefixes)} pairs: {done['documents']} documents, {done['tokens']} tokens, "
          f"{done['bytes'] / 1e6:.1f} MB in {done['seconds']:.1f} s into {args.output_prefix}")


if __name__ == "__main__":
    main()
