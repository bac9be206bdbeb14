"""Wall-clock timing shared by the JAX and PyTorch sides of a benchmark (imports neither); the
progress lines and percentages of the tables."""

from __future__ import annotations

import json
import sys
import time
from typing import Callable


def best_window(step: Callable[[], object], sync: Callable[[object], None], steps: int, windows: int) -> float:
    """Seconds per call of `step`: the fastest of `windows` back-to-back runs of `steps` calls, each ended by
    `sync` on the last result. The best window, not the mean, because a shared host only ever adds time."""
    best = float("inf")
    for _ in range(max(windows, 1)):
        t0 = time.perf_counter()
        out = None
        for _ in range(steps):
            out = step()
        sync(out)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def starting(what: str) -> None:
    """A line on stderr before a measurement that starts with a compile (minutes for a large model), so a long
    benchmark never sits silent."""
    print(f"{what}: compiling and timing...", file=sys.stderr, flush=True)


def progress(row: dict) -> None:
    """Each row as soon as it is measured, on stderr (the tables on stdout stay clean), so a run cut short still
    reports what it finished."""
    print("row " + json.dumps(row), file=sys.stderr, flush=True)


def share(value: float | None) -> str:
    """A fraction of a bound (a roofline, a peak) as a percentage; "-" without a bound, or where the measurement
    beat it (above 100%: the bound does not hold on this device, so no percentage of it is right)."""
    return "-" if value is None or not 0 <= value <= 1 else f"{value:.1%}"
