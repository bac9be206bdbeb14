"""Evaluating a series of checkpoints: a training run's kept steps (train.checkpoint_steps=pythia keeps Pythia's
154) or a folder of HF checkpoints named by step (Pythia's `step1000`, `step2000`, ... revisions saved locally).

One lm-eval run per step, its results written as `step_<N>.json` in the output folder as soon as it is done, so a
killed or repeated command goes on where it stopped (a step whose file exists is read, not evaluated). The model is
built once, from the first step evaluated, and every later step swaps its weights in (`NeoXLM.set_params`): the
scoring functions compile once per shape for the whole series. Then a table (step x task x metric, with stderr)
and a PNG of each metric against step, on a log axis where the steps span decades.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Callable

from neox_jax import checkpoint, errors, files, table, weights
from neox_jax import evaluate as E

STEP_DIR = re.compile(r"^step_?(\d+)$")  # an HF checkpoint of a series: step1000 (Pythia's revisions) or step_1000
SETTINGS = ("tasks", "num_fewshot", "limit", "seed", "dtype")  # what makes two evaluations of a step the same


def checkpoints(path: str) -> dict[int, Callable]:
    """step -> a loader of (model config, params, their source as NeoXLM's keyword: {"checkpoint": workdir} or
    {"hf": dir}), for a training workdir's kept steps or a folder of HF checkpoints `step<N>/`. One InputError when
    `path` is neither."""
    if os.path.isdir(checkpoint.checkpoint_dir(path)):
        ckpt = checkpoint.Checkpointer(path, async_save=False, create=False)
        try:
            steps = ckpt.all_steps()
        finally:
            ckpt.close()
        return {s: (lambda dtype, s=s: (*weights.load_model(checkpoint=path, step=s, dtype=dtype),
                                        {"checkpoint": path}))
                for s in steps}
    found = {}
    if os.path.isdir(path):
        for name in os.listdir(path):
            m = STEP_DIR.match(name)
            if m and os.path.isdir(os.path.join(path, name)):
                found[int(m.group(1))] = (lambda dtype, d=os.path.join(path, name):
                                          (*weights.load_model(hf=d, dtype=dtype), {"hf": d}))
    if not found:
        raise errors.InputError(f"--workdir {path}: neither a training workdir (no checkpoints/ folder) nor a folder "
                                "of HF checkpoints named by step (step1000/, step2000/, ...)")
    return found


def select(available: list[int], spec: str, where: str) -> list[int]:
    """--steps: "all", "A:B" (the available steps from A to B, either end open) or a list "1000,2000"."""
    spec = spec.strip()
    if spec == "all":
        return sorted(available)
    if ":" in spec:
        low, _, high = spec.partition(":")
        try:
            lo, hi = int(low) if low else 0, int(high) if high else max(available, default=0)
        except ValueError:
            lo = hi = None
        if lo is None or lo > hi:
            raise errors.InputError(f"--steps {spec!r}: expected A:B with whole steps A <= B (either may be left out)")
        return [s for s in sorted(available) if lo <= s <= hi]
    try:
        wanted = sorted({int(s) for s in spec.split(",") if s.strip()})
    except ValueError:
        raise errors.InputError(f"--steps {spec!r}: expected all, A:B or a list of steps like 1000,2000") from None
    missing = [s for s in wanted if s not in available]
    if missing:
        raise errors.InputError(f"--steps: step {missing[0]} has no checkpoint in {where}; it holds "
                                f"{_span(sorted(available))}")
    return wanted


def _span(steps: list[int]) -> str:
    shown = ", ".join(map(str, steps[:12])) + (f", ... {steps[-1]} ({len(steps)} steps)" if len(steps) > 12 else "")
    return shown or "no steps"


def evaluate_steps(path: str, steps: list[int], tasks: list[str], out_dir: str, *, say=print,
                   lm_args: dict | None = None, **eval_args) -> dict[int, dict]:
    """Each step's lm-eval results, evaluated (or read back from `out_dir`/step_<N>.json); `lm_args` go to
    NeoXLM (batch_size, tokenizer, dtype, ...), `eval_args` to `neox_jax.evaluate.evaluate`."""
    loaders = checkpoints(path)
    lm_args = dict(lm_args or {})
    settings = {"tasks": sorted(tasks), **{k: eval_args.get(k) for k in ("num_fewshot", "limit", "seed")},
                "dtype": lm_args.get("dtype")}
    os.makedirs(out_dir, exist_ok=True)
    results, lm = {}, None
    for step in steps:
        target = pathlib.Path(out_dir) / f"step_{step}.json"
        if target.exists():
            results[step] = _read(target, settings)
            continue
        m, params, source = loaders[step](lm_args.get("dtype"))
        if lm is None:
            lm = E.NeoXLM(model_config=m, params=params, **{**lm_args, **source, "dtype": None})
        else:
            lm.set_params(params)
        del params
        say(f"step {step}: evaluating {', '.join(tasks)}")
        found = E.evaluate(lm, tasks, **eval_args)
        record = {"step": step, "settings": settings, "results": found["results"],
                  "higher_is_better": found.get("higher_is_better", {})}
        with files.atomic_path(target) as tmp:
            tmp.write_text(json.dumps(record, indent=1, default=str))
        results[step] = record
    return results


def _read(path: pathlib.Path, settings: dict) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise errors.InputError(f"{path}: unreadable ({e}); delete it to evaluate that step again") from None
    differ = [k for k in SETTINGS if record.get("settings", {}).get(k) != settings.get(k)]
    if differ:
        raise errors.InputError(f"{path} was evaluated with other settings ({', '.join(differ)}: "
                                f"{record.get('settings', {}).get(differ[0])!r}, now {settings.get(differ[0])!r}); "
                                "use another --output_dir, or delete it to evaluate that step again")
    return record


def rows(results: dict[int, dict]) -> list[tuple]:
    """(step, task, metric, value, stderr) for every numeric metric of every step, in step order."""
    out = []
    for step in sorted(results):
        for task, metrics in sorted(results[step]["results"].items()):
            for key, value in sorted(metrics.items()):
                name, comma, _ = key.partition(",")  # lm-eval's "metric,filter" keys
                if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                stderr = metrics.get(key.replace(name, f"{name}_stderr", 1))
                out.append((step, task, name, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return out


def format_table(results: dict[int, dict]) -> str:
    return table.render([table.Column("step", 0, ","), table.Column("task", 1, align="<", width=16),
                         table.Column("metric", 2, align="<", width=10), table.Column("value", 3, ".4f"),
                         table.Column("stderr", 4, ".4f")], rows(results))


def log_spaced(steps: list[int]) -> bool:
    """Steps that span two decades or more (Pythia's 1, 2, 4, ..., 512, 1000, ...): drawn on a log axis."""
    positive = [s for s in steps if s > 0]
    return len(positive) > 2 and max(positive) / min(positive) >= 100


def plot(results: dict[int, dict], out_dir: str) -> list[str]:
    """One PNG per task and metric against step (error bars: stderr); their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple]] = {}
    for step, task, metric, value, stderr in rows(results):
        series.setdefault((task, metric), []).append((step, value, stderr or 0.0))
    written = []
    for (task, metric), points in series.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        steps, values, errs = zip(*points)
        ax.errorbar(steps, values, yerr=errs, marker="o", capsize=2)
        if log_spaced(list(steps)):
            ax.set_xscale("symlog", linthresh=1)  # step 0 (the initial weights) stays on the axis
        ax.set(xlabel="step", ylabel=metric, title=f"{task}: {metric}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{task}_{metric}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
