"""The reference we race: HF transformers' GPTNeoXForCausalLM in PyTorch on the identical shape.

GPU: fp32 master weights, bf16 autocast, SDPA attention, fused AdamW, grad clipping; eager or torch.compile.
CPU: plain fp32 (autocast to bf16 is slower than fp32 on most CPUs). Imported only by benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from neox_jax import convert
from neox_jax.bench import timing


def transformers_config(m):
    """The transformers GPTNeoXConfig of model config `m`: the config.json `convert.save_hf` writes."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**convert.hf_config(m))


def train_throughput(m, batch: int, seq_len: int, steps: int = 10, warmup: int = 3, windows: int = 3,
                     compile: bool = False, bf16: bool | None = None, lr: float = 1e-4) -> dict:
    """Tokens/s and step time (timed as neox_jax's: best window) of an HF torch train step (forward, backward,
    clip, AdamW)."""
    import torch
    from transformers import GPTNeoXForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bf16 = cuda if bf16 is None else bf16
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM._from_config(transformers_config(m), attn_implementation="sdpa").to(device)
    model.train()
    params = list(model.parameters())
    if compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01,
                            fused=cuda)
    ids = torch.randint(0, m.vocab_size, (batch, seq_len), device=device)

    def step():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dt = timing.best_window(step, lambda loss: sync(), steps, windows)
    out = {"step_time": dt, "tokens_per_s": batch * seq_len / dt}
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return out


def generate_throughput(m, batch: int, prompt_len: int, new_tokens: int, dtype: str = "bfloat16") -> dict:
    """HF `generate` (greedy, KV cache) decode tokens/s on random weights, timed after one warm-up call."""
    import torch
    from transformers import GPTNeoXForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tdtype = getattr(torch, dtype) if cuda else torch.float32
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM._from_config(transformers_config(m), attn_implementation="sdpa", dtype=tdtype).to(device).eval()
    ids = torch.randint(0, m.vocab_size, (batch, prompt_len), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kw = dict(do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        sync()
        t0 = time.perf_counter()
        model(ids)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        sync()
        total = time.perf_counter() - t0
    decode = max(total - prefill, 1e-9)
    del model
    return {"prefill_tokens_per_s": batch * prompt_len / prefill, "decode_tokens_per_s": batch * new_tokens / decode,
            "decode_steps_per_s": new_tokens / decode}


def run_isolated(kind: str, m, **kwargs) -> dict:
    """Run `train_throughput` / `generate_throughput` in a fresh Python process, so PyTorch gets the device
    memory that this process's JAX allocator holds (and the timing is not shared with JAX's threads)."""
    request = json.dumps({"kind": kind, "model": m.to_dict(), "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "neox_jax.bench.torch_ref", request], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("result ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"HF torch {kind} failed (exit {proc.returncode}): " + " | ".join(tail)}
    return json.loads(lines[-1][len("result "):])


if __name__ == "__main__":
    import ml_collections

    req = json.loads(sys.argv[1])
    model_cfg = ml_collections.ConfigDict(req["model"])
    fn = {"train": train_throughput, "generate": generate_throughput}[req["kind"]]
    print("result " + json.dumps(fn(model_cfg, **req["kwargs"])), flush=True)
