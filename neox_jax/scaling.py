"""Scaling-law studies: isoflop sweeps and the fits of Hoffmann et al. (2022, "Chinchilla") to their losses.

An isoflop sweep picks, for each FLOP budget C, several model sizes of a family and trains each on the tokens that
spend C (`metrics.flops_per_token`, the count the planner uses: 6N + 12LHS per token, embeddings and head
included). The runs are a normal sweep (`scripts/sweep.py --isoflop`: listed, run here, or a SLURM array).

`scripts/sweep.py --fit RUNS` reads every finished run's final validation loss (else its last train loss), its
parameters N (without the embedding and head: at small sizes a 50k-entry vocabulary would be most of the count and
hide the trend) and its tokens D, then fits
  * approach 2: per budget, a parabola of the loss in log N (and in log D); its minimum is that budget's optimal
    N (D); power laws N_opt = k C^a and D_opt = k' C^b through them (least squares in log-log);
  * approach 3: L(N, D) = E + A / N^alpha + B / D^beta, by the Huber loss (delta 1e-3) between log L and
    log(E + A N^-alpha + B D^-beta), minimised with L-BFGS from a grid of starts, as Hoffmann et al. did;
each with bootstrap intervals (runs resampled with replacement). The compute-optimal N and D at a budget follow
from both: approach 2's power laws, and approach 3's minimum of L along C = 6 N D.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import warnings

import numpy as np

from neox_jax import config as cfg
from neox_jax import errors, metrics, table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_STEPS = 20  # a run shorter than this is mostly warmup: its loss says little about its size
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # where a budget's sizes are centred (Hoffmann et al.'s compute-optimal ratio)
HUBER_DELTA = 1e-3
BUDGET_TOLERANCE = 0.05  # runs whose FLOPs agree within 5% share a budget (steps are whole numbers)


class ScalingError(errors.InputError):
    """A budget, family or set of runs that cannot give what was asked: the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int

    def overrides(self) -> dict:
        return {"model.num_layers": self.layers, "model.hidden_size": self.hidden, "model.num_heads": self.heads}


def non_embedding_params(layers: int, hidden: int, ffn: int | None = None) -> int:
    """Attention and MLP weights and biases and the LayerNorms of every layer (`config.param_count` without the
    embedding, the head and the final LayerNorm)."""
    f = ffn or 4 * hidden
    return layers * (4 * hidden * hidden + 4 * hidden + 2 * hidden * f + f + hidden + 4 * hidden)


def family(spec: str) -> list[Shape]:
    """--family: "pythia" (the Pythia suite's shapes, configs/pythia.py) or "depth:A-B[,aspect:W][,head_dim:K]":
    depths A..B, each `W` x depth wide (default 64) with heads of K (default 32) dims."""
    if spec == "pythia":
        sizes = cfg.import_file(os.path.join(ROOT, "configs", "pythia.py"), "pythia_sizes").SIZES
        return sorted((Shape(v[0], v[1], v[2]) for v in sizes.values()), key=lambda s: (s.hidden, s.layers))
    fields = dict(part.partition(":")[::2] for part in spec.split(","))
    try:
        low, high = (int(x) for x in fields.pop("depth").split("-"))
        aspect, head_dim = int(fields.pop("aspect", 64)), int(fields.pop("head_dim", 32))
    except (KeyError, ValueError):
        low = None
    if low is None or fields or not 1 <= low <= high or aspect % head_dim:
        raise ScalingError(f"--family {spec!r}: expected pythia, or depth:A-B[,aspect:W][,head_dim:K] with "
                           "1 <= A <= B and K dividing W (e.g. depth:1-6,aspect:64,head_dim:32)")
    return [Shape(d, aspect * d, aspect * d // head_dim) for d in range(low, high + 1)]


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    budget: float
    shape: Shape
    steps: int
    params: int  # non-embedding
    tokens: int

    def overrides(self) -> dict:
        # the validation loss once, at the end, on the run's fixed validation batches: what the fits read
        return {**self.shape.overrides(), "train.steps": self.steps, "train.eval_every": self.steps}


def _shaped(model, shape: Shape):
    """A copy of the model config with `shape`'s depth, width and heads."""
    m = model.copy_and_resolve_references()
    m.num_layers, m.hidden_size, m.num_heads = shape.layers, shape.hidden, shape.heads
    return m


def isoflop_plan(base, budgets: list[float], shapes: list[Shape], per_budget: int = 4) -> list[PlannedRun]:
    """For each budget, the `per_budget` shapes whose tokens per parameter lie nearest (in log) to Chinchilla's 20,
    among those that get at least MIN_STEPS steps; each trained for the steps that spend the budget."""
    t = base.train
    tokens_per_step = t.batch_size * t.seq_len
    plan = []
    for budget in budgets:
        fits = []
        for shape in shapes:
            steps = round(budget / (metrics.flops_per_token(_shaped(base.model, shape), t.seq_len) * tokens_per_step))
            if steps >= MIN_STEPS:
                params = non_embedding_params(shape.layers, shape.hidden)
                fits.append(PlannedRun(budget, shape, steps, params, steps * tokens_per_step))
        if len(fits) < 3:
            least = metrics.flops_per_token(_shaped(base.model, shapes[0]), t.seq_len) * tokens_per_step * MIN_STEPS
            raise ScalingError(f"--isoflop budget {budget:.3g} FLOPs: only {len(fits)} size(s) of the family get "
                               f"{MIN_STEPS} steps of {tokens_per_step:,} tokens (a parabola needs 3); the smallest "
                               f"model needs {least:.3g} FLOPs for that: raise the budget, or add smaller sizes to "
                               "--family")
        fits.sort(key=lambda r: abs(math.log(r.tokens / r.params / CHINCHILLA_TOKENS_PER_PARAM)))
        plan += sorted(fits[:per_budget], key=lambda r: r.params)
    return plan


# ---- reading and fitting ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Point:
    run: str
    params: float  # N, non-embedding
    tokens: float  # D
    flops: float  # C, the planner's count
    loss: float


def read_runs(runs_dir: str) -> list[Point]:
    """One Point per run folder under `runs_dir` (a config.json and a metrics.jsonl); a run that did not reach its
    train.steps is an error naming it."""
    points = []
    for d, _, names in sorted(os.walk(runs_dir)):
        if "config.json" not in names or "metrics.jsonl" not in names:
            continue
        name = os.path.relpath(d, runs_dir)
        c = cfg.from_saved(json.load(open(os.path.join(d, "config.json"))), f"{d}/config.json")
        rows = metrics.read_jsonl(os.path.join(d, "metrics.jsonl"))
        train = [r for r in rows if r.get("split") == "train" and r.get("loss") is not None]
        val = [r for r in rows if r.get("split") == "val" and r.get("loss") is not None]
        step = train[-1]["step"] if train else 0
        if step < c.train.steps:
            raise ScalingError(f"--fit: run {name} did not finish (step {step} of {c.train.steps}); resume it (the "
                               f"same sweep command) or move it out of {runs_dir}")
        loss = val[-1]["loss"] if val and val[-1]["step"] == step else train[-1]["loss"]
        m = c.model
        tokens = c.train.steps * c.train.batch_size * c.train.seq_len
        points.append(Point(name, non_embedding_params(m.num_layers, m.hidden_size, cfg.ffn_size(m)), tokens,
                            metrics.flops_per_token(m, c.train.seq_len) * tokens, loss))
    if not points:
        raise ScalingError(f"--fit {runs_dir}: no finished runs (folders with config.json and metrics.jsonl)")
    return points


def budgets(points: list[Point]) -> list[list[Point]]:
    """The points grouped by FLOPs (within BUDGET_TOLERANCE), smallest budget first; groups of 3 or more."""
    groups: list[list[Point]] = []
    for p in sorted(points, key=lambda p: p.flops):
        if groups and p.flops <= groups[-1][0].flops * (1 + BUDGET_TOLERANCE):
            groups[-1].append(p)
        else:
            groups.append([p])
    return [g for g in groups if len(g) >= 3]


def _vertex(x: np.ndarray, y: np.ndarray) -> float | None:
    with warnings.catch_warnings():  # a bootstrap resample may repeat a size: the fit is still defined
        warnings.simplefilter("ignore", getattr(np, "exceptions", np).RankWarning)
        a, b, _ = np.polyfit(x, y, 2)
    return -b / (2 * a) if a > 0 else None


def approach2(points: list[Point]) -> dict:
    """Per budget the loss-minimising N and D (parabolas in log N and log D), and the power laws through them."""
    groups = budgets(points)
    if len(groups) < 2:
        raise ScalingError(f"--fit: approach 2 needs 2 budgets of 3 or more runs each (runs whose FLOPs agree "
                           f"within {BUDGET_TOLERANCE:.0%}); these runs have {len(groups)}: run an isoflop sweep "
                           "(scripts/sweep.py --isoflop) or add runs")
    rows = []
    for g in groups:
        c = float(np.mean([p.flops for p in g]))
        loss = np.array([p.loss for p in g])
        n = _vertex(np.log([p.params for p in g]), loss)
        d = _vertex(np.log([p.tokens for p in g]), loss)
        if n is None or d is None:
            best = min(g, key=lambda p: p.loss).params
            side = ("smaller" if best == min(p.params for p in g) else "larger" if best == max(p.params for p in g)
                    else "more")
            raise ScalingError(f"--fit: at {c:.3g} FLOPs the loss has no minimum across the sizes run (its parabola "
                               f"opens downwards): add {side} sizes, where the loss still falls")
        rows.append({"flops": c, "params": math.exp(n), "tokens": math.exp(d), "runs": len(g)})
    log_c = np.log([r["flops"] for r in rows])
    a, log_kn = np.polyfit(log_c, np.log([r["params"] for r in rows]), 1)
    b, log_kd = np.polyfit(log_c, np.log([r["tokens"] for r in rows]), 1)
    return {"budgets": rows, "a": float(a), "b": float(b), "log_kn": float(log_kn), "log_kd": float(log_kd)}


def _huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    small = np.abs(r) <= delta
    return np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))


def _objective(theta, log_n, log_d, log_l):
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    peak = terms.max(axis=0)
    predicted = peak + np.log(np.exp(terms - peak).sum(axis=0))
    r = predicted - log_l
    small = np.abs(r) <= HUBER_DELTA
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))  # d huber / d r
    w = np.exp(terms - predicted)  # softmax weights: d predicted / d terms
    grad = np.array([np.sum(dr * w[0]), np.sum(dr * w[1]), np.sum(dr * w[2]),
                     np.sum(dr * w[0] * -log_n), np.sum(dr * w[1] * -log_d)])
    return float(np.sum(_huber(r))), grad


# Hoffmann et al.'s grid of initialisations, coarser in a and b (their grid has 4,500 starts)
GRID = dict(a=(0.0, 5.0, 10.0, 15.0, 20.0), b=(0.0, 5.0, 10.0, 15.0, 20.0), e=(-1.0, 0.0, 1.0),
            alpha=(0.0, 0.5, 1.0, 1.5), beta=(0.0, 0.5, 1.0, 1.5))


def approach3(points: list[Point], starts=None) -> dict:
    """E, A, B, alpha, beta of L(N, D) = E + A / N^alpha + B / D^beta: the best of L-BFGS runs from every start
    (default: GRID's product)."""
    from scipy.optimize import minimize

    log_n = np.log([p.params for p in points])
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    best = None
    for start in starts if starts is not None else itertools.product(*GRID.values()):
        found = minimize(_objective, np.array(start, float), args=(log_n, log_d, log_l), jac=True, method="L-BFGS-B",
                         options=dict(ftol=1e-15, gtol=1e-12, maxiter=2000))
        if best is None or found.fun < best.fun:
            best = found
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta),
            "theta": [float(x) for x in best.x], "objective": float(best.fun)}


def optimal_at(fit3: dict, flops: float) -> tuple[float, float]:
    """Approach 3's compute-optimal (N, D) at `flops`, minimising L along C = 6 N D."""
    alpha, beta, A, B = fit3["alpha"], fit3["beta"], fit3["A"], fit3["B"]
    g = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    n = g * (flops / 6) ** (beta / (alpha + beta))
    return n, flops / (6 * n)


def bootstrap(points: list[Point], resamples: int = 200, seed: int = 0, full: dict | None = None) -> dict:
    """5th and 95th percentiles of approach 2's a, b and approach 3's E, alpha, beta over resampled runs
    (approach 3 started from the full fit's optimum, `full` when the caller has it; resamples whose approach 2 has
    too few runs per budget are dropped)."""
    rng = np.random.default_rng(seed)
    full = full or approach3(points)
    samples: dict[str, list[float]] = {k: [] for k in ("a", "b", "E", "alpha", "beta")}
    for _ in range(resamples):
        pick = [points[i] for i in rng.integers(0, len(points), len(points))]
        try:
            two = approach2(pick)
            samples["a"].append(two["a"])
            samples["b"].append(two["b"])
        except ScalingError:
            pass
        three = approach3(pick, starts=[full["theta"]])
        for k in ("E", "alpha", "beta"):
            samples[k].append(three[k])
    return {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) if v else (math.nan, math.nan)
            for k, v in samples.items()}


def fit(points: list[Point], resamples: int = 200) -> dict:
    three = approach3(points)  # the grid of starts is most of the time: run once, shared with the bootstrap
    return {"points": [dataclasses.asdict(p) for p in points], "approach2": approach2(points), "approach3": three,
            "intervals": bootstrap(points, resamples, full=three) if resamples else {}}


def format_fit(result: dict, at: float | None = None) -> str:
    two, three, ci = result["approach2"], result["approach3"], result["intervals"]
    interval = lambda k: f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""  # noqa: E731
    lines = [table.render([table.Column("FLOPs", "flops", ".3g"), table.Column("runs", "runs"),
                           table.Column("N_opt", "params", ".3g"), table.Column("D_opt", "tokens", ".3g")],
                          two["budgets"]),
             f"approach 2: N_opt ~ C^{two['a']:.3f}{interval('a')}, D_opt ~ C^{two['b']:.3f}{interval('b')} "
             "(90% bootstrap intervals)",
             f"approach 3: L(N, D) = {three['E']:.3f}{interval('E')} + {three['A']:.4g} / N^{three['alpha']:.3f}"
             f"{interval('alpha')} + {three['B']:.4g} / D^{three['beta']:.3f}{interval('beta')}"]
    if at:
        n2 = math.exp(two["log_kn"]) * at ** two["a"]
        d2 = math.exp(two["log_kd"]) * at ** two["b"]
        n3, d3 = optimal_at(three, at)
        lines.append(f"compute-optimal at {at:.3g} FLOPs: approach 2 N {n2:.3g}, D {d2:.3g}; approach 3 N {n3:.3g}, "
                     f"D {d3:.3g} (N without embeddings)")
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """Isoflop curves (loss against N per budget, with each parabola and its minimum) and the frontier (N_opt
    against C, approach 2's power law and approach 3's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [Point(**p) for p in result["points"]]
    two, three = result["approach2"], result["approach3"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for g in budgets(points):
        x = np.log([p.params for p in g])
        y = [p.loss for p in g]
        line = left.plot(np.exp(x), y, "o", label=f"{np.mean([p.flops for p in g]):.2g} FLOPs")[0]
        grid = np.linspace(x.min() - 0.2, x.max() + 0.2, 50)
        left.plot(np.exp(grid), np.polyval(np.polyfit(x, y, 2), grid), "-", color=line.get_color(), alpha=0.6)
    for row in two["budgets"]:
        left.axvline(row["params"], color="gray", lw=0.5, ls=":")
    left.set(xscale="log", xlabel="N (parameters without embeddings)", ylabel="final loss", title="isoflop curves")
    left.legend(fontsize=8)
    c = np.array([r["flops"] for r in two["budgets"]])
    right.plot(c, [r["params"] for r in two["budgets"]], "o", label="approach 2: each budget's minimum")
    span = np.geomspace(c.min() / 3, c.max() * 3, 50)
    right.plot(span, np.exp(two["log_kn"]) * span ** two["a"], "-", label=f"N_opt ~ C^{two['a']:.2f}")
    right.plot(span, [optimal_at(three, s)[0] for s in span], "--",
               label=f"approach 3 (alpha {three['alpha']:.2f}, beta {three['beta']:.2f})")
    right.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel="N_opt", title="compute-optimal frontier")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
