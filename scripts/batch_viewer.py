#!/usr/bin/env python
"""The tokens (and text) a run trains on at given steps: what a model saw before a checkpoint.

    python scripts/batch_viewer.py --config configs/pythia.py:160m --config.data.order=gpt_neox \\
        --config.data.train_paths=data/pile_20B_tokenizer_text_document --config.train.seed=1234 \\
        --steps 1000:1010 --npy steps.npy
    python scripts/batch_viewer.py --config configs/tiny.py --steps 5 --rows 0:2 --json step5.json

Give the same --config flags as the training command: the order depends on the data files, data.order, the
seed, seq_len, the global batch and (gpt_neox) the number of training samples. --steps A:B is the half-open
range of train steps A .. B - 1 (step k is the batch of the k-th update; a checkpoint at step N saw 0 .. N - 1);
--npy writes int32 [steps, rows, seq_len + 1], --json one {"step", "row", "tokens", "text"} line per row.
"""

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax import config as cfg  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=cli.CONFIG_HELP)
    p.add_argument("--steps", default="0", help="train step K, or A:B for steps A .. B - 1")
    p.add_argument("--rows", default="", help="rows of each global batch, A:B (default: all)")
    p.add_argument("--json", help="write one JSON object per row (step, row, tokens, text) to this file")
    p.add_argument("--npy", help="write the tokens as int32 [steps, rows, seq_len + 1] to this .npy file")
    cli.add_overwrite(p, "--json", "--npy")
    p.add_argument("--chars", type=int, default=120, help="characters of text printed per row (0: print no text)")
    return cli.parse_args_with_config(p, argv)


def _range(spec: str, flag: str, limit: int | None = None) -> range:
    try:
        start, _, stop = spec.partition(":")
        r = range(int(start or 0), int(stop) if stop else (int(start) + 1 if limit is None else limit))
    except ValueError:
        raise errors.InputError(f"--{flag}={spec!r}: expected K or A:B with integers") from None
    if not len(r) or r.start < 0 or (limit is not None and r.stop > limit):
        raise errors.InputError(f"--{flag}={spec!r}: empty or out of range" + (f" [0, {limit})" if limit else ""))
    return r


@errors.guarded
def main(argv=None):
    args = parse(argv)
    config = cfg.validate(cfg.from_spec(args.config, args.overrides, "--config"))
    import numpy as np

    from neox_jax.data.dataset import steps_batches
    from neox_jax.data.tokenizer import load_tokenizer

    for flag in ("json", "npy"):
        cli.check_writable(getattr(args, flag), f"--{flag}", args.overwrite)
    steps = _range(args.steps, "steps")
    rows = _range(args.rows, "rows", config.train.batch_size) if args.rows else range(config.train.batch_size)
    tokenizer = load_tokenizer(config.data.tokenizer or None)
    out = (np.lib.format.open_memmap(args.npy, mode="w+", dtype=np.int32,
                                     shape=(len(steps), len(rows), config.train.seq_len + 1)) if args.npy else None)
    with open(args.json, "w") if args.json else contextlib.nullcontext() as lines:
        for i, (step, batch) in enumerate(steps_batches(config, steps)):
            batch = batch[rows.start:rows.stop]
            if out is not None:
                out[i] = batch
            for row, ids in zip(rows, batch):
                text = tokenizer.decode(ids) if lines or args.chars else ""
                if lines:
                    lines.write(json.dumps({"step": step, "row": row, "tokens": ids.tolist(), "text": text}) + "\n")
                if args.chars:
                    print(f"step {step} row {row}: {text[:args.chars]!r}")
    if out is not None:
        out.flush()
        print(f"wrote {args.npy}: int32 {list(out.shape)}")
    if lines:
        print(f"wrote {args.json}: {len(steps) * len(rows)} rows")


if __name__ == "__main__":
    main()
