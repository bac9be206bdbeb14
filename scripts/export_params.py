#!/usr/bin/env python
"""Export the parameters of a training workdir's checkpoint as a params dir (config.json + params.safetensors).

    python scripts/export_params.py --workdir runs/tiny --out runs/tiny_params            # latest checkpoint
    python scripts/export_params.py --workdir runs/tiny --step 400 --out runs/tiny_400

The params dir is what scripts/evaluate.py and scripts/generate.py take with --checkpoint, and what
scripts/convert_hf.py --params_dir turns into a HF GPTNeoXForCausalLM directory. Only the parameters are read
from the checkpoint (no optimizer state); the run config comes from the checkpoint itself. A non-empty --out is
refused unless --overwrite. Exit status: 0 written, 2 bad flag or input, 1 no intact checkpoint (one FATAL: line).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, convert, errors, weights  # noqa: E402


@errors.guarded
def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/)")
    p.add_argument("--out", required=True, help="params dir to write")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest intact one)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out directory that is not empty")
    args = p.parse_args(argv)
    convert.output_dir(args.out, args.overwrite, create=False)  # before reading the checkpoint
    config, params = weights.load_workdir_params(args.workdir, args.step)
    weights.save_params(config, params, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}\n{weights.describe(config, params)}")


if __name__ == "__main__":
    main()
