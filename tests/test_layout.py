"""The layout report's compiled view: the temp split into named parts from XLA's own buffer assignment, the
analytic model beside it, compile targets, and inspect_sharding's comparison of precisions with a plot."""

import json
import os
import runpy

import jax
import pytest

from neox_jax import layout, targets

from test_trainer import ROOT
from tiny_configs import tiny_config

STAGES, MICRO, ROWS, SEQ, HIDDEN, LAYERS = 2, 4, 2, 32, 64, 4


@pytest.fixture(scope="module")
def pipelined_report():
    """A master-weights pipeline (2 stages x data 2 x tensor 2, full remat) compiled for simulated CPUs."""
    c = tiny_config(2, 1, 2, 1, stage=STAGES, precision=dict(mode="master_weights"),
                    model=dict(hidden_size=HIDDEN, num_layers=LAYERS, dtype="bfloat16", remat_policy="full",
                               attention_impl="chunked", attention_chunk=8),
                    train=dict(batch_size=ROWS * MICRO * 2, micro_batches=MICRO, seq_len=SEQ))
    return layout.inspect(c, jax.devices()[:8])


@pytest.mark.slow
def test_breakdown_finds_what_the_pipeline_keeps(pipelined_report):
    """Each tick keeps one bf16 [rows, T, H] stage input and one [rows, T/S, H] head slice per device; the
    recomputed stage keeps one layer input per layer. XLA's buffers for them have exactly those sizes."""
    parts = pipelined_report["temp_breakdown"]
    ticks = MICRO + STAGES - 1
    assert parts[layout.STAGE_INPUTS] == ticks * ROWS * SEQ * HIDDEN * 2
    assert parts[layout.HEAD_INPUTS] == ticks * ROWS * (SEQ // STAGES) * HIDDEN * 2
    assert parts[layout.STORED] == (LAYERS // STAGES) * ROWS * SEQ * HIDDEN * 2
    temp = pipelined_report["compiled"]["temp"]
    assert sum(parts.values()) == temp
    assert 0 <= parts.get(layout.UNATTRIBUTED, 0) < 0.25 * temp
    total = pipelined_report["per_device_bytes"]["total: compiled peak estimate"]
    assert pipelined_report["model"]["peak"] == pytest.approx(total, rel=0.15)
    assert pipelined_report["precision"] == "master_weights"
    assert {e["dtype"] for e in pipelined_report["params"]} == {"bfloat16"}
    assert any(e["name"].startswith("master/") and e["dtype"] == "float32" for e in pipelined_report["optimizer"])
    text = layout.format_report(pipelined_report)
    assert "compiled temp at its peak, by part" in text and layout.STAGE_INPUTS in text


def test_targets_are_checked_before_any_backend_starts():
    assert targets.parse("tpu:v5p:4x4x4").device_count == 64
    assert targets.parse("gpu:a100-40gb:96").device_bytes == targets.GPU_KINDS["a100-40gb"]["memory"]
    for bad in ("tpu:v5p", "gpu:a100:8", "gpu:h200:0", "cuda"):
        with pytest.raises(targets.TargetError, match="expected cpu, tpu:VERSION:TOPOLOGY"):
            targets.parse(bad)


def test_a_target_without_its_plugin_is_one_clear_error():
    try:
        import libtpu  # noqa: F401
        pytest.skip("libtpu is installed here: the TPU target works")
    except ImportError:
        pass
    with pytest.raises(targets.TargetError, match=r'run `make venv-tpu`, then this command with \.venv-tpu/bin/python'):
        targets.devices(targets.parse("tpu:v5p:2x2x1"))


@pytest.mark.slow
def test_inspect_compares_precisions_and_plots(tmp_path, capsys):
    """scripts/inspect_sharding.py's main in this process (test_sharding.py runs the script as a process)."""
    plot = tmp_path / "memory.png"
    main = runpy.run_path(os.path.join(ROOT, "scripts", "inspect_sharding.py"), run_name="inspect_sharding")["main"]
    main(["--config", os.path.join(ROOT, "configs", "tiny.py"),
          "--mesh", "data=4", "--config.model.dtype=bfloat16", "--config.precision.mode=master_weights",
          "--config.model.vocab_size=512", "--config.model.num_layers=2", "--compare", "precision=fp32_params",
          "--format", "json", "--plot", str(plot), "--device_memory", "0.01"])
    result = json.loads(capsys.readouterr().out)
    first, (same_mesh,) = result["layout"], [c["layout"] for c in result["compare"]]
    assert (first["precision"], same_mesh["precision"]) == ("master_weights", "fp32_params")
    assert first["mesh"] == same_mesh["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    # 16-bit params are half the fp32 params' bytes; the fp32 master makes the optimizer state half again larger.
    assert first["per_device_bytes"]["params"] * 2 == same_mesh["per_device_bytes"]["params"]
    assert first["per_device_bytes"]["optimizer"] == pytest.approx(1.5 * same_mesh["per_device_bytes"]["optimizer"],
                                                                   rel=1e-3)
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_a_step_the_compiler_refuses_is_reported_not_raised():
    """The TPU compiler refuses a step that does not fit the chip: the report keeps the state, the temp it asked
    for and the compiler's words, and --compare goes on to the next layout."""
    report = {"per_device_bytes": {"params": 3 * 2**30, "optimizer": 2**30}, "notes": []}
    refused = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required "
                                         "for HLO temporaries (35.00G) exceeds available HBM (30.75G).")
    stats = layout._refused(refused, report)
    report = layout.add_compiled_memory(report, stats)
    assert report["per_device_bytes"]["total: compiled peak estimate"] == 4 * 2**30 + 35 * 2**30
    assert "refused" in report and "exceeds available HBM" in report["notes"][0]
    with pytest.raises(jax.errors.JaxRuntimeError):  # any other compile error still surfaces
        layout._refused(jax.errors.JaxRuntimeError("INVALID_ARGUMENT: bad"), report)
