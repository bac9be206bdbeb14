"""What energy tracking costs a training step, and the energy per token it measures.

Interleaved A/B on one compiled step: windows of `steps` train steps alternate between tracking off and on in
ABBA order (so a drift in the shared host's load falls on both arms alike), `pairs` times. Each window runs the
trainer's own loop shape: every step's metrics are fetched (as `trainer.StepLog` does) and, with tracking on,
every `train.log_every` steps a log line reads `RunEnergy.window()`; the meter samples on its thread throughout.
The overhead is the median over pairs of (on - off) / off, in wall time per step and in this process's CPU time
per step (all its threads; less sensitive to other processes on a shared host). The direct costs (a sample, the
monitor codecarbon runs every second, a window read; timed on this thread) give a bound that no host noise
touches: the CPU time tracking adds per second of training, over the step's CPU time per second.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import numpy as np

from neox_jax import energy as energy_lib
from neox_jax.bench.train import random_token_step
from neox_jax.config import from_spec


def _window(step, state, batch, steps: int, log_every: int, run) -> tuple:
    t0, c0 = time.perf_counter(), time.process_time()
    kwh = 0.0
    for i in range(1, steps + 1):
        state, metrics = step(state, batch)
        jax.device_get(metrics)
        if run is not None and i % log_every == 0:
            kwh += run.window()["energy_kwh"]
    return state, time.perf_counter() - t0, time.process_time() - c0, kwh


def _direct_costs(config, workdir: str, n: int = 50) -> dict:
    """Milliseconds per meter sample and per window read, timed here (the thread does the same work)."""
    run = energy_lib.RunEnergy(config, workdir)
    meter = run._meter
    deadline = time.time() + 60
    while not meter.sources and time.time() < deadline:
        time.sleep(0.01)
    out = {"backend": meter.backend, "sources": dict(meter.sources)}
    if meter._tracker is not None:
        t0 = time.perf_counter()
        for _ in range(n):
            meter._tracker._measure_power_and_energy()
            meter._publish()
        out["sample_ms"] = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        for _ in range(n):
            meter._tracker._monitor_power()  # codecarbon's own 1 s thread: utilisation and power samples
        out["monitor_ms"] = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        run.window()
    out["window_ms"] = (time.perf_counter() - t0) / n * 1e3
    run.close()
    return out


def overhead(config_spec: str = "configs/tiny.py", overrides: dict | None = None, steps: int = 50, pairs: int = 6,
             warmup: int = 3) -> dict:
    """Step time with energy tracking off and on, interleaved; see the module docstring."""
    config = from_spec(config_spec, {"energy.track": True, **(overrides or {})})
    t = config.train
    state, step, batch = random_token_step(config)
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = {"off": [], "on": []}
    cpu = {"off": [], "on": []}
    kwh = 0.0
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as workdir:
        for pair in range(pairs):
            for arm in (("off", "on") if pair % 2 == 0 else ("on", "off")):
                run = None
                if arm == "on":
                    run = energy_lib.RunEnergy(config, workdir)
                    while not run._meter.sources:  # started: the start-up is not part of a step
                        time.sleep(0.01)
                    run.window()
                state, seconds, cpu_seconds, window_kwh = _window(step, state, batch, steps, t.log_every, run)
                times[arm].append(seconds / steps)
                cpu[arm].append(cpu_seconds / steps)
                if run is not None:
                    run.stop()
                    kwh += window_kwh + run.window()["energy_kwh"]  # up to the last step, as the trainer's last line
                    run.close()
        direct = _direct_costs(config, workdir)
    rel = [(on - off) / off for off, on in zip(times["off"], times["on"])]
    rel_cpu = [(on - off) / off for off, on in zip(cpu["off"], cpu["on"])]
    tokens_on = pairs * steps * t.batch_size * t.seq_len
    step_cpu = statistics.median(cpu["off"])
    # CPU ms tracking adds per second of training, over the CPU ms the steps take in that second
    added_ms = direct.get("sample_ms", 0) / config.energy.sample_secs + direct.get("monitor_ms", 0) \
        + direct["window_ms"] / (t.log_every * statistics.median(times["off"]))
    bound = added_ms / (1e3 * step_cpu / statistics.median(times["off"]))
    return {"config": config_spec, "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
            "steps_per_window": steps, "pairs": pairs, "log_every": t.log_every,
            "sample_secs": config.energy.sample_secs, "step_time_off": times["off"], "step_time_on": times["on"],
            "overhead_median": statistics.median(rel), "overhead_mean": float(np.mean(rel)),
            "overhead_std": float(np.std(rel)), "overhead_best": min(times["on"]) / min(times["off"]) - 1,
            "cpu_time_off": cpu["off"], "cpu_time_on": cpu["on"], "cpu_overhead_median": statistics.median(rel_cpu),
            "direct_cost_bound": bound,
            "joules_per_token": kwh * 3.6e6 / tokens_on, **direct,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def format_result(r: dict) -> str:
    pct = lambda v: f"{v:+.2%}"  # noqa: E731
    lines = [
        f"{r['config']} on {r['n_devices']} x {r['device']}: {r['pairs']} ABBA pairs of {r['steps_per_window']} steps, "
        f"log line every {r['log_every']}, meter sample every {r['sample_secs']:g} s ({r['backend']})",
        f"step time off: median {statistics.median(r['step_time_off']):.4f} s  "
        f"[{', '.join(f'{v:.4f}' for v in r['step_time_off'])}]",
        f"step time on:  median {statistics.median(r['step_time_on']):.4f} s  "
        f"[{', '.join(f'{v:.4f}' for v in r['step_time_on'])}]",
        f"overhead (wall): median of pairs {pct(r['overhead_median'])}, mean {pct(r['overhead_mean'])} "
        f"+- {r['overhead_std']:.2%}, best window vs best window {pct(r['overhead_best'])}",
        f"overhead (process CPU time per step, off median {statistics.median(r['cpu_time_off']):.4f} s): "
        f"median of pairs {pct(r['cpu_overhead_median'])}",
        f"direct cost: one sample {r.get('sample_ms', float('nan')):.3f} ms every {r['sample_secs']:g} s, "
        f"codecarbon's monitor {r.get('monitor_ms', float('nan')):.3f} ms every 1 s, "
        f"one log-line read {r['window_ms']:.3f} ms: at most {r['direct_cost_bound']:.3%} of the steps' CPU time",
        f"energy per token (tracked windows; {', '.join(f'{k} {v}' for k, v in r['sources'].items())}): "
        f"{r['joules_per_token']:.4g} J",
        f"load average before {', '.join(f'{v:.2f}' for v in r['loadavg_before'])}; "
        f"after {', '.join(f'{v:.2f}' for v in r['loadavg_after'])}",
    ]
    return "\n".join(lines)
