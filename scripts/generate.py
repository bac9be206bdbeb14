"""Generate text from a GPT-NeoX model with a KV cache (logic in neox_jax/generate.py).

    python scripts/generate.py --hf DIR --prompt "The capital of France is" --max_new_tokens 32
    python scripts/generate.py --checkpoint PARAMS_DIR --prompt_file prompts.jsonl --output out.jsonl \
        --temperature 0.8 --top_p 0.95 --seed 1

A single prompt streams to the console as it is generated; several are batched and printed when all are done.
--output writes one JSON object per prompt: prompt, completion, tokens, finish_reason. An empty prompt starts from
the end-of-document token (unconditional samples, as GPT-NeoX's). Exit status: 0 done, 2 bad flag, prompt or model
files, or a prompt longer than the model's context (one FATAL: line on stderr).
"""

import json
import sys

from neox_jax import cli, errors, sharding, weights
from neox_jax import generate as G
from neox_jax.config import DTYPES


def parse(argv):
    p = cli.Parser(description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="HF GPTNeoXForCausalLM directory")
    source.add_argument("--checkpoint", help="neox_jax params dir (config.json + params.safetensors) or training workdir")
    p.add_argument("--tokenizer", help="tokenizer file (default: the model's own: the HF dir's "
                   "tokenizer.json, the data.tokenizer of the run that wrote a params dir or workdir, else the 20B "
                   "tokenizer)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt_file", help=".txt (one prompt per line) or .jsonl ({\"prompt\": ...} per line)")
    p.add_argument("--output", help="JSONL file for the completions")
    cli.add_overwrite(p, "--output")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop_token_id", type=int, action="append", default=[], help="stop token id (repeatable)")
    p.add_argument("--ignore_eod", action="store_true", help="don't stop at the end-of-document token")
    p.add_argument("--batch_size", type=cli.positive_int, default=8)
    p.add_argument("--dtype", choices=DTYPES, help="compute/param dtype (default: as stored)")
    p.add_argument("--tensor_parallel", type=cli.positive_int, default=1,
                   help="split the weights over this many devices")
    args = p.parse_args(argv)
    if not args.prompt and not args.prompt_file:
        p.error("give --prompt (repeatable) or --prompt_file")
    return args


@errors.guarded
def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    cli.check_writable(args.output, "--output", args.overwrite)  # before the model is loaded and run
    prompts = args.prompt + (G.read_prompts(args.prompt_file) if args.prompt_file else [])
    m, params = weights.load_model(hf=args.hf, checkpoint=args.checkpoint, dtype=args.dtype)
    tokenizer = weights.tokenizer_for(m, args.tokenizer, hf=args.hf, checkpoint=args.checkpoint)
    sampling = G.Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop),
                          stop_token_ids=tuple(args.stop_token_id) + (() if args.ignore_eod else (tokenizer.eod_id,)))
    # an empty prompt is conditioned on the end-of-document token alone, as a document's first token is
    ids = [tokenizer.encode(p) or [tokenizer.eod_id] for p in prompts]
    generator = G.Generator(m, params, vocab_limit=tokenizer.vocab_size, mesh=sharding.inference_mesh(args.tensor_parallel))
    del params  # the generator keeps its own per-layer copy
    generator.check(ids, sampling, tokenizer.decode)  # before the prompt is echoed
    stream = len(prompts) == 1
    if stream:
        print(prompts[0], end="", flush=True)
    completions = generator.generate(
        ids, sampling, decode=tokenizer.decode, batch_size=args.batch_size,
        on_text=(lambda row, text: print(text, end="", flush=True)) if stream else None)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    for i, (prompt, c) in enumerate(zip(prompts, completions)):
        if stream:
            print()
        else:
            print(f"--- [{i}] {prompt}{c.text}")
        if out:
            out.write(json.dumps({"prompt": prompt, "completion": c.text, "tokens": c.tokens,
                                  "finish_reason": c.finish_reason}) + "\n")
    if out:
        out.close()
        print(f"wrote {len(completions)} completions to {args.output}")


if __name__ == "__main__":
    main()
