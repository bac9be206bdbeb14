"""scripts/benchmark.py end to end on tiny shapes: the rows each subcommand promises (speed itself is measured
by running the benchmarks, not asserted here)."""

import functools
import json
import runpy

import pytest

from neox_jax.bench import device, timing

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
                           "FATAL: generate: --config.FIELD=VALUE overrides are for train and energy only "
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
    benchmark("train", "--config", "configs/tiny.py", "--config.model.num_layers=1", "--config.train.batch_size=8",
              "--config.train.seq_len=16", "--steps", "1", "--warmup", "1", "--windows", "2", "--compare-hf",
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
    # the read rate over a 16 MiB array instead of 256 MiB: 14 s of bf16 sums on CPU for a figure the test ignores
    monkeypatch.setattr(device, "memory_bandwidth_gbs", functools.partial(device.memory_bandwidth_gbs, 2**24, 3))
    benchmark("generate", "--config", "configs/tiny.py", "--dtype", "float32", "--batches", "1,2",
              "--prompt-len", "4", "--new-tokens", "4", "--layer-loops", "scan,unstacked", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [(r["impl"], r["batch"]) for r in rows] == [("neox_jax", 1), ("neox_jax_unstacked", 1),
                                                       ("neox_jax", 2), ("neox_jax_unstacked", 2)]
    for r in rows:
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * r["decode_steps_per_s"])
        assert 0 < r["fraction_of_roofline"] == pytest.approx(r["decode_steps_per_s"] / r["roofline_steps_per_s"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        benchmark("generate", "--config", "configs/tiny.py", "--batches", "1", "--layer-loops", "scannn")
    assert e.value.code == 2 and "FATAL: layer loop 'scannn'" in capsys.readouterr().err


@pytest.mark.slow
def test_energy_benchmark_interleaves_off_and_on(tmp_path, capsys):
    out = tmp_path / "energy.json"
    benchmark("energy", "--config.model.num_layers=1", "--config.train.batch_size=8", "--config.train.seq_len=16",
              "--config.train.log_every=2", "--steps", "4", "--pairs", "2", "--json", str(out))
    r = json.loads(out.read_text())
    assert len(r["step_time_off"]) == len(r["step_time_on"]) == 2 and r["steps_per_window"] == 4
    rel = [(b - a) / a for a, b in zip(r["step_time_off"], r["step_time_on"])]
    assert r["overhead_median"] == pytest.approx(sorted(rel)[0] / 2 + sorted(rel)[1] / 2)
    assert r["joules_per_token"] > 0 and r["window_ms"] > 0 and r["backend"].startswith("codecarbon")
    assert "overhead (wall): median of pairs" in capsys.readouterr().out


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
