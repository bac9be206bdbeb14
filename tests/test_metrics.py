"""FLOPs / MFU against hand counts, the unigram baseline, and the metric writers (JSONL, TensorBoard, W&B, plot)."""

import glob
import json
import math
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

from neox_jax import config as cfg
from neox_jax import metrics
from neox_jax.config import ConfigError

# GPT-NeoX-20B as in the paper / configs/20B.yml, written out here rather than read from configs/neox_20b.py.
L, H, HEADS, V, S = 44, 6144, 64, 50432, 2048


def _neox_20b_model():
    m = cfg.model_defaults()
    m.num_layers, m.hidden_size, m.num_heads, m.padded_vocab_size = L, H, HEADS, V
    return m


def test_palm_flops_match_a_hand_count_for_20b():
    f = 4 * H  # MLP width
    matmul_fwd_per_layer = (
        2 * H * 3 * H  # fused query/key/value projection
        + 2 * S * H  # attention scores q.k over all S positions, all heads
        + 2 * S * H  # attention-weighted sum of values
        + 2 * H * H  # attention output projection
        + 2 * H * f + 2 * f * H  # MLP up and down
    )
    matmul_fwd = L * matmul_fwd_per_layer + 2 * H * V  # + the output head
    # parameters outside matmuls: the embedding table, every bias, every LayerNorm (scale + bias)
    other_params = V * H + L * (3 * H + H + f + H) + L * 2 * 2 * H + 2 * H
    hand = 3 * matmul_fwd + 6 * other_params  # backward = 2x forward
    assert metrics.flops_per_token(_neox_20b_model(), S) == pytest.approx(hand, rel=1e-12)
    # sanity: ~20.6 B parameters, and 6N dominates
    assert cfg.param_count(_neox_20b_model()) == pytest.approx(20.55e9, rel=0.01)


def test_neox_flops_formula_is_the_literal_expression():
    # megatron/utils.py (GPT-NeoX): 24 * f * B * S * L * H^2 * (1 + S / (6 H) + V / (16 L H)), f = 3 without
    # activation checkpointing; per token = / (B * S)
    batch = 1536
    per_step = 24 * 3 * batch * S * L * H ** 2 * (1.0 + S / (6.0 * H) + V / (16.0 * L * H))
    got = metrics.flops_per_token(_neox_20b_model(), S, convention="neox")
    assert got == pytest.approx(per_step / (batch * S), rel=1e-12)
    # the two conventions agree to within a few percent at this size
    assert got == pytest.approx(metrics.flops_per_token(_neox_20b_model(), S), rel=0.05)
    with pytest.raises(ValueError, match="palm"):
        metrics.flops_per_token(_neox_20b_model(), S, convention="kaplan")


def test_mfu_arithmetic():
    # 8 H100s at 989 TFLOP/s: 1e5 tokens/s of a 20B model at 1.3e11 FLOPs/token is 1.3e16 FLOP/s
    assert metrics.mfu(1e5, 1.3e11, 8, 989.0) == pytest.approx(1.3e16 / (8 * 989e12))
    assert metrics.mfu(1e5, 1.3e11, 8, None) is None


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5p", 459.0),
    ("cpu", None),
])
def test_device_peak_lookup(kind, peak):
    assert metrics.device_peak_tflops(kind) == peak


def test_device_peak_override_wins():
    assert metrics.device_peak_tflops("cpu", override=1.5) == 1.5
    assert metrics.device_peak_tflops("NVIDIA H100 80GB HBM3", override=800) == 800


def test_unigram_cross_entropy_by_hand():
    train = np.array([0, 0, 1, 2])
    # no smoothing: p = (1/2, 1/4, 1/4, 0)
    assert metrics.unigram_cross_entropy([train], np.array([0, 1]), 4, alpha=0.0) == pytest.approx(
        -(math.log(0.5) + math.log(0.25)) / 2)
    # add-one: counts (3, 2, 2, 1) / 8, so an unseen id stays finite
    assert metrics.unigram_cross_entropy([train], np.array([3]), 4) == pytest.approx(-math.log(1 / 8))
    # two datasets mixed 3:1 -> p = 0.75 * (1, 0) + 0.25 * (0, 1)
    ce = metrics.unigram_cross_entropy([np.array([0]), np.array([1])], np.array([0, 1]), 2, weights=[3, 1],
                                       alpha=0.0)
    assert ce == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)


def _tensorboard_scalars(logdir):
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(f"{logdir}/events.out.tfevents.*"):
        data = open(path, "rb").read()
        i = 0
        while i < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


def test_writers_jsonl_tensorboard_and_plot(tmp_path):
    w = metrics.Writers(str(tmp_path))
    for step in (1, 2, 3):
        w.write(step, {"loss": 10.0 - step, "tokens_per_s": 100.0 * step, "mfu": None})
    w.write(3, {"loss": 6.5}, prefix="val")
    w.close()
    rows = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [(r["split"], r["step"], r["loss"]) for r in rows] == [
        ("train", 1, 9.0), ("train", 2, 8.0), ("train", 3, 7.0), ("val", 3, 6.5)]
    assert "mfu" not in rows[0]  # None values are left out
    scalars = _tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert scalars["train/loss"] == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert scalars["val/loss"] == [(3, 6.5)]
    png = metrics.plot_run(str(tmp_path))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert metrics.plot_run(str(tmp_path / "nothing")) is None


def test_tensorboard_writer_leaves_torch_unimported(tmp_path):
    """tensorboardX imports torch whenever it is installed (over a CPU-second a run); the writers open it without,
    and the process can still import torch afterwards."""
    pytest.importorskip("torch")
    code = ("import sys; from neox_jax import metrics; w = metrics.Writers(sys.argv[1]); w.write(1, {'loss': 2.0}); "
            "w.close(); print('torch' in sys.modules); import torch; print(torch.tensor([3]).item())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "3"], out.stdout + out.stderr
    assert _tensorboard_scalars(str(tmp_path / "tensorboard"))["train/loss"] == [(1, 2.0)]


def test_disabled_writers_write_nothing(tmp_path):
    w = metrics.Writers(str(tmp_path / "w"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "w").exists()


def test_format_line():
    line = metrics.format_line(20, 600, {"loss": 5.4321, "lr": 1e-3, "mfu": 0.123, "tokens_per_s": 12345.6,
                                         "step_time": None})
    assert line == "step     20/600 | loss 5.4321 | lr 1.00e-03 | tokens_per_s 12,346 | mfu 12.3%"


def test_wandb_requested_but_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match=r"train\.wandb_project='proj'.*not installed"):
        metrics.Writers(str(tmp_path), wandb_project="proj")


def test_wandb_logs_every_metric(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs["project"], kwargs["resume"]))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    w = metrics.Writers(str(tmp_path), wandb_project="proj", run_config={"train": {"steps": 3}})
    w.write(2, {"loss": 4.0}, prefix="val")
    w.close()
    assert calls == [("init", "proj", "allow"), ("log", 2, {"val/loss": 4.0}), ("finish",)]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 4.0
