"""Generation throughput: prefill and KV-cache decode tokens/s against the memory-bandwidth roofline.

Decode of one token per row must read every weight and the filled part of the cache once per step, so
steps/s <= bandwidth / (bytes read per step). The bytes are the params less the input embedding table (a step
gathers one row of it per sequence, not the table) plus the mean filled KV cache. We report the measured
fraction of that bound; a fraction above 1 means the bound does not hold on this device (weights served from a
CPU's cache), and is shown as "-". HF rows have no roofline: their decode time is the difference of two timed
`generate` calls, not the decode loop alone.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from neox_jax import config as cfg
from neox_jax import errors
from neox_jax import generate as gen_lib
from neox_jax import model as model_lib
from neox_jax import table
from neox_jax.bench import device, timing, torch_ref


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def jax_generate_throughput(m, batch: int, prompt_len: int, new_tokens: int, bandwidth_gbs: float | None,
                            stacked: bool = True) -> dict:
    params = jax.jit(lambda k: jax.tree.map(lambda p: p.astype(m.dtype), model_lib.init_params(m, k)))(
        jax.random.PRNGKey(0))
    gen = gen_lib.Generator(m, params, stacked=stacked)
    params = gen.params
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, m.vocab_size, (batch, prompt_len)), jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    max_len = prompt_len + new_tokens
    key = jax.random.PRNGKey(0)

    def prefill():
        return gen._prefill(params, ids, mask, gen.init_cache(batch, max_len))

    prefilled = _timed(prefill)[0]  # compile; the loop does not donate its cache, so one prefill serves every run
    prefill_s = min(_timed(prefill)[1] for _ in range(3))

    def decode():  # the decode loop alone: a difference of two timings was noise for a few new tokens
        logits, cache, positions = prefilled
        return gen._loop(params, logits, positions, cache, key, steps=new_tokens, vocab_limit=m.vocab_size,
                         temperature=1.0, top_k=0, top_p=1.0, greedy=True)

    _timed(decode)  # compile
    decode_s = min(_timed(decode)[1] for _ in range(3))
    step_bytes = decode_bytes_per_step(m, params, batch, prompt_len, new_tokens)
    out = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
           "prefill_tokens_per_s": batch * prompt_len / prefill_s,
           "decode_tokens_per_s": batch * new_tokens / decode_s, "decode_steps_per_s": new_tokens / decode_s,
           "bytes_per_step_gb": step_bytes / 1e9}
    if bandwidth_gbs:
        out["roofline_steps_per_s"] = roofline_steps_per_s(step_bytes, bandwidth_gbs)
        out["fraction_of_roofline"] = out["decode_steps_per_s"] / out["roofline_steps_per_s"]
    return out


def decode_bytes_per_step(m, params, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Bytes one decode step reads: every weight but the input embedding table (`batch` rows of it are gathered),
    and the mean filled KV cache (k and v, every layer, the prompt + half the new tokens)."""
    embed = params["embed_in"]
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) - embed.size * embed.dtype.itemsize
    rows = batch * embed.shape[-1] * embed.dtype.itemsize
    kv = 2 * m.num_layers * batch * (prompt_len + new_tokens / 2) * m.hidden_size * jnp.dtype(m.dtype).itemsize
    return weights + rows + kv


def roofline_steps_per_s(bytes_per_step: float, bandwidth_gbs: float) -> float:
    """Decode steps/s if each step only had to read `bytes_per_step` at `bandwidth_gbs` (GB/s, 1e9 bytes)."""
    return bandwidth_gbs * 1e9 / bytes_per_step


# How the decode step walks the layers: the layer scan; the scan fully unrolled (static slices of the stacked
# weights); per-layer weight and cache buffers (Generator(stacked=False)).
LAYER_LOOPS = ("scan", "unrolled", "unstacked")


def run(config_spec: str = "configs/pythia.py:1.4b", batches=(1, 32), prompt_len: int = 128, new_tokens: int = 256,
        dtype: str = "bfloat16", compare_hf: bool = False, layer_loops=("scan", "unstacked")) -> list[dict]:
    """One row per (batch, layer loop), plus HF generate rows."""
    unknown = [loop for loop in layer_loops if loop not in LAYER_LOOPS]
    if unknown:
        raise errors.InputError(f"layer loop {unknown[0]!r}: expected one of {', '.join(LAYER_LOOPS)}")
    m = cfg.resolve_model(cfg.from_spec(config_spec, {"model.dtype": dtype}))
    bandwidth = device.memory_bandwidth_gbs()
    rows = []
    for b in batches:
        for loop in layer_loops:
            mu = m.copy_and_resolve_references()
            mu.scan_unroll = m.num_layers if loop == "unrolled" else 1
            timing.starting(f"generate {config_spec} batch {b} layer loop {loop}")
            r = {"impl": "neox_jax" + ("" if loop == "scan" else "_" + loop), "config": config_spec,
                 "dtype": dtype, "device": jax.devices()[0].device_kind, "bandwidth_gbs": bandwidth,
                 **jax_generate_throughput(mu, b, prompt_len, new_tokens, bandwidth, stacked=loop != "unstacked")}
            rows.append(r)
            timing.progress(r)
        if compare_hf:
            hf = torch_ref.run_isolated("generate", m, batch=b, prompt_len=prompt_len, new_tokens=new_tokens,
                                        dtype=dtype)
            if "error" in hf:
                print(hf["error"], file=sys.stderr, flush=True)
                continue
            rows.append({"impl": "hf_generate", "config": config_spec, "dtype": dtype, "batch": b,
                         "prompt_len": prompt_len, "new_tokens": new_tokens, "device": r["device"], **hf})
    return rows


_COLUMNS = (table.Column("impl", "impl", align="<", width=18), table.Column("batch", "batch", width=5),
            table.Column("prefill tok/s", "prefill_tokens_per_s", ",.0f", width=14),
            table.Column("decode tok/s", "decode_tokens_per_s", ",.0f", width=13),
            table.Column("steps/s", "decode_steps_per_s", ",.1f", width=9),
            table.Column("roofline", "roofline_steps_per_s", ",.0f", width=9),
            table.Column("frac", "fraction_of_roofline", timing.share, width=6))


def format_rows(rows: list[dict]) -> str:
    lines = [table.render(_COLUMNS, rows)]
    if any(r.get("fraction_of_roofline") is not None and r["fraction_of_roofline"] > 1 for r in rows):
        lines.append("frac -: decode beat the measured read rate (weights served from cache); no roofline applies")
    return "\n".join(lines)

