"""Convert GPT-NeoX weights between HF `GPTNeoXForCausalLM` directories and neox_jax params dirs.

    python scripts/convert_hf.py --hf_dir PATH --out PARAMS_DIR        # HF -> params dir
    python scripts/convert_hf.py --params_dir PARAMS_DIR --hf_out PATH  # params dir (or workdir) -> HF

An output directory that is not empty is refused unless --overwrite. The logic lives in neox_jax/convert.py (the HF
mapping) and neox_jax/weights.py (params dirs, training workdirs).
Exit status: 0 written, 2 bad flag or input (one FATAL: line on stderr).
"""

import sys

from neox_jax import cli, convert, errors, weights
from neox_jax.config import DTYPES


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("--hf_dir", help="HF GPTNeoXForCausalLM directory to read (with --out)")
    p.add_argument("--out", help="params dir to write (config.json + params.safetensors)")
    p.add_argument("--params_dir", help="params dir or training workdir (latest checkpoint) to read (with --hf_out)")
    p.add_argument("--hf_out", help="HF directory to write")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="tensor dtype of the HF output (default float32)")
    p.add_argument("--max_shard_gb", type=float, default=4.0, help="largest HF safetensors shard, GiB")
    p.add_argument("--overwrite", action="store_true", help="write into an output directory that is not empty")
    args = p.parse_args(argv)
    to_params, to_hf = bool(args.hf_dir and args.out), bool(args.params_dir and args.hf_out)
    if to_params == to_hf or (args.hf_dir or args.out) and (args.params_dir or args.hf_out):
        p.error("give either --hf_dir and --out, or --params_dir and --hf_out")
    return args


@errors.guarded
def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    convert.output_dir(args.out or args.hf_out, args.overwrite, create=False)  # before a long read
    if args.hf_dir:
        config, params = convert.load_hf(args.hf_dir)
        weights.save_params(config, params, args.out, overwrite=args.overwrite)
        where = args.out
    else:
        config, params = weights.load(args.params_dir, "--params_dir")
        files = convert.save_hf(config, params, args.hf_out, dtype=args.dtype,
                                max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
        where = f"{args.hf_out} ({len(files)} safetensors file{'s' if len(files) > 1 else ''}, {args.dtype})"
    print(f"wrote {where}\n{weights.describe(config, params)}")


if __name__ == "__main__":
    main()
