"""FLOPs, MFU and throughput; metric writers (console, JSONL, TensorBoard) and the end-of-run plot.

FLOPs conventions (both count a forward + backward pass, no recomputation):
  * "palm" (the default, used for MFU everywhere in this project): 6 N + 12 L H S per token, N = all parameters.
  * "neox": GPT-NeoX's own formula, 24 f B S L H^2 (1 + S/(6H) + V/(16 L H)) per step with f = 3, divided by B S.

The unigram baseline is the loss of a model that ignores context: the cross-entropy of held-out tokens under the
training split's token frequencies. A language model is learning something once its validation loss is below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from typing import Mapping, Sequence

import numpy as np

from neox_jax import config as cfg
from neox_jax import errors

log = logging.getLogger("neox_jax")

# Dense bf16 peak TFLOP/s by device kind (datasheets); substring match on jax's device_kind, first hit wins.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),  # before the SXM entry: first hit wins
    ("H100", 989.0),
    ("A100", 312.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def flops_per_token(m, seq_len: int, convention: str = "palm", tensor_parallel: int = 1) -> float:
    """Model FLOPs (forward + backward) per trained token."""
    L, H, S, V = m.num_layers, m.hidden_size, seq_len, cfg.padded_vocab(m, tensor_parallel)
    if convention == "palm":
        return 6.0 * cfg.param_count(m, tensor_parallel) + 12.0 * L * H * S
    if convention == "neox":
        return 24.0 * 3 * L * H * H * (1.0 + S / (6.0 * H) + V / (16.0 * L * H))
    raise ValueError(f"unknown FLOPs convention {convention!r}; use 'palm' or 'neox'")


def device_peak_tflops(device_kind: str | None = None, override: float = 0.0) -> float | None:
    """Peak dense bf16 TFLOP/s of one device: the override when given, else the table; None when unknown (CPU)."""
    if override:
        return float(override)
    if device_kind is None:
        import jax

        device_kind = jax.devices()[0].device_kind
    return by_device_kind(PEAK_TFLOPS, device_kind)


def by_device_kind(table, device_kind: str) -> float | None:
    """The value of the first (name, value) row whose name is a substring of `device_kind`; None when none is."""
    for name, value in table:
        if name.lower() in device_kind.lower():
            return value
    return None


def mfu(tokens_per_second: float, flops_token: float, n_devices: int, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if not peak_tflops:
        return None
    return tokens_per_second * flops_token / (n_devices * peak_tflops * 1e12)


def unigram_cross_entropy(train_tokens: Sequence[np.ndarray], eval_tokens: np.ndarray, vocab_size: int,
                          weights: Sequence[float] | None = None, alpha: float = 1.0) -> float:
    """Cross-entropy (nats/token) of `eval_tokens` under the unigram distribution of the training token arrays
    (mixed by `weights`, like the training mixture), with add-`alpha` smoothing over `vocab_size` ids so that a
    token unseen in training costs a finite amount."""
    weights = [1.0] * len(train_tokens) if weights is None else list(weights)
    probs = np.zeros(vocab_size, np.float64)
    for what, tokens in [("training", t) for t in train_tokens] + [("validation", eval_tokens)]:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
            bad = int(tokens.min() if tokens.min() < 0 else tokens.max())
            raise errors.InputError(f"unigram baseline: {what} token id {bad} is outside the vocabulary of "
                                    f"{vocab_size} ids (model.vocab_size)")
    for tokens, w in zip(train_tokens, weights):
        counts = np.bincount(np.asarray(tokens, np.int64), minlength=vocab_size) + alpha
        probs += w * counts / counts.sum()
    probs /= probs.sum()
    return float(-np.log(probs[np.asarray(eval_tokens, np.int64)]).mean())


def open_wandb(project: str, workdir: str, config: dict):
    """A wandb run for `train.wandb_project`, resumed across restarts of the same workdir (id from its name)."""
    try:
        import wandb
    except ImportError:
        raise cfg.ConfigError(f"config field train.wandb_project={project!r} asks for Weights & Biases logging, "
                              "but the wandb package is not installed (pip install wandb, or leave the field "
                              "empty)") from None
    run_id = "neox-" + "".join(c if c.isalnum() else "-" for c in os.path.abspath(workdir)).strip("-")[-56:]
    return wandb.init(project=project, dir=workdir, config=config, id=run_id, resume="allow",
                      name=os.path.basename(os.path.abspath(workdir)))


class MetricsWriteError(errors.RunFailure):
    """metrics.jsonl could not be written (a full disk)."""


def _event_writer_failed(args) -> bool:
    """tensorboardX's writer thread's I/O errors (a full disk printed its traceback in the middle of the run's
    lines), as one warning; metrics.jsonl, written in the loop, reports its own."""
    if type(args.thread).__name__ == "_EventLoggerThread" and isinstance(args.exc_value, (OSError, ValueError)):
        log.warning("tensorboard: events could not be written (%s); metrics.jsonl holds every row", args.exc_value)
        return True
    return False


def _tensorboard_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed
    (1.3 CPU-seconds a run, for tensors this writer never receives; it writes floats). A torch imported before, or
    after, is untouched."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter  # optional at import time: benchmarks don't need it
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)


class Writers:
    """Console + metrics.jsonl + TensorBoard (+ Weights & Biases when `wandb_project` is set) for one run;
    a no-op on processes other than 0."""

    def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True, wandb_project: str = "",
                 run_config: dict | None = None):
        self.workdir, self.enabled = workdir, enabled
        self._jsonl = self._tb = self._wandb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if wandb_project:
            self._wandb = open_wandb(wandb_project, workdir, run_config or {})
        path = os.path.join(workdir, "metrics.jsonl")
        repaired = repair_jsonl(path)
        if repaired:
            log.warning(repaired)
        self._jsonl = open(path, "a", buffering=1)
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))
            errors.filter_hook(threading, "excepthook", _event_writer_failed)

    def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        try:
            self._jsonl.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(), **clean}) + "\n")
        except OSError as e:  # a full disk: the row may be cut short, which the next start repairs
            raise MetricsWriteError(f"{self._jsonl.name}: step {step}'s metrics could not be written ({e.strerror or e}"
                                    "); the checkpoints written before are intact: free space and run the same "
                                    "command again to resume") from None
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, int(step))
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            with contextlib.suppress(OSError):  # its failure was raised at the write
                self._jsonl.close()
        if self._tb is not None:
            try:
                self._tb.close()
            except (OSError, ValueError) as e:  # ValueError: its file handle was closed by a failed write
                log.warning("%s/tensorboard: the event file could not be closed (%s); metrics.jsonl holds every "
                            "row", self.workdir, e)
        if self._wandb is not None:
            self._wandb.finish()


def format_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
    """One console progress line."""
    parts = [f"step {step:>6}/{total}"]
    fmt = {"loss": "{:.4f}", "ppl": "{:.2f}", "val_loss": "{:.4f}", "lr": "{:.2e}", "grad_norm": "{:.3f}",
           "tokens_per_s": "{:,.0f}", "step_time": "{:.3f}s", "mfu": "{:.1%}", "loss_scale": "{:g}",
           "skipped_steps": "{:.0f}", "power_w": "{:,.0f} W", "energy_kwh_total": "{:.4g} kWh",
           "co2e_kg_total": "{:.4g} kg"}
    for key, f in fmt.items():
        if metrics.get(key) is not None:
            parts.append(f"{key} " + f.format(metrics[key]))
    if metrics.get("energy_estimated") is not None:
        parts.append(f"energy {estimated_label(metrics['energy_estimated'])}")
    return " | ".join(parts)


def estimated_label(share: float | None) -> str:
    """How much of an energy figure comes from rated power rather than a meter (`energy_estimated`)."""
    if not share:
        return "measured"
    return "estimated" if share > 0.995 else f"{share:.0%} estimated"


def read_jsonl(path: str) -> list[dict]:
    """The rows of a metrics file. A last line cut short (a full disk, a kill mid-write) is left out: it is what
    a run leaves when it dies writing, and the next run's writer repairs it (`repair_jsonl`). Any other line that
    is not JSON is an error naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if n < len(lines):  # not the unterminated last line
                raise errors.InputError(f"{path}: line {n} is not a JSON row ({line[:60]!r}...)") from None
    return rows


def repair_jsonl(path: str) -> str | None:
    """Cut an unterminated last line off `path` (a write cut short), keeping it in `<path>.torn`; returns a line
    saying so, or None when there was nothing to repair."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":  # the common case, checked at every start without reading the file
            return None
        f.seek(0)
        data = f.read()
        keep = data.rfind(b"\n") + 1
        with open(path + ".torn", "ab") as torn:
            torn.write(data[keep:] + b"\n")
        f.truncate(keep)
    return f"{path}: its last line was cut short ({len(data) - keep} bytes, kept in {path}.torn); continuing after it"


def plot_run(workdir: str, out_name: str = "loss.png") -> str | None:
    """PNG of train/val loss and throughput from metrics.jsonl; returns its path (None without metrics)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(path)
    train = [r for r in rows if r.get("split") == "train" and "loss" in r]
    val = [r for r in rows if r.get("split") == "val" and "loss" in r]
    energy = [r for r in train if "energy_kwh_total" in r]
    tasks = [r for r in rows if r.get("split") == "tasks"]  # train.eval_tasks' scores
    panels = 2 + bool(energy) + bool(tasks)
    fig, (ax1, ax2, *more) = plt.subplots(1, panels, figsize=(5 * panels + 1, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax1.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
    ax1.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    ax1.legend()
    tput = [r for r in train if "tokens_per_s" in r]
    ax2.plot([r["step"] for r in tput], [r["tokens_per_s"] for r in tput])
    ax2.set(xlabel="step", ylabel="tokens/s", title="throughput")
    if energy:
        _plot_energy(more.pop(0), energy)
    if tasks:
        ax = more.pop(0)
        for name in sorted({k for r in tasks for k in r if "/" in k and not k.endswith("_stderr")}):
            points = [(r["step"], r[name]) for r in tasks if name in r]
            ax.plot(*zip(*points), "o-", label=name)
        ax.set(xlabel="step", ylabel="score", title="evaluation tasks")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = os.path.join(workdir, out_name)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _plot_energy(ax, rows: list[dict]) -> None:
    """Cumulative kWh, each window's average power on the right axis; the title has the totals and the label."""
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["energy_kwh_total"] for r in rows])
    ax.set(xlabel="step", ylabel="energy (kWh, cumulative)")
    power = [(r["step"], r["power_w"]) for r in rows if r.get("power_w") is not None]
    if power:
        right = ax.twinx()
        right.plot(*zip(*power), "--", color="tab:orange")
        right.set_ylabel("average power per window (W, dashed)")
    last = rows[-1]
    ax.set_title(f"energy {last['energy_kwh_total']:.3g} kWh, {last['co2e_kg_total']:.3g} kg CO2e "
                 f"({estimated_label(last.get('energy_estimated'))})")
