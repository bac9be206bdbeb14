"""Goodput: where a run's wall time went, in categories that add up to it, carried over every attempt of a workdir.

An attempt is one call of `trainer.train` (one process of `scripts/train.py`). Its `Clock` charges every second
from the attempt's start to exactly one category at a time, so the categories sum to the attempt's wall time:

  startup     the process's start (`process_start`) to the loop's first step: config, mesh, data opened, unigram
              baseline, restore or init, config.json
  compile     the train step's ahead-of-time compile and memory check; the attempt's first step, from the loop's
              start until its metrics are read (first-call costs; StepLog's throughput leaves it out too); and
              every other compilation JAX reports (tracing, lowering, XLA: the init, the eval step at its first
              call, the checksum pass at the first save), taken out of the category it happened in
  data        the loop blocked in the data pipeline (`next(train_it)` and the batch's placement); with asynchronous
              dispatch the device may still be computing the step before meanwhile
  checkpoint  the loop waiting in `Checkpointer.save`, and for the last save to complete at the end
  eval        validation
  productive  everything else of the loop: the train steps' own time
  other       the attempt's end after the last save: the loss plot

Two more categories come from the attempts before this one, read back from metrics.jsonl when the loop begins:

  rerun       steps this attempt runs again because it resumed from a checkpoint older than the earlier attempts'
              last record (a SIGKILL, a damaged or set-aside checkpoint): their productive time in those attempts,
              moved out of `productive`
  downtime    the previous attempt's last record to this attempt's start: the end of that attempt not recorded
              (a kill; closing the writers and the interpreter's exit), a preemption, the requeue wait

Records are metrics.jsonl rows of split "goodput" (so TensorBoard and W&B get them through `metrics.Writers`),
written when the loop begins, at each log line and once the attempt is done. Each holds the workdir's totals over
every attempt so far (`<category>_s`, `wall_s`, `lost_s` = rerun + downtime, `lost_steps`, `goodput` = productive
/ wall) and what the next attempt needs to carry them on (`attempt`, `attempt_start`, `attempt_from`,
`attempt_productive_s`). A SIGKILLed attempt keeps what it recorded; its steps after the checkpoint the next
attempt resumes from become that attempt's `rerun`, the rest of its time `downtime`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from typing import Callable, Iterable, Mapping

from neox_jax import errors
from neox_jax import metrics as metrics_lib

_IMPORTED = time.time()  # process_start's fallback: scripts/train.py imports this (through cli) before any work

SPLIT = "goodput"
MEASURED = ("productive", "startup", "compile", "data", "checkpoint", "eval", "other")  # what a Clock charges
CATEGORIES = MEASURED + ("rerun", "downtime")
# JAX's compilation events (jax._src.dispatch): tracing at the top level, lowering to MLIR, XLA's compile
COMPILE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                            "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration"})
# what a next attempt reads of each record
CARRIED_FIELDS = ("time", "step", "attempt", "attempt_from", "attempt_productive_s", "lost_steps",
                  *(f"{c}_s" for c in CATEGORIES))


def process_start() -> float:
    """Wall-clock time (epoch seconds) this process started, as the kernel recorded it: /proc/self/stat's
    starttime (clock ticks since boot) against CLOCK_BOOTTIME, to 10 ms, so that the interpreter's start and the
    imports count (a process started by `exec` keeps its parent's start). Without /proc (macOS): the time this
    module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22; the name in (...) may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return _IMPORTED
    return time.time() - age


def covered(spans: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """Seconds of [lo, hi] inside the union of `spans` (overlapping spans counted once)."""
    total, reach = 0.0, lo
    for start, end in sorted(spans):
        start, end = max(start, reach), min(end, hi)
        if end > start:
            total += end - start
            reach = end
    return total


class Clock:
    """One attempt's wall time, every second charged to one category of `MEASURED`: the time since the last
    `switch` goes to the category that was running. Starts at `started` (epoch seconds; default now) in "startup".
    `on_span` is a jax.monitoring time-span listener: compilations are moved to "compile" from wherever they ran."""

    def __init__(self, started: float | None = None, timer: Callable[[], float] = time.perf_counter,
                 wall: Callable[[], float] = time.time):
        now, epoch = timer(), wall()
        self.started = epoch if started is None else started
        self._timer, self._offset = timer, epoch - now  # epoch seconds = timer seconds + offset
        self._mark = self.started - self._offset
        self.current = "startup"
        self.seconds = dict.fromkeys(MEASURED, 0.0)
        self._spans: list[tuple[float, float]] = []

    def switch(self, category: str) -> str:
        """Charge the time since the last switch, then run `category`; returns the category that was running."""
        if category not in self.seconds:
            raise ValueError(f"unknown goodput category {category!r}; expected one of {', '.join(MEASURED)}")
        now = self._timer()
        spans, self._spans = self._spans, []
        compiled = 0.0 if self.current == "compile" else covered(spans, self._mark, now)
        self.seconds[self.current] += now - self._mark - compiled
        self.seconds["compile"] += compiled
        self._mark = now
        previous, self.current = self.current, category
        return previous

    @contextlib.contextmanager
    def charged(self, category: str):
        """The body's time charged to `category`, then back to the category that was running."""
        previous = self.switch(category)
        try:
            yield
        finally:
            self.switch(previous)

    def read(self) -> dict[str, float]:
        """Seconds per category so far (the running one charged up to now)."""
        self.switch(self.current)
        return dict(self.seconds)

    def on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            self._spans.append((start - self._offset, end - self._offset))


@dataclasses.dataclass(frozen=True)
class Carried:
    """What an attempt starts from: seconds per category of every earlier attempt, this attempt's rerun and
    downtime added; the steps run again so far, this attempt's included; this attempt's number (1 for the first)."""
    seconds: dict
    lost_steps: int
    attempt: int


def earlier_records(workdir: str) -> list[dict]:
    """The goodput records of `workdir`'s metrics.jsonl (none when it has none); a record without the fields a
    next attempt reads is an error naming the file and step."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = [r for r in metrics_lib.read_jsonl(path) if r.get("split") == SPLIT] if os.path.exists(path) else []
    for r in rows:
        missing = [k for k in CARRIED_FIELDS if k not in r]
        if missing:
            raise errors.InputError(f"{path}: the goodput row of step {r.get('step')} lacks {', '.join(missing)}; "
                                    "expected every field a training run writes")
    return rows


def resume(records: list[dict], start_step: int, started: float) -> Carried:
    """Carry the earlier attempts' records on to an attempt that starts at `started` (epoch seconds) from
    `start_step`: their totals, plus the steps after `start_step` that they ran (rerun, moved out of productive)
    and the time from their last record to `started` (downtime)."""
    if not records:
        return Carried(dict.fromkeys(CATEGORIES, 0.0), 0, 1)
    last = records[-1]
    seconds = {c: float(last[f"{c}_s"]) for c in CATEGORIES}
    redone_s, redone_steps = 0.0, 0
    for curve in live_curves(records):
        _, lost_s, lost_steps = cut(curve, start_step)
        redone_s, redone_steps = redone_s + lost_s, redone_steps + lost_steps
    seconds["productive"] -= redone_s
    seconds["rerun"] += redone_s
    seconds["downtime"] += max(0.0, started - float(last["time"]))
    return Carried(seconds, int(last["lost_steps"]) + redone_steps, int(last["attempt"]) + 1)


def live_curves(records: list[dict]) -> list[list[tuple[int, float]]]:
    """Each attempt's productive seconds by step, [(step, seconds so far), ...], from the step it started at; cut
    where a later attempt resumed from before its end (those steps were counted as rerun by that attempt)."""
    curves = []
    for _, group in itertools.groupby(records, key=lambda r: int(r["attempt"])):
        group = list(group)
        start = int(group[0]["attempt_from"])
        curves = [c for c in (cut(curve, start)[0] for curve in curves) if c]
        curves.append([(start, 0.0)] + [(int(r["step"]), float(r["attempt_productive_s"])) for r in group])
    return curves


def cut(curve: list[tuple[int, float]], step: int) -> tuple[list[tuple[int, float]], float, int]:
    """(the part of `curve` up to `step`, its productive seconds after `step`, its steps after `step`); between
    two records, seconds are interpolated by step."""
    first, (end, total) = curve[0][0], curve[-1]
    if end <= step:
        return curve, 0.0, 0
    if step <= first:
        return [], total, end - first
    (s0, v0) = [p for p in curve if p[0] <= step][-1]
    (s1, v1) = next(p for p in curve if p[0] >= step)
    at = v0 if s1 == s0 else v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return [p for p in curve if p[0] < step] + [(step, at)], total - at, end - step


def record(carried: Carried, seconds: Mapping[str, float], started: float, start_step: int) -> dict:
    """One goodput row: the workdir's totals (`carried` plus this attempt's `seconds` per category) and this
    attempt's bookkeeping."""
    totals = {c: carried.seconds[c] + seconds.get(c, 0.0) for c in CATEGORIES}
    wall = sum(totals.values())
    return {"goodput": totals["productive"] / wall if wall > 0 else None, "wall_s": wall,
            **{f"{c}_s": v for c, v in totals.items()}, "lost_s": totals["rerun"] + totals["downtime"],
            "lost_steps": carried.lost_steps, "attempt": carried.attempt, "attempt_start": started,
            "attempt_from": start_step, "attempt_wall_s": sum(seconds.values()),
            "attempt_productive_s": seconds.get("productive", 0.0)}


_LABELS = (("compile", "compile"), ("data", "data"), ("checkpoint", "checkpoints"), ("eval", "eval"),
           ("startup", "start-up"))


def describe(r: Mapping) -> str:
    """'goodput 71% of 312 s (compile 12 s, data 3 s, checkpoints 4 s, eval 2 s, start-up 6 s, lost 0 s, other
    1 s)' from a goodput record; the attempts and the steps run again when there were any."""
    parts = [f"{label} {r[f'{c}_s']:.0f} s" for c, label in _LABELS]
    lost = f"lost {r['lost_s']:.0f} s"
    if r.get("lost_steps"):
        lost += f" ({r['lost_steps']:.0f} steps run again)"
    over = f" over {r['attempt']:.0f} attempts" if r.get("attempt", 1) > 1 else ""
    return f"goodput {r['goodput']:.0%} of {r['wall_s']:.0f} s{over} ({', '.join([*parts, lost])}, other " \
           f"{r['other_s']:.0f} s)"
