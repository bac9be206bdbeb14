#!/usr/bin/env python
"""Exact- and near-duplicate documents per pile_set_name.

  python scripts/dedup_report.py neox_jax/assets/train.jsonl.zst [--json report.json]
Drop exact duplicates while preprocessing with `scripts/preprocess_data.py --dedup`.
"""

import json

from neox_jax import cli, errors
from neox_jax.data.dedup import dedup_report, format_report


@errors.guarded
def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("inputs", nargs="+", help="Pile-format files or globs")
    p.add_argument("--ngram", type=int, default=5, help="words per shingle")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash signature length")
    p.add_argument("--bands", type=int, default=16, help="LSH bands (num-perm must be a multiple)")
    p.add_argument("--threshold", type=float, default=0.8, help="estimated Jaccard for a near duplicate")
    p.add_argument("--skip-bad", action="store_true")
    p.add_argument("--json", default="", help="also write the report as JSON here")
    cli.add_overwrite(p, "--json")
    args = p.parse_args(argv)
    cli.check_writable(args.json, "--json", args.overwrite)  # before the inputs are read
    report = dedup_report(args.inputs, ngram=args.ngram, num_perm=args.num_perm, bands=args.bands,
                          threshold=args.threshold, skip_bad=args.skip_bad)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
