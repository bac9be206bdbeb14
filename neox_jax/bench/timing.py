"""Wall-clock timing shared by the JAX and PyTorch sides of a benchmark (imports neither)."""

from __future__ import annotations

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
