"""Does a run fit its devices? The check every run makes before its first step, and the nearest settings that fit.

`check` compares the compiled train step's per-device peak (XLA's memory analysis: arguments + temp + outputs -
aliased) with the memory JAX may use on one device (`device_bytes`: the allocator's limit, which on a GPU is
XLA_PYTHON_CLIENT_MEM_FRACTION of the card). Over it, the run stops with one line giving both figures and the
nearest settings that fit; within `NEAR` of it, a warning. `settings_that_fit` is the planner behind that line: it
tries the changes a user would make (more micro-batches, activation checkpointing, the head in slices, ZeRO-3 /
FSDP), alone and together, and keeps those the analytic model (`memory.analytic_memory`, scaled by how far it is
from this compile) puts under the limit, cheapest first.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax

from neox_jax import config as cfg
from neox_jax import errors, memory, setup, sharding, targets

NEAR = 0.9  # warn above this share of the device's memory: fragmentation and collectives' buffers need room


class DoesNotFitError(errors.InputError):
    """The compiled step needs more memory per device than the device has; the message names settings that fit."""


def device_bytes(override_gb: float = 0.0) -> int | None:
    """Bytes JAX may allocate on one local device: `override_gb` if given, else the allocator's limit; None where
    the backend reports none (CPU)."""
    if override_gb:
        return int(override_gb * 1e9)
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit") or None


def compiled_peak(stats) -> int:
    """Per-device peak of a compiled executable's memory analysis (the donated state aliases its outputs)."""
    return (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Setting:
    overrides: dict  # dotted config field -> value
    peak: int  # the model's per-device bytes, scaled to this compile
    cost: float  # what the change costs, roughly in step time (1 = none)

    def flags(self) -> str:
        return " ".join(f"--config.{k}={v}" for k, v in self.overrides.items())


def check(run: setup.RunSetup, stats, limit: int | None, say) -> str:
    """Raise DoesNotFitError when the compiled step (its memory analysis `stats`) needs more than `limit` bytes
    per device; `say` a warning within NEAR of it. Returns the start-up line with both figures."""
    peak = compiled_peak(stats)
    if not limit:
        return f"train step: {peak / 1e9:.2f} GB per device at its peak (compiled; this device reports no limit)"
    line = f"train step: {peak / 1e9:.2f} GB per device at its peak (compiled), of {limit / 1e9:.2f} GB"
    if peak > limit:
        found = settings_that_fit(run, limit, peak)
        hint = ("; settings that fit (model estimate): " + "; ".join(f"{s.flags()} (~{s.peak / 1e9:.2f} GB)"
                                                                     for s in found[:3])) if found else \
            "; no change of micro-batches, remat, head slices or ZeRO-3 fits: use more devices or tensor parallelism"
        raise DoesNotFitError(f"the compiled train step needs {peak / 1e9:.2f} GB per device, more than the "
                              f"{limit / 1e9:.2f} GB a device has{hint} (train.memory_check=false runs it anyway)")
    if peak > NEAR * limit:
        say(f"warning: {line}: over {NEAR:.0%} of the device's memory, little room for fragmentation")
    return line


def _candidates(config) -> list[tuple[dict, float]]:
    """(overrides, cost) of every combination of the changes that lower memory, the config's own first."""
    t, m = config.train, config.model
    per_device = t.batch_size // t.micro_batches
    micro = [({}, 1.0)] + [({"train.micro_batches": t.micro_batches * f}, 1.0 + 0.02 * i)
                           for i, f in enumerate((2, 4, 8, 16, 32), 1) if per_device % f == 0]
    remat = [({}, 1.0)]
    if m.remat_policy != "full":
        remat += [({"model.remat_policy": "full"}, 1.33)]
    chunks = [({}, 1.0)]
    if t.loss_chunks == 1 and t.seq_len % 8 == 0:
        chunks += [({"train.loss_chunks": 8}, 1.01)]
    zero = [({}, 1.0)]
    fsdp = config.mesh.data * config.mesh.fsdp
    if config.zero_stage != 3 and config.mesh.stage == 1 and fsdp > 1:  # ZeRO-3 over every data-parallel device
        zero += [({"zero_stage": 3, "mesh.fsdp": fsdp, "mesh.data": 1}, 1.1)]
    out = []
    for parts in itertools.product(micro, remat, chunks, zero):
        overrides, cost = {}, 1.0
        for o, c in parts:
            overrides.update(o)
            cost *= c
        if overrides:
            out.append((overrides, cost))
    return out


def settings_that_fit(run: setup.RunSetup, limit: int, compiled: int | None = None) -> list[Setting]:
    """Changes of this run's config that the analytic model puts under NEAR x `limit` per device, cheapest first.
    With the compiled peak of the run as it is, each estimate is scaled by compiled / model for this config."""
    platform = targets.target_platform()  # the model's constants for the compiler that made `compiled`
    base = memory.analytic_memory(run, platform)["peak"]
    scale = compiled / base if compiled else 1.0
    found = []
    for overrides, cost in _candidates(run.config):
        try:
            config = cfg.override(run.config, overrides)
            other = setup.build(cfg.validate(config), sharding.make_mesh(config, run.mesh.devices.flat))
        except (cfg.ConfigError, ValueError):
            continue
        peak = int(memory.analytic_memory(other, platform)["peak"] * scale)
        if peak <= NEAR * limit:
            found.append(Setting(overrides, peak, cost))
    return sorted(found, key=lambda s: (s.cost, s.peak))
