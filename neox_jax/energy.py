"""Energy and carbon of a training run: measured where the hardware reports it, estimated from rated power where it
does not, summed over processes, and read without ever waiting on a meter.

Backend: codecarbon's offline tracker (`codecarbon.OfflineEmissionsTracker`). One maintained library covers every
machine this project runs on with no network: NVML energy counters on NVIDIA GPUs, RAPL on CPUs that expose it,
rated power x load where nothing can be read (CPUs without RAPL, RAM), and an offline table of grid carbon
intensity by country and region. Zeus measures GPUs and RAPL as well, but has no estimate for what it cannot
read (a CPU-only run would report nothing) and takes carbon intensity from an online API.

How a number is made. `RunEnergy` owns one `_Meter` per process. The meter's daemon thread starts codecarbon
(probing the hardware takes a second or two, so it overlaps compilation), then every `energy.sample_secs` asks it
to measure and publishes the running totals as one array (a reference swap). A log line only reads that array, so
the step loop never waits on NVML, RAPL or psutil; the last reading before the final log line is taken after the
last step, so the run's total is exactly the sum of its windows. Carbon is kWh x the grid's intensity (g CO2e per
kWh: `energy.carbon_intensity`, else codecarbon's table for `energy.country` / `energy.region`, else the world
average); codecarbon applies `energy.pue` to every kWh.

Labels. GPU energy read from NVML (its energy counter, or its power readings averaged) and CPU energy read from
RAPL are measured; everything codecarbon derives from rated power (CPU TDP x load, its RAM model) is estimated.
`energy_estimated` is the share of a window's kWh that is estimated. Without codecarbon, or when it fails at start
or later, the meter warns once and continues from its last reading at rated power (`RATED_WATTS` for GPUs,
`energy.cpu_watts` or 4 W a thread for CPUs; RAM is not estimated then), all of it labelled estimated.

Processes. Each process meters its own accelerators (its local devices' NVML indices) and the first process on
each host also counts that host's CPUs and RAM, so nothing is counted twice; every log line sums the processes'
totals with one small all-gather. A resumed run continues the cumulative totals of metrics.jsonl: energy spent on
steps that a crash made the run repeat was spent all the same.

Offline. Nothing is sent or written by codecarbon: no output handler, no HTTP endpoint, no Electricity Maps
token (even if `~/.codecarbon.config` or `CODECARBON_*` variables name one), and the offline tracker never looks
up the machine's location; tests run a tracker with every socket connection refused.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import socket
import threading
import time
import zlib

import numpy as np

from neox_jax import config as cfg
from neox_jax import files
from neox_jax import metrics as metrics_lib

log = logging.getLogger("neox_jax")

KINDS = ("gpu", "cpu", "ram")
# One reading: seconds since the meter started, then cumulative kWh per kind, then the estimated part of the kWh.
SECONDS, ESTIMATED = 0, 1 + len(KINDS)
# Rated board power (W) by device kind, datasheet figures; substring match on jax's device_kind, first hit wins.
RATED_WATTS = (
    ("H200", 700.0),
    ("H100 PCIe", 350.0),  # before the SXM entry: first hit wins
    ("H100", 700.0),
    ("A100", 400.0),
)
WATTS_PER_CPU_THREAD = 4.0  # what codecarbon assumes for a CPU model it does not know
WORLD_INTENSITY = 475.0  # g CO2e/kWh, the world average (IEA 2019) that codecarbon also falls back to
_MEASURED_CPU_MODES = ("intel_rapl", "windows_emi", "intel_power_gadget")
_JOULES_PER_KWH = 3.6e6


def grid_intensity(e) -> tuple[float, str]:
    """g CO2e per kWh of the run's grid, and where the figure comes from (for `config.energy`)."""
    if e.carbon_intensity > 0:
        return float(e.carbon_intensity), "energy.carbon_intensity"
    if e.region and not e.country:
        raise cfg.ConfigError(f"config field energy.region={e.region!r} needs energy.country (e.g. USA, CAN)")
    if not e.country:
        return WORLD_INTENSITY, "world average (IEA 2019); set energy.country for the local grid"
    try:
        from codecarbon.core.emissions import Emissions
        from codecarbon.core.units import Energy
        from codecarbon.external.geography import GeoMetadata
        from codecarbon.input import DataSource
    except ImportError:
        return WORLD_INTENSITY, f"world average (IEA 2019): codecarbon, with {e.country}'s grid, is not installed"
    _quiet_codecarbon()
    data = DataSource()
    countries = data.get_global_energy_mix_data()
    if e.country not in countries:
        near = difflib.get_close_matches(e.country, list(countries), n=3, cutoff=0.5)
        raise cfg.ConfigError(f"config field energy.country: {e.country!r} is not in codecarbon's grid table"
                              + (f"; did you mean {', '.join(near)}?" if near else " (ISO 3166-1 alpha-3 codes)"))
    emissions, one_kwh = Emissions(data), Energy.from_energy(kWh=1.0)
    name = countries[e.country]["country_name"]
    if not e.region:
        return 1000.0 * emissions.get_country_emissions(one_kwh, GeoMetadata(country_iso_code=e.country)), \
            f"codecarbon's table: {name}"
    try:
        kg = emissions.get_region_emissions(one_kwh, GeoMetadata(country_iso_code=e.country, region=e.region.lower()))
    except Exception:  # noqa: BLE001 - codecarbon raises ValueError, KeyError or DataSourceException here
        raise cfg.ConfigError(f"config field energy.region: codecarbon has no grid data for {e.region!r} in "
                              f"{e.country} (it has regions of USA, CAN, CHN, SWE, NOR, FIN)") from None
    return 1000.0 * kg, f"codecarbon's table: {name}, {e.region}"


def rated_watts(device_kinds, cpu_threads: int, cpu_watts: float = 0.0) -> dict[str, float]:
    """Rated power (W) per kind for an estimate: accelerators from `RATED_WATTS` (unknown kinds count 0), CPUs from
    `cpu_watts` or 4 W a thread (0 threads: this process does not count the host)."""
    gpu = sum(metrics_lib.by_device_kind(RATED_WATTS, kind) or 0.0 for kind in device_kinds)
    cpu = (cpu_watts or WATTS_PER_CPU_THREAD * cpu_threads) if cpu_threads else 0.0
    return {"gpu": gpu, "cpu": cpu, "ram": 0.0}


def nvml_indices(local_hardware_ids, environ=None) -> list[str]:
    """NVML ids of this process's GPUs: CUDA ordinals read through CUDA_VISIBLE_DEVICES when it is set (its entries
    are NVML indices or UUIDs, which codecarbon accepts both)."""
    env = os.environ if environ is None else environ
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if visible else str(i) for i in local_hardware_ids]


def _quiet_codecarbon() -> None:
    # its warnings (unknown CPU model, RAPL unreadable, ...) are summed up in this module's sources and warning
    logging.getLogger("codecarbon").setLevel(logging.CRITICAL)


def _open_codecarbon(e, intensity: float, gpu_ids: list[str]):
    """A started offline codecarbon tracker whose measurements this module drives (its own scheduler stopped)."""
    import codecarbon

    _quiet_codecarbon()
    tracker = codecarbon.OfflineEmissionsTracker(
        country_iso_code=e.country or None, region=e.region.lower() or None,
        force_carbon_intensity_g_co2e_kwh=intensity, pue=e.pue, measure_power_secs=e.sample_secs,
        gpu_ids=gpu_ids, force_cpu_power=e.cpu_watts or None, tracking_mode="machine", allow_multiple_runs=True,
        output_methods=[], emissions_endpoint=False, electricitymaps_api_token=False, api_call_interval=-1,
        log_level="critical", project_name="neox_jax")
    tracker.start()
    if getattr(tracker, "_start_time", None) is None:  # codecarbon's start() logs and swallows its own errors
        raise RuntimeError("codecarbon's tracker did not start")
    tracker._scheduler.stop()
    return tracker, f"codecarbon {codecarbon.__version__}"


def _codecarbon_sources(tracker, gpu_ids: list[str], count_host: bool) -> dict[str, str]:
    """Per kind: 'measured (...)', 'estimated (...)' or 'none (...)', from the hardware codecarbon set up."""
    by_type = {type(h).__name__: h for h in tracker._hardware}
    sources = {"gpu": "measured (NVML)" if "GPU" in by_type and gpu_ids else "none (this process drives no GPU)",
               "cpu": "estimated (rated power x load)", "ram": "estimated (codecarbon's RAM model)"}
    cpu = by_type.get("CPU")
    if cpu is not None and cpu._mode in _MEASURED_CPU_MODES:
        sources["cpu"] = f"measured ({cpu._mode})"
    if not count_host:
        sources["cpu"] = sources["ram"] = "none (another process on this host counts it)"
    return sources


class _Meter:
    """This process's cumulative energy, kept current by a daemon thread so that reading it never waits."""

    def __init__(self, e, intensity: float, gpu_ids: list[str], rated: dict[str, float], count_host: bool,
                 clock=time.perf_counter):
        self._e, self._intensity, self._gpu_ids, self._rated = e, intensity, gpu_ids, rated
        self._count_host, self._clock = count_host, clock
        self._t0 = clock()
        self._latest = np.zeros(2 + len(KINDS))  # published whole: readers never see a half-updated reading
        self._degraded = False
        self._final = None
        self._tracker = None
        self.backend, self.sources = "starting", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="neox-energy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._tracker, self.backend = _open_codecarbon(self._e, self._intensity, self._gpu_ids)
            self.sources = _codecarbon_sources(self._tracker, self._gpu_ids, self._count_host)
            self._publish()
            while not self._stop.wait(self._e.sample_secs):
                self._tracker._measure_power_and_energy()
                self._publish()
        except Exception as err:  # noqa: BLE001 - metering must never stop training
            self._degrade(err)

    def _publish(self) -> None:
        t = self._tracker
        kwh = {"gpu": t._total_gpu_energy.kWh, "cpu": t._total_cpu_energy.kWh, "ram": t._total_ram_energy.kWh}
        if not self._count_host:
            kwh["cpu"] = kwh["ram"] = 0.0
        estimated = sum(kwh[k] for k in KINDS if self.sources[k].startswith("estimated"))
        self._latest = np.array([t._last_measured_time - self._t0, *(kwh[k] for k in KINDS), estimated])

    def _degrade(self, err: BaseException) -> None:
        self._base = self._latest
        self._degraded = True
        if self._tracker is not None:  # its own 1 s monitor thread would otherwise outlive the run
            try:
                self._tracker.stop()
            except Exception:  # noqa: BLE001
                pass
        why = "codecarbon is not installed" if isinstance(err, ImportError) else \
            f"codecarbon failed ({type(err).__name__}: {err})"
        self.backend = f"rated power ({why})"
        self.sources = {k: f"estimated ({w:g} W rated)" if w else "none (no rated power known)"
                        for k, w in self._rated.items()}
        log.warning("energy: %s; from now on energy is estimated from rated power (%s) and labelled estimated",
                    why, ", ".join(f"{k} {w:g} W" for k, w in self._rated.items() if w) or "none known")

    def read(self) -> np.ndarray:
        """[seconds, kWh per kind, estimated kWh] since the meter started; never waits on a measurement."""
        if self._final is not None:
            return self._final
        if not self._degraded:
            return self._latest
        seconds = self._clock() - self._t0
        joules = np.array([self._rated[k] for k in KINDS]) * (seconds - self._base[SECONDS]) * self._e.pue
        added = joules / _JOULES_PER_KWH
        return np.array([seconds, *(self._base[1:ESTIMATED] + added), self._base[ESTIMATED] + added.sum()])

    def stop(self) -> None:
        """Stop sampling and take the final reading (idempotent)."""
        self._stop.set()
        self._thread.join()
        if self._tracker is not None and not self._degraded:
            try:
                self._tracker._measure_power_and_energy()  # up to now (stop() skips it within 50 ms of a sample)
                self._tracker.stop()
                self._publish()
            except Exception as err:  # noqa: BLE001
                self._degrade(err)
            self._tracker = None
        if self._final is None:
            self._final = self.read()


def _first_on_host() -> bool:
    """Whether this process is the first one on its host (it then counts the host's CPUs and RAM)."""
    import jax

    if jax.process_count() == 1:
        return True
    from jax.experimental import multihost_utils

    host = zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF  # fits the int32 the gather uses without x64
    hosts = np.asarray(multihost_utils.process_allgather(np.asarray(host, np.int32))).ravel()
    return int(np.flatnonzero(hosts == host)[0]) == jax.process_index()


def _all_processes(delta: np.ndarray) -> np.ndarray:
    """[processes, delta] on every process (one all-gather of a few floats per log line). Windows travel, not
    totals: the gather is float32 (JAX without x64), exact enough for a window but not for a growing total."""
    import jax

    if jax.process_count() == 1:
        return delta[None]
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(delta.astype(np.float32))
    return np.asarray(gathered, np.float64).reshape(jax.process_count(), -1)


def previous_totals(workdir: str) -> dict[str, float]:
    """The cumulative energy fields of the last metrics.jsonl row that has them (a resumed run continues them)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [r for r in metrics_lib.read_jsonl(path) if "energy_kwh_total" in r]
    return {k: v for k, v in rows[-1].items() if k.endswith("_total")} if rows else {}


class RunEnergy:
    """Energy and carbon of one training run: created before the first step, read by each log line (`window()`),
    stopped before the last one, closed at the end. With `energy.track` false every method does nothing."""

    def __init__(self, config, workdir: str, is_main: bool = True):
        import jax

        e = config.energy
        self.enabled, self.workdir, self.is_main = bool(e.track), workdir, is_main
        if not self.enabled:
            return
        self.intensity, self.intensity_source = grid_intensity(e)
        self.pue = e.pue
        count_host = _first_on_host()
        devices = [d for d in jax.local_devices() if d.platform != "cpu"]
        gpu_ids = nvml_indices([d.local_hardware_id for d in devices if d.platform == "gpu"])
        rated = rated_watts([d.device_kind for d in devices], (os.cpu_count() or 1) if count_host else 0, e.cpu_watts)
        self._meter = _Meter(e, self.intensity, gpu_ids, rated, count_host)
        self._prior = previous_totals(workdir) if is_main else {}
        self._previous = np.zeros(2 + len(KINDS))  # this process's last reading
        self._session = np.zeros(2 + len(KINDS))  # the windows so far, summed over processes (seconds too)
        self._totals: dict[str, float] = {}

    def window(self) -> dict[str, float]:
        """The energy fields of a log line: this window's kWh per kind, average power, CO2e and the estimated share,
        and the run's cumulative totals, summed over processes."""
        if not self.enabled:
            return {}
        reading = self._meter.read()
        delta = _all_processes(reading - self._previous)
        self._previous = reading
        self._session += delta.sum(0)
        kwh = dict(zip(KINDS, delta[:, 1:ESTIMATED].sum(0)))
        window_kwh = sum(kwh.values())
        watts = sum(d[1:ESTIMATED].sum() * _JOULES_PER_KWH / d[SECONDS] for d in delta if d[SECONDS] > 0)
        out = {"energy_kwh": window_kwh, **{f"energy_{k}_kwh": v for k, v in kwh.items()},
               "power_w": watts if (delta[:, SECONDS] > 0).any() else None,
               "co2e_kg": window_kwh * self.intensity / 1000.0,
               "energy_estimated": delta[:, ESTIMATED].sum() / window_kwh if window_kwh > 0 else None}
        cumulative = dict(zip(KINDS, self._session[1:ESTIMATED]))
        self._totals = {
            "energy_kwh_total": sum(cumulative.values()) + self._prior.get("energy_kwh_total", 0.0),
            **{f"energy_{k}_kwh_total": v + self._prior.get(f"energy_{k}_kwh_total", 0.0)
               for k, v in cumulative.items()},
            "co2e_kg_total": sum(cumulative.values()) * self.intensity / 1000.0 + self._prior.get("co2e_kg_total", 0.0),
            "energy_seconds": float(self._session[SECONDS]) / len(delta),
            "energy_estimated_kwh": float(self._session[ESTIMATED])}
        return {**out, **{k: v for k, v in self._totals.items() if k.endswith("_total")}}

    def stop(self) -> None:
        """The final measurement: call it before the last log line so that the run's total is the sum of its
        windows."""
        if self.enabled:
            self._meter.stop()

    def summary(self) -> str:
        """One line for the end of the run (empty before any window was read or when tracking is off)."""
        if not self.enabled or not self._totals:
            return ""
        tot, sources = self._totals, self._meter.sources
        kinds = ", ".join(f"{k} {tot[f'energy_{k}_kwh_total']:.4g} {sources.get(k, '').split(' ')[0]}".rstrip()
                          for k in KINDS if not sources.get(k, "").startswith("none"))
        this_session = sum(tot[f"energy_{k}_kwh_total"] for k in KINDS) - self._prior.get("energy_kwh_total", 0.0)
        seconds = tot["energy_seconds"]
        power = f"avg {this_session * _JOULES_PER_KWH / seconds:,.0f} W over {seconds:,.0f} s" if seconds > 0 else ""
        earlier = f" ({self._prior['energy_kwh_total']:.4g} kWh in earlier sessions)" if self._prior else ""
        return (f"energy: {tot['energy_kwh_total']:.4g} kWh{earlier} ({kinds}; PUE {self.pue:g}) | "
                f"{tot['co2e_kg_total']:.4g} kg CO2e at {self.intensity:.0f} g/kWh ({self.intensity_source}) | "
                f"{power} | {self._meter.backend}")

    def close(self) -> None:
        """Stop the meter and write workdir/energy.json (process 0): totals, sources, intensity, PUE."""
        if not self.enabled:
            return
        self._meter.stop()
        if self.is_main and self._totals:
            record = {"backend": self._meter.backend, "sources": self._meter.sources, "pue": self.pue,
                      "carbon_intensity_g_per_kwh": self.intensity, "intensity_source": self.intensity_source,
                      **{k: float(v) for k, v in self._totals.items() if math.isfinite(v)}}
            try:
                with files.atomic_path(os.path.join(self.workdir, "energy.json")) as tmp:
                    tmp.write_text(json.dumps(record, indent=1))
            except OSError as e:  # a full disk: the run's error says so; metrics.jsonl has the totals
                log.warning("%s/energy.json could not be written (%s)", self.workdir, e.strerror or e)
