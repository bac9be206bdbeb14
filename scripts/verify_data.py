"""Check a tokenized dataset (.bin/.idx) against the manifest preprocessing wrote beside it, and against a
published list of hashes (neox_jax/data/manifest.py).

    python scripts/verify_data.py runs/data/train                      # sizes, SHA-256, documents, tokens
    python scripts/verify_data.py runs/data/train --hashes SHA256SUMS   # and the published hashes

Prints one line per difference, naming the file and what differs. Exit status: 0 everything matches, 1 something
differs, 2 bad flag or no manifest.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax.data import manifest  # noqa: E402


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("prefixes", nargs="+", help="dataset prefixes (PREFIX.bin, PREFIX.idx, PREFIX.manifest.json)")
    p.add_argument("--hashes", help="a published list: one 'SHA256  FILENAME' a line (sha256sum's format)")
    return p.parse_args(argv)


@errors.guarded
def main(argv=None) -> int:
    args = parse(argv)
    published = manifest.read_published(args.hashes) if args.hashes else None
    problems = [line for prefix in args.prefixes for line in manifest.verify(prefix, published)]
    for line in problems:
        print(line)
    if not problems:
        print(f"ok: {', '.join(args.prefixes)} match their manifest" + (" and the published hashes" if published
                                                                        else ""))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
