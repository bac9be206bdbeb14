#!/usr/bin/env python
"""Train a sentencepiece BPE tokenizer on Pile-format text (EOD = id 0, padding = 1, byte fallback).

  python scripts/train_tokenizer.py neox_jax/assets/train.jsonl.zst --vocab-size 8000 \
      --output-prefix runs/tok/pile8k      # writes runs/tok/pile8k.model and .vocab
"""


from neox_jax import cli, errors, files
from neox_jax.data.tokenizer import train_sentencepiece


@errors.guarded
def main(argv=None):
    p = cli.Parser(description=__doc__)
    p.add_argument("inputs", nargs="+", help="Pile-format files or globs")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--max-docs", type=int, default=None, help="train on the first N documents only")
    p.add_argument("--skip-bad", action="store_true")
    cli.add_overwrite(p, "--output-prefix")
    args = p.parse_args(argv)
    # its folder is made if missing: only an existing file is refused, before the training
    files.check_new([args.output_prefix + ext for ext in (".model", ".vocab")], "--output-prefix", args.overwrite)
    path = train_sentencepiece(args.inputs, args.output_prefix, args.vocab_size, model_type=args.model_type,
                               max_docs=args.max_docs, skip_bad=args.skip_bad)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
