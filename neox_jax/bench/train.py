"""Train-step throughput of neox_jax (and, on request, HF torch on the identical shape in the same run)."""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np

from neox_jax import config as cfg
from neox_jax import metrics, setup, sharding, table
from neox_jax import train as train_lib
from neox_jax.bench import device, timing, torch_ref

# The named shapes of `--preset NAME`: a config file like the others (each preset is the spec configs/bench.py:NAME).
PRESETS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                            "bench.py")
PROFILE_STEPS = 2


def presets():
    """configs/bench.py: its PRESETS (name: config file and overrides) and GROUPS (name: presets, one row each)."""
    return cfg.import_file(PRESETS_FILE, "_neox_bench_")


def preset_spec(name: str) -> str:
    """The config spec of the preset `name`."""
    return f"{PRESETS_FILE}:{name}"


def random_token_step(config):
    """(train state, compiled train step, one global batch of random tokens) for `config` on this host's devices
    (on one device, whatever mesh the config asks for)."""
    if jax.device_count() == 1:
        config = cfg.override(config, {"mesh.data": -1, "mesh.fsdp": 1, "mesh.tensor": 1})
    mesh = sharding.make_mesh(config)
    run = setup.build(config, mesh)
    t = config.train
    state = train_lib.init_train_state(run, jax.random.PRNGKey(0))
    step = train_lib.make_train_step(run)
    shape = (t.batch_size, t.seq_len + 1)
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, shape, dtype=np.int32)
    return state, step, sharding.global_batch({"tokens": tokens}, mesh)


def jax_train_throughput(config, steps: int = 10, warmup: int = 2, windows: int = 3,
                         profile_dir: str | None = None) -> dict:
    """Tokens/s, step time (best of `windows` runs of `steps` steps) and peak memory of the compiled neox_jax
    train step on random tokens; with `profile_dir`, then a `jax.profiler` trace of PROFILE_STEPS more steps."""
    t = config.train
    state, step, batch = random_token_step(config)
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}
    del state

    def one_step():
        holder["state"], metrics = step(holder["state"], batch)
        return metrics

    dt = timing.best_window(one_step, jax.block_until_ready, steps, windows)
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            jax.block_until_ready([one_step() for _ in range(PROFILE_STEPS)])
    out = {"step_time": dt, "tokens_per_s": t.batch_size * t.seq_len / dt, "warmup_s": compile_s}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_mem_gb"] = stats["peak_bytes_in_use"] / 2**30
    del holder
    return out


def run(preset: str | None = None, config_spec: str | None = None, overrides: dict | None = None,
        steps: int = 10, warmup: int = 2, windows: int = 3, compare_hf: bool = False, torch_compile: bool = False,
        measure_peak: bool = True, variants: list[dict] | None = None, profile_dir: str | None = None) -> list[dict]:
    """Benchmark one preset, the GPU anchor pair (preset="gpu-anchor"), or a config spec; rows for a table.
    `variants`: extra override sets, each timed as one more neox_jax row of the same shape (one process, so
    a row's peak memory is the largest of the rows so far). `profile_dir`: trace the first neox_jax row's step
    there (one subdirectory per shape)."""
    names = presets().GROUPS.get(preset, [preset]) if preset else []
    jobs = [(n, preset_spec(n)) for n in names] or [(config_spec, config_spec)]
    backend = jax.default_backend()
    peak_measured = None
    if measure_peak and backend != "cpu":
        peak_measured = device.matmul_tflops()
    peak_sheet = metrics.device_peak_tflops()
    rows = []
    for name, spec in jobs:
        # every variant's config is built (and validated) before anything is timed
        override_sets = [{}, *(variants or [])]
        configs = [cfg.from_spec(spec, {**(overrides or {}), **v}) for v in override_sets]
        config = configs[0]
        m, t = cfg.resolve_model(config), config.train
        fpt = metrics.flops_per_token(m, t.seq_len)
        n_dev = jax.device_count()

        def row(impl, res):
            r = {"name": name, "impl": impl, "device": jax.devices()[0].device_kind, "n_devices": n_dev,
                 "batch": t.batch_size, "seq_len": t.seq_len, "dtype": m.dtype, "params": cfg.param_count(m), **res}
            r["mfu_measured_peak"] = metrics.mfu(res["tokens_per_s"], fpt, n_dev, peak_measured)
            r["mfu_datasheet_peak"] = metrics.mfu(res["tokens_per_s"], fpt, n_dev, peak_sheet)
            r["peak_tflops_measured"] = peak_measured
            return r

        # HF first, each in its own process: once this process's JAX allocator has grown it keeps the memory
        hf_rows = []
        if compare_hf:
            bf16 = backend == "gpu" and m.dtype == "bfloat16"
            for impl, compiled in (("hf_torch_eager", False), ("hf_torch_compile", True))[:2 if torch_compile else 1]:
                res = torch_ref.run_isolated("train", m, batch=t.batch_size, seq_len=t.seq_len, steps=steps,
                                             warmup=warmup, windows=windows, compile=compiled, bf16=bf16)
                if "error" in res:
                    print(res["error"], file=sys.stderr, flush=True)
                    continue
                hf_rows.append(row(impl, res))
                timing.progress(hf_rows[-1])
        ours = []
        for i, (variant, vconfig) in enumerate(zip(override_sets, configs)):
            label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in variant.items())
            trace = profile_subdir(profile_dir, name) if profile_dir and i == 0 else None
            timing.starting(f"{name} neox_jax{f'[{label}]' if label else ''}")
            ours.append(row("neox_jax" + (f"[{label}]" if label else ""),
                            jax_train_throughput(vconfig, steps, warmup, windows, trace)))
            timing.progress(ours[-1])
        group = [*ours, *hf_rows]
        eager = [r for r in hf_rows if r["impl"] == "hf_torch_eager"]
        for r in group:
            r["vs_hf_eager"] = r["tokens_per_s"] / eager[0]["tokens_per_s"] if eager else None
        rows.extend(group)
    return rows


def profile_subdir(profile_dir: str, name: str) -> str:
    """Where `run(profile_dir=...)` traces the shape `name` (a preset or config spec)."""
    return f"{profile_dir}/" + "".join(c if c.isalnum() or c in "-." else "_" for c in name)


# "-" where there is no figure: no peak to divide by, no memory_stats (CPU), no HF row
_COLUMNS = (table.Column("name", "name", align="<", width=10), table.Column("impl", "impl", align="<", width=17),
            table.Column("device", "device", lambda d: d[:18], align="<", width=18),
            table.Column("batch", "batch", width=5), table.Column("seq", "seq_len", width=5),
            table.Column("tok/s", "tokens_per_s", ",.0f", width=11),
            table.Column("step s", "step_time", ".4f", width=8),
            table.Column("MFU(meas)", "mfu_measured_peak", timing.share),
            table.Column("MFU(sheet)", "mfu_datasheet_peak", timing.share),
            table.Column("mem GB", "peak_mem_gb", ".1f", width=7), table.Column("vs HF", "vs_hf_eager", ".2f", width=6))


def format_rows(rows: list[dict]) -> str:
    return table.render(_COLUMNS, rows)
