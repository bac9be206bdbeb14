"""scripts/benchmark.py end to end on tiny shapes: the rows each subcommand promises (speed itself is measured
by running the benchmarks, not asserted here)."""

import functools
import json
import re
import runpy
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import script_env
from tiny_sp512 import SMALL_VOCAB_FLAGS
from tiny_sp512 import SPEC as SMALL_TINY

from neox_jax.bench import device, timing
from neox_jax.bench import generate as gen_bench
from neox_jax.bench import train as train_bench

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def benchmark(*argv):
    main = runpy.run_path(str(ROOT / "scripts" / "benchmark.py"), run_name="benchmark")["main"]
    main(list(argv))


def test_best_window_is_the_fastest_run_of_steps(monkeypatch):
    clock = iter([0.0, 4.0, 10.0, 12.0, 20.0, 26.0])  # windows of 4, 2 and 6 seconds over 2 steps each
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    assert timing.best_window(lambda: calls.append(1), lambda out: None, steps=2, windows=3) == 1.0
    assert len(calls) == 6


def test_train_benchmark_rejects_bad_variants_before_timing(capsys):
    for variant, message in (("loss_chunks", "--variant expects field=value, got 'loss_chunks'"),
                             ("train.loss_chunk=2", "unknown config field 'train.loss_chunk'; did you mean "
                                                    "'train.loss_chunks'")):
        with pytest.raises(SystemExit) as e:
            benchmark("train", "--preset", "cpu-tiny", "--variant", variant)
        out = capsys.readouterr()
        assert e.value.code == 2 and out.err.startswith("FATAL: ") and message in out.err
        assert "row " not in out.out  # nothing was timed


def test_config_flags_go_only_to_commands_that_take_a_config(capsys):
    for argv, message in ((("data", "--config", "configs/tiny.py"), "FATAL: --config: this command takes no config"),
                          (("generate", "--config.model.dtype=float32"),
                           "FATAL: generate: --config.FIELD=VALUE overrides are for train, energy and checkpoint only "
                           "(got --config.model.dtype)"),
                          (("train", "--preset", "cpu-tiny", "--config.train.stepz=2"),
                           "unknown config field 'train.stepz'; did you mean 'train.steps'")):
        with pytest.raises(SystemExit) as e:
            benchmark(*argv)
        out = capsys.readouterr()
        assert e.value.code == 2 and message in out.err and "row " not in out.out


@pytest.mark.slow
def test_train_benchmark_rows_and_hf_ratio(tmp_path, capsys):
    out = tmp_path / "train.json"
    benchmark("train", "--config", "configs/tiny.py", *SMALL_VOCAB_FLAGS, "--config.model.num_layers=1",
              "--config.train.batch_size=8", "--config.train.seq_len=16", "--steps", "1", "--warmup", "1",
              "--windows", "2", "--compare-hf",
              "--variant", "train.loss_chunks=2", "--json", str(out), "--profile", str(tmp_path / "trace"))
    rows = json.loads(out.read_text())
    assert [r["impl"] for r in rows] == ["neox_jax", "neox_jax[loss_chunks=2]", "hf_torch_eager"]
    hf = rows[-1]
    for r in rows:
        assert (r["batch"], r["seq_len"], r["params"]) == (8, 16, hf["params"])
        assert r["tokens_per_s"] == pytest.approx(8 * 16 / r["step_time"])
        assert r["vs_hf_eager"] == pytest.approx(r["tokens_per_s"] / hf["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "vs HF" in printed and "where the step's time goes" in printed
    assert_clean_table(printed.split("where the step's time goes")[0])

    # the trace of the first row's steps, summarised again by the profile subcommand
    benchmark("profile", str(tmp_path / "trace" / "configs_tiny.py"), "--steps", "2", "--json", str(tmp_path / "p.json"))
    groups = json.loads((tmp_path / "p.json").read_text())
    assert groups and all(g["total_ms"] > 0 and g["events"] for g in groups)
    assert capsys.readouterr().out.startswith("== ")
    with pytest.raises(SystemExit):
        benchmark("profile", str(tmp_path / "missing"))
    assert "no *.trace.json.gz under" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_benchmark_rows_per_layer_loop(tmp_path, capsys, monkeypatch):
    out = tmp_path / "generate.json"
    # the read rate over a 16 MiB array instead of 256 MiB: seconds of sums on CPU for a figure checked by hand above
    monkeypatch.setattr(device, "memory_bandwidth_gbs", functools.partial(device.memory_bandwidth_gbs, 2**24, 3))
    benchmark("generate", "--config", SMALL_TINY, "--dtype", "float32", "--batches", "1,2",
              "--prompt-len", "4", "--new-tokens", "4", "--layer-loops", "scan,unstacked", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in rows] == [("neox_jax", 1), ("neox_jax_unstacked", 1),
                                                       ("neox_jax", 2), ("neox_jax_unstacked", 2)]
    for r in rows:
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * r["decode_steps_per_s"])
        assert 0 < r["fraction_of_roofline"] == pytest.approx(r["decode_steps_per_s"] / r["roofline_steps_per_s"])
    assert_clean_table(capsys.readouterr().out)
    with pytest.raises(SystemExit) as e:
        benchmark("generate", "--config", "configs/tiny.py", "--batches", "1", "--layer-loops", "scannn")
    assert e.value.code == 2 and "FATAL: layer loop 'scannn'" in capsys.readouterr().err


@pytest.mark.slow
def test_energy_benchmark_interleaves_off_and_on(tmp_path, capsys):
    out = tmp_path / "energy.json"
    benchmark("energy", *SMALL_VOCAB_FLAGS, "--config.model.num_layers=1", "--config.train.batch_size=8",
              "--config.train.seq_len=16", "--config.train.log_every=2", "--steps", "4", "--pairs", "2", "--json",
              str(out))
    r = json.loads(out.read_text())
    assert len(r["step_time_off"]) == len(r["step_time_on"]) == 2 and r["steps_per_window"] == 4
    rel = [(b - a) / a for a, b in zip(r["step_time_off"], r["step_time_on"])]
    assert r["overhead_median"] == pytest.approx(sorted(rel)[0] / 2 + sorted(rel)[1] / 2)
    assert r["joules_per_token"] > 0 and r["window_ms"] > 0 and r["backend"].startswith("codecarbon")
    assert "overhead (wall): median of pairs" in capsys.readouterr().out


@pytest.mark.slow
def test_checkpoint_benchmark_times_both_saves(tmp_path, capsys):
    out = tmp_path / "ckpt.json"
    benchmark("checkpoint", "--config", "configs/tiny.py", "--config.model.num_layers=1",
              "--config.model.hidden_size=64", "--config.model.num_heads=4", "--repeats", "1", "--dir", str(tmp_path),
              "--json", str(out))
    (row,) = json.loads(out.read_text())
    assert row["orbax_s"] > 0 and row["checkpointer_s"] > 0 and row["checksums_alone_s"] > 0
    assert row["extra"] == pytest.approx(row["checkpointer_s"] / row["orbax_s"] - 1)
    assert 0.003 < row["state_gb"] < 0.1 and "Checkpointer save s" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]  # its saves removed


@pytest.mark.slow
def test_eval_benchmark_rows_on_a_tiny_model(tmp_path, capsys):
    """Both backends on the same random model and tasks: rates, their ratio, the same scores, padding overhead."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("torch")
    out = tmp_path / "eval.json"
    benchmark("eval", "--config", "configs/tiny.py", "--tasks", "lambada_openai=6,piqa=3", "--batch-size", "8",
              "--passes", "1", "--model-dir", str(tmp_path / "hf"), "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["task"], r["requests"]) for r in rows] == [("lambada_openai", 6), ("piqa", 6)]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["neox_jax_requests_per_s"] / r["hf_requests_per_s"])
        assert r["neox_jax_requests_per_s"] == pytest.approx(r["requests"] / r["neox_jax_s"])
        assert r["identical_accuracies"] and r["max_abs_loglik_diff"] < 1e-3
        assert r["padding_overhead"] == pytest.approx(r["positions"] / r["distinct_tokens"]) and r["positions"] >= 1
        assert set(r["scores"]) >= {"acc"}
    assert "neox_jax req/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        benchmark("eval", "--tasks", "piqa=all")
    assert e.value.code == 2 and "FATAL: eval: --tasks expects TASK[=LIMIT]" in capsys.readouterr().err


def assert_clean_table(printed: str):
    """What a table may show: figures, or "-" where there is none; no nan, no share of a bound above 100%, and
    no progress lines (those go to stderr)."""
    assert "nan" not in printed.lower() and "row {" not in printed
    shares = [float(p) for p in re.findall(r"(\d[\d,]*\.?\d*)%", printed.replace(",", ""))]
    assert all(0 <= p <= 100 for p in shares), shares


def test_roofline_fraction_is_the_formula_by_hand():
    """Bytes a decode step reads: the weights but the input embedding (one row per sequence of it), plus the mean
    filled KV cache; the roofline is the read rate over them."""
    m = types.SimpleNamespace(num_layers=2, hidden_size=8, dtype="bfloat16")
    params = {"embed_in": np.zeros((100, 8), np.float32), "embed_out": np.zeros((8, 100), np.float32),
              "layers": {"w": np.zeros((2, 8, 8), np.float16)}}
    batch, prompt, new = 3, 10, 4
    weights = 8 * 100 * 4 + 2 * 8 * 8 * 2 + batch * 8 * 4
    kv = 2 * 2 * batch * (prompt + new / 2) * 8 * 2  # k and v, 2 layers, 12 positions on average, bf16
    step_bytes = gen_bench.decode_bytes_per_step(m, params, batch, prompt, new)
    assert step_bytes == weights + kv
    assert gen_bench.roofline_steps_per_s(step_bytes, 10.0) == pytest.approx(10e9 / (weights + kv))


def test_tables_show_dashes_for_missing_figures():
    """CPU has no memory_stats and no peak, a run without --compare-hf no HF ratio, the HF generate row no
    roofline, and a decode that beat its bound has no fraction of it."""
    train_row = {"name": "configs/tiny.py", "impl": "neox_jax", "device": "cpu", "batch": 8, "seq_len": 16,
                 "tokens_per_s": 1000.0, "step_time": 0.128, "mfu_measured_peak": None, "mfu_datasheet_peak": None,
                 "vs_hf_eager": None}
    table = train_bench.format_rows([train_row])
    assert_clean_table(table)
    assert table.splitlines()[-1].split()[-4:] == ["-", "-", "-", "-"]
    gen_rows = [{"impl": "neox_jax", "batch": 1, "prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 5.0,
                 "decode_steps_per_s": 5.0, "roofline_steps_per_s": 0.4, "fraction_of_roofline": 12.5},
                {"impl": "neox_jax", "batch": 2, "prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 5.0,
                 "decode_steps_per_s": 2.5, "roofline_steps_per_s": 10.0, "fraction_of_roofline": 0.25},
                {"impl": "hf_generate", "batch": 1, "prefill_tokens_per_s": 10.0, "decode_tokens_per_s": 2.0,
                 "decode_steps_per_s": 2.0}]
    table = gen_bench.format_rows(gen_rows)
    assert_clean_table(table)
    lines = table.splitlines()
    assert lines[2].split()[-1] == "-" and lines[3].split()[-1] == "25.0%" and lines[4].split()[-2:] == ["-", "-"]
    assert "no roofline applies" in lines[-1]


@pytest.mark.slow
def test_train_benchmark_table_on_cpu(capsys):
    """A run on CPU (no memory stats, no peak, no HF): the table has dashes, the progress lines went to stderr."""
    benchmark("train", "--config", "configs/tiny.py", *SMALL_VOCAB_FLAGS, "--config.model.num_layers=1",
              "--config.train.batch_size=8", "--config.train.seq_len=16", "--steps", "1", "--warmup", "1",
              "--windows", "1")
    out = capsys.readouterr()
    assert_clean_table(out.out)
    assert "neox_jax" in out.out and out.err.count("row {") == 1


@pytest.mark.slow
def test_profile_of_a_training_run_as_documented(tmp_path, capsys):
    """README's sequence: a tiny run with train.profile_steps set, then `benchmark.py profile WORKDIR/profile
    --steps STOP-START`; a workdir without a trace says how to write one."""
    env = script_env(PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", "configs/tiny.py",
                           *SMALL_VOCAB_FLAGS, "--workdir", str(tmp_path / "run"), "--config.train.steps=4",
                           "--config.train.profile_steps=1,3"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    benchmark("profile", str(tmp_path / "run" / "profile"), "--steps", "2")
    assert capsys.readouterr().out.startswith("== ")
    (tmp_path / "untraced").mkdir()
    with pytest.raises(SystemExit) as e:
        benchmark("profile", str(tmp_path / "untraced"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "train.profile_steps" in err
    assert benchmark_module().PROFILE_RUN in err


def benchmark_module():
    return types.SimpleNamespace(**runpy.run_path(str(ROOT / "scripts" / "benchmark.py"), run_name="benchmark"))
