"""What a run costs before it runs: tokens, FLOPs, wall time, device-hours, energy and CO2e of a config on N devices.

The model is a few lines of arithmetic, stated here once:
  tokens        = train.steps x train.batch_size x train.seq_len
  FLOPs         = tokens x (6 N + 12 L H S)    (metrics.flops_per_token: the convention of every MFU in this project)
  wall time     = FLOPs / (devices x peak x MFU)    peak: the datasheet dense bf16 rate (metrics.PEAK_TFLOPS)
  device-hours  = devices x wall time
  energy        = device-hours x rated power (energy.RATED_WATTS) x utilisation x PUE
  CO2e          = energy x the grid's carbon intensity (energy.grid_intensity: the config's energy.* fields)
The MFU is given, derived from an achieved TFLOP/s per device (MFU = achieved / peak), or read from a benchmark
JSON (`scripts/benchmark.py train --json`). Energy counts the accelerators only (no hosts, network or cooling
beyond the PUE); utilisation 1 means every device draws its rated power for the whole run, an upper bound.
"""

from __future__ import annotations

import dataclasses
import json

from neox_jax import config as cfg
from neox_jax import energy as energy_lib
from neox_jax import errors
from neox_jax import metrics
from neox_jax import sweep as sweep_lib
from neox_jax import table


class PlanError(errors.InputError):
    """A planner input is missing or unusable; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class RunPlan:
    name: str
    device: str
    devices: int
    params: int
    tokens_per_step: int
    steps: int
    tokens: float
    flops_per_token: float
    flops: float
    peak_tflops: float
    mfu: float
    tflops_per_device: float  # achieved model FLOP/s per device
    wall_days: float
    device_hours: float
    watts: float
    utilisation: float
    pue: float
    energy_kwh: float
    carbon_intensity: float  # g CO2e per kWh
    co2e_kg: float


def mfu_from_benchmark(path: str) -> tuple[float, str]:
    """The datasheet-peak MFU of the first neox_jax row of a `scripts/benchmark.py train --json` file, and what it
    was measured on."""
    try:
        with open(path) as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"--benchmark {path}: cannot read it as benchmark JSON ({e})") from None
    ours = [r for r in rows if isinstance(r, dict) and str(r.get("impl", "")).startswith("neox_jax")] \
        if isinstance(rows, list) else []
    if not ours:
        raise PlanError(f"--benchmark {path}: no neox_jax row (expected the rows `scripts/benchmark.py train --json` "
                        "writes)")
    row = ours[0]
    if not row.get("mfu_datasheet_peak"):
        raise PlanError(f"--benchmark {path}: row {row.get('name')!r} has no MFU ({row.get('device')!r} has no "
                        "datasheet peak); give --mfu or --tflops instead")
    return float(row["mfu_datasheet_peak"]), f"{row.get('name')} on {row.get('n_devices')} x {row.get('device')}"


def estimate(config, device: str, devices: int, *, mfu: float | None = None, tflops: float | None = None,
             peak_tflops: float | None = None, watts: float | None = None, utilisation: float = 1.0,
             pue: float | None = None, carbon_intensity: float | None = None, steps: int | None = None,
             name: str = "") -> RunPlan:
    """The cost of training `config` on `devices` devices of kind `device` at an MFU given directly or as achieved
    TFLOP/s per device. `peak_tflops` / `watts` override the tables; `pue` / `carbon_intensity` the config."""
    if devices < 1:
        raise PlanError(f"--devices must be at least 1, got {devices}")
    if (mfu is None) == (tflops is None):
        raise PlanError("give exactly one of --mfu, --tflops or --benchmark")
    # 0 W or 0 TFLOP/s would fall back to the tables in silence (and a negative one give negative energy or time)
    for flag, value, ok, expected in (("--utilisation", utilisation, 0 < utilisation <= 1, "in (0, 1]"),
                                      ("--steps", steps, steps is None or steps >= 1, "at least 1"),
                                      ("--watts", watts, watts is None or watts > 0,
                                       "> 0 W (leave it out for the device's rated power)"),
                                      ("--peak_tflops", peak_tflops, peak_tflops is None or peak_tflops > 0,
                                       "> 0 (leave it out for the device's datasheet peak)"),
                                      ("--pue", pue, pue is None or pue >= 1, "at least 1"),
                                      ("--carbon_intensity", carbon_intensity,
                                       carbon_intensity is None or carbon_intensity >= 0, ">= 0 g CO2e/kWh")):
        if not ok:
            raise PlanError(f"{flag} must be {expected}, got {value}")
    peak = peak_tflops or metrics.device_peak_tflops(device)
    if not peak:
        raise PlanError(f"--device {device!r}: no datasheet peak known (table: "
                        f"{', '.join(n for n, _ in metrics.PEAK_TFLOPS)}); give --peak_tflops")
    mfu = tflops / peak if mfu is None else mfu
    if not 0 < mfu <= 1:
        raise PlanError(f"MFU must be in (0, 1], got {mfu:.4g}" + (f" ({tflops} TFLOP/s of a {peak} peak)"
                                                                    if tflops is not None else ""))
    rated = watts or metrics.by_device_kind(energy_lib.RATED_WATTS, device)
    if not rated:
        raise PlanError(f"--device {device!r}: no rated power known (table: "
                        f"{', '.join(n for n, _ in energy_lib.RATED_WATTS)}); give --watts")
    cfg.validate(config)
    t = config.train
    model = cfg.resolve_model(config)
    steps = steps or t.steps
    tokens = float(steps) * t.batch_size * t.seq_len
    fpt = metrics.flops_per_token(model, t.seq_len, tensor_parallel=config.mesh.tensor)
    seconds = tokens * fpt / (devices * peak * 1e12 * mfu)
    device_hours = devices * seconds / 3600.0
    pue = config.energy.pue if pue is None else pue
    intensity = energy_lib.grid_intensity(config.energy)[0] if carbon_intensity is None else carbon_intensity
    kwh = device_hours * rated * utilisation * pue / 1000.0
    return RunPlan(name=name, device=device, devices=devices, params=cfg.param_count(model, config.mesh.tensor),
                   tokens_per_step=t.batch_size * t.seq_len, steps=steps, tokens=tokens, flops_per_token=fpt,
                   flops=tokens * fpt, peak_tflops=peak, mfu=mfu, tflops_per_device=mfu * peak,
                   wall_days=seconds / 86400.0, device_hours=device_hours, watts=rated, utilisation=utilisation,
                   pue=pue, energy_kwh=kwh, carbon_intensity=intensity, co2e_kg=kwh * intensity / 1000.0)


def estimate_sweep(path: str, device: str, devices: int, overrides: dict | None = None, **kwargs) -> list[RunPlan]:
    """`estimate` for every run of a sweep file (`overrides` applied on top of each), named as `scripts/sweep.py`
    names their workdirs."""
    try:
        sweep = sweep_lib.load_sweep(path)
        runs = sweep_lib.plan(sweep, "runs")
    except sweep_lib.SweepError as e:
        raise PlanError(str(e)) from None
    spec = sweep_lib.resolve_config(sweep.config, path)
    return [estimate(cfg.from_spec(spec, {**run.overrides, **(overrides or {})}), device, devices, name=run.name,
                     **kwargs) for run in runs]


def _readable(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


_COLUMNS = (
    table.Column("run", "name", align="<"),
    table.Column("devices", lambda p: f"{p['devices']} x {p['device']}", width=11),
    table.Column("params", "params", lambda v: f"{v / 1e9:.3g}B", width=8),
    table.Column("tok/step", "tokens_per_step", ",", width=10), table.Column("steps", "steps", ",", width=8),
    table.Column("tokens", "tokens", ".3g", width=9), table.Column("FLOPs", "flops", ".3g", width=9),
    table.Column("MFU", "mfu", ".1%", width=6), table.Column("TFLOP/s/dev", "tflops_per_device", ".1f"),
    table.Column("days", "wall_days", ".3g", width=8), table.Column("dev-hours", "device_hours", _readable, width=10),
    table.Column("MWh", lambda p: p["energy_kwh"] / 1000, ".3g", width=8),
    table.Column("t CO2e", lambda p: p["co2e_kg"] / 1000, ".3g", width=8))


def format_table(plans: list[RunPlan]) -> str:
    """One row per plan: FLOPs in scientific notation, time in days, energy in MWh, CO2e in tonnes."""
    lines = [table.render(_COLUMNS, as_dicts(plans))]
    if plans:
        p = plans[0]
        lines.append(f"(FLOPs/token 6N + 12LHS; peak {p.peak_tflops:g} TFLOP/s; {p.watts:g} W x utilisation "
                     f"{p.utilisation:g} x PUE {p.pue:g}; {p.carbon_intensity:.0f} g CO2e/kWh)")
    return "\n".join(lines)


def as_dicts(plans: list[RunPlan]) -> list[dict]:
    return [dataclasses.asdict(p) for p in plans]
