"""Per-device memory before the first step: the analytic model against XLA's compile in every remat policy, the check
that stops a run its devices cannot hold (naming settings that the compiler confirms fit), and the refusal of a
run that names no data."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from neox_jax import config as cfg, fit, layout, memory, setup, sharding, targets, train
from neox_jax.data.dataset import train_spec

from configs import pythia
from conftest import ROOT, SMALL_VOCAB_FLAGS, script_env
from tiny_configs import tiny_config

# Big enough that activations, not fixed overheads, set the peak: 8 sequences of 256 per device, 4 layers.
SHAPE = dict(model=dict(hidden_size=128, num_layers=4, num_heads=4, vocab_size=512, max_position_embeddings=256,
                        dtype="bfloat16"),
             train=dict(batch_size=16, micro_batches=1, seq_len=256), precision=dict(mode="master_weights"))


with open(os.path.join(ROOT, "tests", "fixtures", "memory", "pythia_compiled.json")) as f:
    COMPILED = json.load(f)["rows"]


@pytest.mark.parametrize("row", COMPILED, ids=lambda r: f"{r['platform']}-{r['size']}-{r['remat_policy']}")
def test_the_model_follows_the_compilers_for_pythia_in_every_remat_policy(row):
    """The CUDA compiler's and XLA:CPU's peaks for pythia-160m, 1b and 1.4b as trained, each remat policy, recorded
    from `scripts/inspect_sharding.py` (tests/fixtures/memory): the model stays within 15%."""
    size = row["size"]
    c = cfg.from_spec(os.path.join(ROOT, "configs", f"pythia.py:{size}"), {"model.remat_policy": row["remat_policy"]})
    c = targets.stand_in(c, row["platform"])[0]
    run = setup.build(c, _mesh_of(c, pythia.devices(size)))
    model = memory.analytic_memory(run, row["platform"])["peak"]
    assert model == pytest.approx(row["compiled_peak"], rel=0.15)


def _mesh_of(config, count):
    """A mesh of `count` devices for shapes only: the 8 simulated CPUs repeated (nothing is placed on it)."""
    devices = np.array((jax.devices() * (count // len(jax.devices()) + 1))[:count])
    return sharding.make_mesh(config, list(devices))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "dots"])
def test_the_model_follows_a_live_compile(policy):
    """The same on a compile made here: XLA:CPU's peak and the model within 15%, and the breakdown's part for what
    the policy keeps is named after that policy."""
    c = tiny_config(2, zero_stage=1, **{**SHAPE, "model": {**SHAPE["model"], "remat_policy": policy}})
    report = layout.inspect(c, jax.devices()[:2])
    compiled = report["per_device_bytes"]["total: compiled peak estimate"]
    assert report["model"]["peak"] == pytest.approx(compiled, rel=0.15), report["model"]["parts"]
    assert memory.KEPT[policy] in layout.format_report(report)


@pytest.fixture(scope="module")
def head_heavy():
    """A run whose peak is the output head's fp32 logits: slicing the head or more micro-batches would fit."""
    c = tiny_config(2, zero_stage=1, model=dict(vocab_size=50277, max_position_embeddings=128),
                    train=dict(batch_size=16, micro_batches=1, seq_len=128))
    run = setup.build(c, sharding.make_mesh(c, jax.devices()[:2]))
    return run, train.compile_train_step(run).memory_analysis()


@pytest.mark.slow
def test_a_step_over_the_device_memory_stops_naming_settings_that_fit(head_heavy):
    run, stats = head_heavy
    peak = fit.compiled_peak(stats)
    limit = int(0.6 * peak)
    with pytest.raises(fit.DoesNotFitError) as e:
        fit.check(run, stats, limit, say=print)
    line = str(e.value)
    assert f"{peak / 1e9:.2f} GB per device" in line and f"{limit / 1e9:.2f} GB" in line
    assert "train.memory_check=false" in line and "--config." in line
    best = fit.settings_that_fit(run, limit, peak)[0]
    assert best.flags() in line
    # the compiler agrees: the first suggestion, compiled, fits the limit
    c = cfg.override(run.config, best.overrides)
    other = setup.build(cfg.validate(c), sharding.make_mesh(c, jax.devices()[:2]))
    assert fit.compiled_peak(train.compile_train_step(other).memory_analysis()) <= limit


def test_a_step_near_the_limit_warns_and_one_that_fits_says_its_figures():
    """Only the compiled peak matters until it does not fit (then the run is read, to suggest settings), so any
    compiled executable serves: a small matmul compiles in a blink, a train step in seconds."""
    x = jax.ShapeDtypeStruct((2048, 2048), np.float32)  # 17 MB (only compiled): its figures in GB are not 0.00
    run, stats = None, jax.jit(lambda a: a @ a.T + 1).lower(x).compile().memory_analysis()
    peak = fit.compiled_peak(stats)
    assert peak >= 2 * 2048 * 2048 * 4  # its argument and its output
    said = []
    line = fit.check(run, stats, int(peak / 0.95), said.append)
    assert len(said) == 1 and said[0].startswith("warning:") and "90%" in said[0]
    said.clear()
    line = fit.check(run, stats, 4 * peak, said.append)
    assert not said and f"{peak / 1e9:.2f} GB per device" in line
    assert "reports no limit" in fit.check(run, stats, None, said.append)


def test_a_config_without_data_is_refused_unless_it_asks_for_the_sample():
    c = cfg.from_spec(os.path.join(ROOT, "configs", "pythia.py:160m"))
    with pytest.raises(ValueError, match=r"data.train_paths: empty.*--config.data.train_paths=PREFIX.*"
                                         r"data.bundled_sample=true"):
        train_spec(c)
    assert train_spec(cfg.override(c, {"data.train_paths": "/data/pile"})) == "/data/pile"
    assert train_spec(cfg.override(c, {"data.bundled_sample": True})).endswith("train.jsonl.zst")
    assert train_spec(cfg.from_spec(os.path.join(ROOT, "configs", "tiny.py"))).endswith("train.jsonl.zst")


def _train(tmp_path, *flags):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--workdir",
                           str(tmp_path / "run"), *flags], capture_output=True, text=True, cwd=ROOT, env=script_env(),
                          timeout=600)


@pytest.mark.slow
def test_train_script_checks_memory_before_the_first_step(tmp_path):
    tiny = ["--config", os.path.join(ROOT, "configs", "tiny.py"), *SMALL_VOCAB_FLAGS, "--config.train.steps=2",
            "--config.train.eval_every=0", "--config.energy.track=false"]
    out = _train(tmp_path, *tiny, "--config.train.device_memory_gb=0.04")
    assert out.returncode == 2, out.stderr[-2000:]
    fatal = [line for line in out.stderr.splitlines() if line.startswith("FATAL:")]
    assert len(fatal) == 1 and "GB per device, more than the 0.04 GB" in fatal[0] and "--config." in fatal[0]
    assert "devices: 1 cpu" in out.stdout and "mesh data 1 x fsdp 1 x tensor 1" in out.stdout
    assert os.listdir(tmp_path / "run") == [".lock.0"]  # nothing written but the workdir's lock
    out = _train(tmp_path, *tiny, "--config.train.device_memory_gb=0.04", "--config.train.memory_check=false")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "memory check off" in out.stdout
    out = _train(tmp_path, "--config", os.path.join(ROOT, "configs", "pythia.py:14m"))
    assert out.returncode == 2 and "FATAL: config field data.train_paths: empty" in out.stderr


@pytest.mark.slow
def test_presets_without_compiling_give_each_size_its_devices_and_the_model():
    """`inspect_sharding.py --presets configs/pythia.py --nocompile`: one row per size on the device count it was
    trained on, no compiled figures, and the model's peak above the state it holds (it was a KeyError)."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "inspect_sharding.py"), "--presets",
                           os.path.join(ROOT, "configs", "pythia.py"), "--nocompile", "--format", "json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=script_env())
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [r["config"] for r in rows] == [f"pythia.py:{s}" for s in pythia.SIZES]
    for size, r in zip(pythia.SIZES, rows):
        assert r["devices"] == pythia.devices(size)
        assert r["peak"] is None and r["fits"] is None and r["error"] is None
        assert r["model"] > r["params"] + r["optimizer"]


def test_presets_need_their_device_count(capsys):
    """In a process whose JAX already has fewer CPU devices than a preset was trained on: one error, not a
    silently smaller mesh."""
    from tiny_configs import script

    with pytest.raises(SystemExit) as exit_:
        script("inspect_sharding").main(["--presets", os.path.join(ROOT, "configs", "pythia.py"), "--nocompile"])
    assert exit_.value.code == 2
    assert "trained on 32 devices but --target cpu has 8" in capsys.readouterr().err
