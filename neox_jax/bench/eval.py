"""Evaluation throughput: the `neox_jax` lm-eval backend against lm-eval's own `hf` backend, side by side; and
what train.eval_tasks costs inside the loop against the same evaluation of the checkpoint afterwards
(`loop_vs_after`).

One random model of a given config is written as an HF directory (safetensors + the 20B tokenizer) and both
backends load it: lm-eval's `HFLM` (torch, fp32 on CPU) and `evaluate.NeoXLM`. Each task runs through the
harness (`evaluate.evaluate`, the local task files) once per backend per pass, the backends in ABBA order over
the passes, so a shared host's load falls on both; only the `loglikelihood` calls are timed (tokenisation
included, the harness's request building and metrics not). Reported per task and pass: requests/s of each
backend and their ratio, the scores of both (accuracies must be identical, log-likelihoods agree within a
tolerance), neox_jax's padding overhead (positions computed / tokens laid out) and the positions `hf` computes
(each request its own row, padded to the longest of its batch of `batch_size` length-sorted requests).
"""

from __future__ import annotations

import os
import tempfile
import time

import jax

from neox_jax import convert
from neox_jax import evaluate as E
from neox_jax import model as model_lib
from neox_jax import scoring, series, sharding, table, weights
from neox_jax.bench import timing
from neox_jax.config import from_spec
from neox_jax.data import default_paths

TASKS = {"lambada_openai": 300, "piqa": 200, "hellaswag": 200}  # the tasks and limits


def write_random_hf(config_spec: str, path: str, seed: int = 0) -> str:
    """A random model of `config_spec` as an HF GPTNeoXForCausalLM directory with the 20B tokenizer, loadable
    offline by transformers and by neox_jax."""
    import transformers

    config = from_spec(config_spec)
    convert.save_hf(config, model_lib.init_params(config.model, jax.random.PRNGKey(seed)), path)
    tokenizer_file = default_paths()["tokenizer"]
    eod = "<|endoftext|>"
    transformers.PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token=eod, eos_token=eod, unk_token=eod,
                                         pad_token="<|padding|>").save_pretrained(path)
    return path


def hf_padded_positions(lengths, batch_size: int) -> int:
    """Positions lm-eval's `hf` backend computes for requests of these input lengths: sorted longest first,
    batches of `batch_size`, each padded to its longest."""
    ordered = sorted(lengths, reverse=True)
    return sum(ordered[i] * len(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size))


class _Timed:
    """Wraps an LM's `loglikelihood` (the only call the local tasks make) to sum its wall time."""

    def __init__(self, lm):
        self.lm, self.seconds, self.requests = lm, 0.0, 0
        inner = lm.loglikelihood

        def timed(requests, *args, **kwargs):
            t0 = time.perf_counter()
            out = inner(requests, *args, **kwargs)
            self.seconds += time.perf_counter() - t0
            self.requests += len(requests)
            return out

        lm.loglikelihood = timed


def _samples(results: dict, task: str) -> list[list[tuple[float, bool]]]:
    return [[tuple(r[0]) for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def compare(ours: dict, theirs: dict, task: str) -> dict:
    """Both backends' metrics for `task`, the largest log-likelihood difference, and whether the accuracies and
    greedy flags are identical."""
    a, b = _samples(ours, task), _samples(theirs, task)
    pairs = [(x, y) for da, db in zip(a, b) for x, y in zip(da, db)]
    metrics = [k for k in theirs["results"][task] if k.endswith(",none") and "stderr" not in k]
    scores = {k.split(",")[0]: (ours["results"][task][k], theirs["results"][task][k]) for k in metrics}
    same = (len(a) == len(b) and all(x[1] == y[1] for x, y in pairs)
            and all(v[0] == v[1] for k, v in scores.items() if k.startswith("acc")))
    return {"scores": scores, "max_abs_loglik_diff": max((abs(x[0] - y[0]) for x, y in pairs), default=0.0),
            "identical_accuracies": same}


def run(config_spec: str = "configs/pythia.py:70m", tasks: dict | None = None, batch_size: int = 16,
        passes: int = 2, model_dir: str | None = None, seed: int = 0, row_length: int | None = None) -> list[dict]:
    """One row per (task, pass); see the module docstring."""
    import torch
    from lm_eval.models.huggingface import HFLM

    tasks = dict(TASKS if tasks is None else tasks)
    tmp = None
    if model_dir is None or not os.path.isfile(os.path.join(model_dir, "config.json")):
        if model_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bench_eval_")
            model_dir = tmp.name
        write_random_hf(config_spec, model_dir, seed)
    extra = {} if row_length is None else {"row_length": row_length}
    ours = E.NeoXLM(hf=model_dir, batch_size=batch_size, dtype="float32", **extra)
    theirs = HFLM(pretrained=model_dir, tokenizer=model_dir, device="cpu", dtype="float32", batch_size=batch_size)
    lengths = []
    score_pairs = ours.score_pairs

    def recording(pairs, *args, **kwargs):
        lengths.extend(scoring.input_length(c, x, ours.max_length) for c, x in pairs)
        return score_pairs(pairs, *args, **kwargs)

    ours.score_pairs = recording
    rows = []
    for p in range(passes):
        for task, limit in tasks.items():
            out, timed = {}, {}
            order = ("neox_jax", "hf") if p % 2 == 0 else ("hf", "neox_jax")
            before = _snapshot(ours.scorer.stats)
            lengths.clear()
            for name in order:
                lm = ours if name == "neox_jax" else theirs
                timed[name] = _Timed(lm)
                out[name] = E.evaluate(lm, [task], limit=limit, log_samples=True)
                del lm.loglikelihood  # back to the class's method
            st = _delta(before, ours.scorer.stats)
            rate = {n: t.requests / t.seconds for n, t in timed.items()}
            row = {"task": task, "limit": limit, "pass": p, "order": ",".join(order), "batch_size": batch_size,
                   "requests": timed["hf"].requests, "neox_jax_requests_per_s": rate["neox_jax"],
                   "hf_requests_per_s": rate["hf"], "ratio": rate["neox_jax"] / rate["hf"],
                   "neox_jax_s": timed["neox_jax"].seconds, "hf_s": timed["hf"].seconds,
                   "padding_overhead": st["positions"] / max(st["distinct"], 1),
                   "positions": st["positions"], "distinct_tokens": st["distinct"], "request_tokens": st["tokens"],
                   "hf_positions": hf_padded_positions(lengths, batch_size),
                   "head_positions": st["head_positions"], "scored_positions": st["scored"],
                   "calls": st["calls"], "body_shapes": sorted(ours.scorer.stats.body_shapes),
                   "torch_threads": torch.get_num_threads(), "load_avg": list(os.getloadavg()),
                   **compare(out["neox_jax"], out["hf"], task)}
            rows.append(row)
            timing.progress(row)
    if tmp is not None:
        tmp.cleanup()
    return rows


def _snapshot(stats) -> dict:
    return {k: getattr(stats, k) for k in ("requests", "tokens", "distinct", "positions", "scored", "head_positions",
                                           "calls")}


def _delta(before: dict, stats) -> dict:
    return {k: getattr(stats, k) - v for k, v in before.items()}


_COLUMNS = (
    table.Column("task", "task", align="<", width=15), table.Column("pass", "pass"),
    table.Column("reqs", "requests", width=5), table.Column("neox_jax req/s", "neox_jax_requests_per_s", ".1f"),
    table.Column("hf req/s", "hf_requests_per_s", ".1f", width=9),
    table.Column("ratio", "ratio", lambda v: f"{v:.2f}x", width=6),
    table.Column("padding", "padding_overhead", ".3f", width=8),
    table.Column("hf pos/tok", lambda r: r["hf_positions"] / max(r["request_tokens"], 1), ".3f"),
    table.Column("max |dLL|", "max_abs_loglik_diff", ".1e"),
    table.Column("same acc", lambda r: "yes" if r["identical_accuracies"] else "NO"),
    table.Column("scores (neox_jax / hf)", "scores", align="<",
                 fmt=lambda scores: ", ".join(f"{k} {a:.4f}/{b:.4f}" for k, (a, b) in scores.items())))


def format_rows(rows: list[dict]) -> str:
    lines = [table.render(_COLUMNS, rows)]
    shapes = sorted({tuple(s) for r in rows for s in r["body_shapes"]})
    lines.append(f"neox_jax body shapes compiled (rows, row length): {shapes}; load average {os.getloadavg()}")
    return "\n".join(lines)


def loop_vs_after(workdir: str, steps: tuple[int, int], tasks: list[str], limit: int, passes: int = 2) -> list[dict]:
    """What train.eval_tasks costs inside the loop against evaluating the checkpoint afterwards: the seconds of one
    warm `evaluate.LoopEvaluator` call on step B's weights (already on the device, as in the loop), and of the
    series' second step (`series.evaluate_steps` over steps A, B: loading B from the workdir, then evaluating it),
    in ABBA order over `passes`. The first step of each compiles; neither time includes a compile."""
    _, first = weights.load_workdir_params(workdir, steps[0])
    run_config, second = weights.load_workdir_params(workdir, steps[1])
    m = run_config.model
    run_config.train.eval_tasks, run_config.train.eval_tasks_limit = ",".join(tasks), float(limit)
    mesh = sharding.inference_mesh()
    rows = []
    for i in range(passes):
        for kind in (("loop", "after") if i % 2 == 0 else ("after", "loop")):
            if kind == "loop":
                evaluator = E.LoopEvaluator(run_config)
                evaluator(m, jax.device_put(first), mesh)  # compiles
                start = time.perf_counter()
                evaluator(m, jax.device_put(second), mesh)
                rows.append({"pass": i + 1, "how": "inside the loop", "seconds": time.perf_counter() - start})
            else:
                marks = []
                with tempfile.TemporaryDirectory() as out:
                    series.evaluate_steps(workdir, list(steps), tasks, out,
                                          say=lambda _: marks.append(time.perf_counter()), limit=limit,
                                          bootstrap_iters=100)
                    rows.append({"pass": i + 1, "how": "afterwards (load + evaluate)",
                                 "seconds": time.perf_counter() - marks[1]})
    return rows
