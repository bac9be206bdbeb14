"""Where the time went: a per-thread table of the busiest events in a `jax.profiler` trace.

Reads the newest `*.trace.json.gz` under a trace directory (what `jax.profiler.trace(dir)` writes, e.g. a
training run's `workdir/profile` or `benchmark.py train --profile DIR`). On a GPU the device's stream threads
list kernels and its "XLA Ops" thread the HLO ops they came from; on CPU the XLA worker threads list fusions.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import textwrap

from neox_jax import table


def newest_trace(trace_dir: str | pathlib.Path) -> pathlib.Path:
    found = sorted(pathlib.Path(trace_dir).glob("**/*.trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir} (is it a jax.profiler trace directory?)")
    return found[-1]


def busiest(trace_dir, steps: int = 1) -> list[dict]:
    """One entry per (process, thread) with timed events: its total and per-name times, per traced step."""
    events = json.load(gzip.open(newest_trace(trace_dir)))["traceEvents"]
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    time = collections.defaultdict(collections.Counter)
    count = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") == "X" and not e.get("name", "").startswith("$"):  # "$file:line fn": Python frames
            key = (process.get(e["pid"], str(e["pid"])), thread.get((e["pid"], e.get("tid")), str(e.get("tid"))))
            time[key][e["name"]] += e.get("dur", 0) / 1e3 / steps
            count[key][e["name"]] += 1 / steps
    groups = [{"process": p, "thread": t, "total_ms": sum(c.values()),
               "events": [{"name": n, "ms": ms, "count": count[(p, t)][n]} for n, ms in c.most_common()]}
              for (p, t), c in time.items()]
    return sorted(groups, key=lambda g: -g["total_ms"])


_COLUMNS = (table.Column("ms", "ms", ".2f", width=10), table.Column("share", "share", ".1%", width=6),
            table.Column("count", "count", ".3g"), table.Column("event", "name", lambda name: name[:100], align="<"))


def format_table(groups: list[dict], top: int = 25, min_share: float = 0.02) -> str:
    """The busiest `top` names of every thread holding at least `min_share` of the busiest thread's time.
    Events nest (an op inside its module), so a thread's total may count some time twice."""
    if not groups:
        return "(no timed events)"
    lines, floor = [], min_share * groups[0]["total_ms"]
    for g in groups:
        if g["total_ms"] < floor:
            continue
        rows = [{**e, "share": e["ms"] / g["total_ms"]} for e in g["events"][:top]]
        lines += [f"== {g['process']} / {g['thread']}: {g['total_ms']:,.1f} ms per step",
                  textwrap.indent(table.render(_COLUMNS, rows), "  ")]
    return "\n".join(lines)
