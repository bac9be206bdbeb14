"""End-to-end training on a tiny model: exact resume after SIGKILL, SIGTERM preemption and resume on another mesh,
non-finite abort, shape-mismatch and config-typo errors, retention, metrics files, export of params."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jax.sharding import NamedSharding, PartitionSpec

from conftest import script_env
from neox_jax import checkpoint as ckpt
from neox_jax import config as cfg, convert, metrics, optim, setup, sharding, trainer, weights
from neox_jax import model as model_lib
from neox_jax import train as train_lib
from tiny_configs import script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 8

# 2 layers x hidden 64 at seq 32, batch 8 (one row per simulated device). The vocabulary is padded to 50,688
# (a multiple of 128 x 4) so the same checkpoint also loads with mesh.tensor=4.
OVERRIDES = {
    "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, "model.padded_vocab_size": 50688,
    "train.steps": STEPS, "train.batch_size": 8, "train.seq_len": 32, "train.log_every": 1, "train.eval_every": 4,
    "train.eval_batches": 1, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.keep_every": 4,
    "optimizer.warmup_steps": 2, "optimizer.lr": 1e-3,
}


def _config(**extra):
    return cfg.from_spec(TINY, {**OVERRIDES, **extra})


def _flags(**extra):
    return [f"--config.{k}={v}" for k, v in {**OVERRIDES, **extra}.items()]


def _env(devices=8):
    env = script_env(devices)  # conftest's XLA flags, as in this process: runs compare bit for bit
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # as conftest sets in this process
    return env


def _start(workdir, *extra_flags):
    return subprocess.Popen([sys.executable, TRAIN, "--workdir", str(workdir), *_flags(), *extra_flags], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _train_losses(workdir) -> dict[int, list[float]]:
    """step -> the losses logged for it (a step logged twice was run twice: before a kill and after resume)."""
    out = {}
    for row in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if row["split"] == "train":
            out.setdefault(row["step"], []).append(row["loss"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the losses every other run must reproduce."""
    workdir = tmp_path_factory.mktemp("reference")
    last = trainer.train(_config(**{"train.profile_steps": "2,3"}), str(workdir))
    losses = {s: v[0] for s, v in _train_losses(workdir).items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return workdir, losses, last


@pytest.mark.slow
def test_reference_run_writes_metrics_plot_checkpoints(reference):
    workdir, losses, last = reference
    assert losses[STEPS] < losses[1]
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [4, 8] and last["val_loss"] == val[-1]["loss"]
    assert last["unigram_val_loss"] > 5
    train_row = next(r for r in rows if r["split"] == "train" and r["step"] == 3)
    for key in ("loss", "ppl", "lr", "grad_norm", "tokens_per_s", "step_time", "loss_scale", "skipped_steps"):
        assert key in train_row
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert open(os.path.join(workdir, "loss.png"), "rb").read(4) == b"\x89PNG"
    # energy: every line has its window and the run's totals; the totals are the sum of the windows
    train_rows = [r for r in rows if r["split"] == "train"]
    assert all(r["energy_kwh"] >= 0 and "co2e_kg_total" in r for r in train_rows)
    assert sum(r["energy_kwh"] for r in train_rows) == pytest.approx(train_rows[-1]["energy_kwh_total"])
    assert last["energy_kwh_total"] == train_rows[-1]["energy_kwh_total"] > 0
    assert os.path.exists(os.path.join(workdir, "energy.json"))
    traces = [f for _, _, files in os.walk(os.path.join(workdir, "profile")) for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    # checkpoints every 2 steps, the last 2 kept plus every multiple of 4
    assert ckpt.Checkpointer(str(workdir)).all_steps() == [4, 6, 8]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(reference, tmp_path, capsys):
    _, ref, _ = reference
    # checkpoint every step so one exists early; kill as soon as one is complete (a save may be cut short)
    proc = _start(tmp_path, "--config.train.checkpoint_every=1")
    ckdir = ckpt.checkpoint_dir(str(tmp_path))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, output
    killed_at = ckpt.Checkpointer(str(tmp_path)).latest_step()
    assert killed_at is not None and killed_at < STEPS, output

    last = trainer.train(_config(), str(tmp_path))
    assert f"at step {killed_at}" in capsys.readouterr().out
    assert last["step"] == STEPS
    got = _train_losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, losses in got.items():
        assert all(loss == ref[step] for loss in losses), (step, losses, ref[step])  # bit for bit
    # the resumed session's energy continues the killed one's totals
    totals = [r["energy_kwh_total"] for r in metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
              if "energy_kwh_total" in r]
    assert totals == sorted(totals) and totals[-1] > 0


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_on_another_mesh(reference, tmp_path, capsys):
    _, ref, _ = reference
    proc = _start(tmp_path)
    lines = []
    for line in proc.stdout:  # the signal lands before the first step ends: that step finishes and is saved
        lines.append(line)
        if line.startswith("unigram baseline"):
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, output
    assert "(signal SIGTERM); checkpoint saved" in output
    stopped_at = ckpt.Checkpointer(str(tmp_path)).latest_step()
    assert stopped_at is not None and stopped_at < STEPS

    # second start, on a data 2 x tensor 4 mesh instead of data 8
    last = trainer.train(_config(**{"mesh.data": 2, "mesh.tensor": 4}), str(tmp_path))
    assert f"resumed from {ckpt.checkpoint_dir(str(tmp_path))} at step {stopped_at}" in capsys.readouterr().out
    assert last["step"] == STEPS
    got = {s: v[-1] for s, v in _train_losses(tmp_path).items()}
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(got)], rtol=2e-5)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_then_abort(tmp_path):
    # lr 1e30: the first update blows the weights up, every later loss is NaN
    config = _config(**{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0, "train.eval_every": 0,
                        "train.max_nonfinite_in_a_row": 3, "train.steps": 20})
    with pytest.raises(trainer.NonFiniteError, match=r"step 4: 3 steps in a row had a non-finite loss or gradient "
                                                     r"\(limit train.max_nonfinite_in_a_row=3\)"):
        trainer.train(config, str(tmp_path))
    rows = [r for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(1, 0), (2, 1), (3, 2)]
    assert np.isfinite(rows[0]["loss"]) and np.isnan(rows[1]["loss"])


@pytest.mark.slow
def test_resume_with_another_model_names_the_parameter(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"train/params/embed_in has shape \(50688, 64\) but "
                                                           r"the config expects \(50688, 32\)"):
        trainer.train(_config(**{"model.hidden_size": 32}), str(workdir))


@pytest.mark.slow
def test_resume_past_a_crashed_save(reference, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    os.makedirs(workdir / "checkpoints" / "10.orbax-checkpoint-tmp-1712345678" / "state")
    last = trainer.train(_config(), str(workdir))  # resumes at 8 == train.steps: nothing to do
    assert f"at step {STEPS}" in capsys.readouterr().out and last["step"] == STEPS


@pytest.mark.slow
def test_a_run_derives_its_setup_once(reference, tmp_path, monkeypatch):
    """Model shapes, optimizer, schedule and placement are built once per run (setup.build), not per step
    builder: here a resume that restores the state and builds the train and eval steps."""
    calls = {}
    for module, name in ((setup, "build"), (model_lib, "param_shapes"), (optim, "make_optimizer"),
                         (optim, "lr_schedule"), (sharding, "placement")):
        def counted(*args, _fn=getattr(module, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    trainer.train(_config(**{"train.steps": STEPS + 1}), str(workdir))
    assert calls == {"build": 1, "param_shapes": 1, "make_optimizer": 1, "lr_schedule": 1, "placement": 1}


@pytest.mark.slow
def test_resume_past_a_damaged_latest_checkpoint(reference, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    meta = workdir / "checkpoints" / "8" / "data" / "metadata"
    damaged = meta.read_bytes()[:12]
    meta.write_bytes(damaged)  # a truncated copy of the data-iterator state
    last = trainer.train(_config(), str(workdir))
    assert "at step 6" in capsys.readouterr().out and last["step"] == STEPS
    got = _train_losses(workdir)
    assert [got[s][-1] for s in (7, 8)] == [reference[1][7], reference[1][8]]  # bit for bit, from step 6
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "8", "8.damaged"]  # kept, not deleted
    assert (workdir / "checkpoints" / "8.damaged" / "data" / "metadata").read_bytes() == damaged


@pytest.mark.slow
def test_export_params_then_hf(reference, tmp_path):
    workdir = reference[0]
    config, params = weights.load_workdir_params(str(workdir))
    assert config.model.hidden_size == 64 and config.model.padded_vocab_size == 50688
    out = tmp_path / "params"
    script("export_params").main(["--workdir", str(workdir), "--step", "4", "--out", str(out)])  # exits only on error
    # reference: the whole train state of step 4 restored the way the trainer does
    config4 = _config()
    mesh = sharding.make_mesh(config4)
    abstract = {"train": train_lib.state_shapes(setup.build(config4, mesh)),
                "rng": jax.ShapeDtypeStruct((2,), np.uint32, sharding=NamedSharding(mesh, PartitionSpec()))}
    checkpointer = ckpt.Checkpointer(str(workdir))
    params4 = checkpointer.restore(abstract, step=4)[0]["train"].params
    checkpointer.close()
    loaded_config, loaded = weights.load_params(out)
    jax.tree.map(np.testing.assert_array_equal, loaded, params4)
    assert not np.array_equal(params4["embed_in"], params["embed_in"])  # step 4 is not the latest (8)
    # the eval and generation tools take the workdir itself
    m, latest = weights.load_model(checkpoint=str(workdir))
    assert m.padded_vocab_size == 50688
    jax.tree.map(np.testing.assert_array_equal, latest, params)
    convert.save_hf(loaded_config, loaded, tmp_path / "hf")
    _, from_hf = convert.load_hf(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, from_hf, loaded)


def _run_script(*args):
    return subprocess.run([sys.executable, TRAIN, *args], env=_env(1), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_config_typo_exits_2_with_near_names():
    run = _run_script("--config.model.hiden_size=3")
    assert run.returncode == 2
    assert "model.hiden_size" in run.stderr and "did you mean 'model.hidden_size'" in run.stderr


def test_unknown_flag_exits_2_with_near_names():
    run = _run_script("--wokdir=/tmp/x")
    assert run.returncode == 2 and "unknown flag --wokdir; did you mean --workdir" in run.stderr
