"""End-to-end training on a tiny model: exact resume after SIGKILL, SIGTERM preemption and resume on another mesh,
non-finite abort, shape-mismatch and config-typo errors, retention, metrics files, export of params."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorstore
import zstandard

from jax.sharding import NamedSharding, PartitionSpec

from conftest import SMALL_VOCAB, script_env
from neox_jax import checkpoint as ckpt
from neox_jax import cli, config as cfg, convert, goodput, metrics, optim, setup, sharding, trainer, weights
from neox_jax import model as model_lib
from neox_jax import train as train_lib
from tiny_configs import script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "scripts", "train.py")
TINY = os.path.join(ROOT, "configs", "tiny.py")
STEPS = 8

# 2 layers x hidden 64 at seq 32, batch 8 (one row per simulated device), on the bundled sample tokenized with a
# 512-id tokenizer (conftest.SMALL_TOKENIZER): with the 20B tokenizer's 50,688 rows the embeddings were 98% of the
# model and a step cost 1.3 CPU-s on 8 devices, 0.05 with these. The vocabulary is padded to 1,024 (a multiple of
# 128 x 4) so the same checkpoint also loads with mesh.tensor=4.
OVERRIDES = {
    "model.hidden_size": 64, "model.num_layers": 2, "model.num_heads": 4, **SMALL_VOCAB,
    "model.padded_vocab_size": 1024,
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


def _goodput_rows(workdir) -> list[dict]:
    return [r for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "goodput"]


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
    # goodput: a record when the loop begins, one per log line, one at the end; each partitions the wall time
    records = _goodput_rows(workdir)
    assert [r["step"] for r in records] == [0, *range(1, STEPS + 1), STEPS]
    for r in records:
        assert sum(r[f"{c}_s"] for c in goodput.CATEGORIES) == pytest.approx(r["wall_s"])
        assert r["wall_s"] == pytest.approx(r["time"] - r["attempt_start"], abs=0.01)  # from the call to the row
    end = records[-1]
    assert end["attempt"] == 1 and end["lost_s"] == end["lost_steps"] == 0
    assert all(end[f"{c}_s"] > 0 for c in ("productive", "startup", "compile", "checkpoint", "eval", "other"))
    assert last["goodput"] == end["goodput"] == pytest.approx(end["productive_s"] / end["wall_s"])
    events = [f for f in os.listdir(os.path.join(workdir, "tensorboard"))]
    assert b"goodput/productive_s" in open(os.path.join(workdir, "tensorboard", events[0]), "rb").read()


@pytest.mark.slow
def test_a_checkpoint_schedule_keeps_its_steps_and_the_initial_weights(reference, tmp_path):
    """train.checkpoint_steps=log2 over 8 steps, a rolling save every 3 kept 1 deep: the scheduled 0, 1, 2, 4, 8
    stay beside the newest, step 0 holds the initial weights, and training is the reference run's."""
    fields = {"train.checkpoint_steps": "log2", "train.checkpoint_every": 3, "train.keep_checkpoints": 1,
              "train.keep_every": 0}
    trainer.train(_config(**fields), str(tmp_path))
    assert ckpt.Checkpointer(str(tmp_path), create=False).all_steps() == [0, 1, 2, 4, 8]
    losses = {s: v[0] for s, v in _train_losses(tmp_path).items()}
    assert losses == reference[1]
    config = _config(**fields)
    run = setup.build(config, sharding.make_mesh(config))
    init = train_lib.init_train_state(run, jax.random.PRNGKey(config.train.seed))
    _, step0 = weights.load_workdir_params(str(tmp_path), 0)
    for got, want in zip(jax.tree.leaves(step0), jax.tree.leaves(jax.device_get(init.params))):
        np.testing.assert_array_equal(got, np.asarray(want, got.dtype))


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
    # goodput: the killed attempt's records count; its steps after the checkpoint resumed from are run again
    records = _goodput_rows(tmp_path)
    killed, resumed = [r for r in records if r["attempt"] == 1], [r for r in records if r["attempt"] == 2]
    assert killed and resumed[0]["attempt_from"] == killed_at
    assert resumed[-1]["lost_steps"] == max(killed[-1]["step"] - killed_at, 0)
    assert resumed[0]["downtime_s"] == pytest.approx(resumed[0]["attempt_start"] - killed[-1]["time"])
    assert resumed[-1]["wall_s"] == pytest.approx(resumed[-1]["time"] - killed[0]["attempt_start"], abs=0.05)


@pytest.mark.slow
def test_goodput_of_a_resume_from_an_older_checkpoint(reference, tmp_path, capsys):
    """The newest checkpoint gone: the run resumes from step 6 and counts steps 7 and 8 as run again, with their
    time in the reference attempt; the attempt's categories add up to its wall time measured here; the totals carry
    the reference attempt's on."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))
    before = _goodput_rows(workdir)
    start = time.time()
    last = trainer.train(_config(), str(workdir))
    wall = time.time() - start
    assert "at step 6" in capsys.readouterr().out and last["step"] == STEPS
    earlier, end = before[-1], _goodput_rows(workdir)[-1]
    assert end["attempt"] == 2 and end["attempt_from"] == 6 and end["lost_steps"] == STEPS - 6
    at_6 = [r for r in before if r["step"] == 6][-1]
    assert end["rerun_s"] == pytest.approx(earlier["attempt_productive_s"] - at_6["attempt_productive_s"])
    assert end["rerun_s"] > 0
    assert end["downtime_s"] == pytest.approx(end["attempt_start"] - earlier["time"])
    assert 0 <= wall - end["attempt_wall_s"] < 0.02 * wall + 0.2  # only closing the writers is left out
    assert end["wall_s"] == pytest.approx(earlier["wall_s"] + end["downtime_s"] + end["attempt_wall_s"])
    assert end["productive_s"] == pytest.approx(earlier["productive_s"] - end["rerun_s"] + end["attempt_productive_s"])
    line = cli.final_line(last, str(workdir))
    assert f"goodput {end['goodput']:.0%} of {end['wall_s']:.0f} s over 2 attempts" in line
    assert "(2 steps run again)" in line


@pytest.mark.slow
def test_sigterm_saves_exits_75_and_resumes_on_another_mesh(reference, tmp_path, capsys):
    _, ref, _ = reference
    proc = _start(tmp_path)
    lines = []
    for line in proc.stdout:  # the signal lands before the first step ends: that step finishes and is saved
        lines.append(line)
        if line.startswith("unigram baseline"):
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=240)[0]
    assert proc.returncode == 75, output  # stopped before train.steps: resumable (EX_TEMPFAIL)
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
def test_after_a_divergence_the_advice_works_as_printed(tmp_path):
    """A run diverges after step 4 (lr raised to 1e30 on resume): the rotation (keep 2) still holds step 4, the
    last checkpoint whose weights trained on; the stop moves the later ones aside, and rerunning with a sane lr,
    as the message says, resumes from step 4 and finishes."""
    base = {"train.eval_every": 0, "train.checkpoint_every": 1, "train.keep_checkpoints": 2, "train.keep_every": 0,
            "train.max_nonfinite_in_a_row": 3}
    trainer.train(_config(**base, **{"train.steps": 4}), str(tmp_path))
    with pytest.raises(trainer.NonFiniteError) as e:
        trainer.train(_config(**base, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0}), str(tmp_path))
    assert str(e.value).startswith("step 8: 3 steps in a row had a non-finite loss or gradient")
    assert "rerunning resumes from step 4, the newest checkpoint from before the streak (the ones after it are kept " \
           "as 7.diverged, 8.diverged)" in str(e.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "7.diverged", "8.diverged"]
    last = trainer.train(_config(**base), str(tmp_path))
    assert last["step"] == STEPS and np.isfinite(last["loss"])
    assert [r["step"] for r in metrics.read_jsonl(str(tmp_path / "metrics.jsonl")) if r["split"] == "train"][-4:] \
        == [5, 6, 7, 8]


def _ocdbt_values(base_dir):
    """(key, (data file, offset, length)) of each value an OCDBT database stores outside its index."""
    base = tensorstore.KvStore.open(f"file://{base_dir}/").result()
    pending = [tensorstore.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]]
    while pending:
        node = tensorstore.ocdbt.dump(base, pending.pop()).result()
        for entry in node.get("entries", []):
            for field, value in entry.items():
                if field == "indirect_value":
                    _, _, file, offset, length = value.split(":")
                    yield entry["key"].decode(), (file, int(offset), int(length))
                elif isinstance(value, str) and value.startswith("btreenode:"):
                    pending.append(value)


def _silent_flip(frame: bytes) -> int | None:
    """An offset in the zstd frame `frame` where 16 flipped bytes still decode, to other values of the same size
    (in a block stored raw, or among a compressed block's literals): the corruption a disk or a copy makes that
    only a checksum sees. None if the first 64 offsets tried from the middle on all break the frame."""
    want = zstandard.ZstdDecompressor().decompress(frame)
    for at in range(len(frame) // 2, len(frame) - 16, max(1, len(frame) // 256))[:64]:
        bad = frame[:at] + bytes(b ^ 0xFF for b in frame[at:at + 16]) + frame[at + 16:]
        try:
            got = zstandard.ZstdDecompressor().decompress(bad)
        except zstandard.ZstdError:
            continue
        if len(got) == len(want) and got != want:
            return at
    return None


@pytest.mark.slow
def test_flipped_bytes_in_the_newest_checkpoint_are_caught_everywhere(reference, tmp_path, capsys, caplog):
    """16 flipped bytes inside each tensor chunk of the newest step (the params' and the optimizer moments'), where
    they decode without an error; the checksums catch them: export and init_from read the step before with a
    warning (or refuse the step asked for), and the trainer resumes from it, bit for bit."""
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    # inside each chunk of the train state's arrays, found through the OCDBT index: which data file holds the
    # params and which the moments varies from save to save
    state = workdir / "checkpoints" / "8" / "state" / "ocdbt.process_0"
    flipped = []
    for key, (file, offset, length) in _ocdbt_values(state):
        if key.startswith("train.") and length > 4096:
            with open(state / file, "r+b") as f:
                f.seek(offset)
                at = _silent_flip(f.read(length))
                if at is not None:
                    f.seek(offset + at)
                    block = f.read(16)
                    f.seek(offset + at)
                    f.write(bytes(b ^ 0xFF for b in block))
                    flipped.append(key)
    assert any(".params." in k for k in flipped) and any(".mu." in k for k in flipped), flipped
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        config, params = weights.load_workdir_params(str(workdir))  # export_params and train.init_from read this way
    assert "checkpoints/8 is damaged (array train/params/" in caplog.text and "using step 6" in caplog.text
    with pytest.raises(ckpt.CheckpointDamagedError, match="checkpoints/8 is damaged: array train/params/"):
        weights.load_workdir_params(str(workdir), step=8)
    last = trainer.train(_config(), str(workdir))
    assert "at step 6" in capsys.readouterr().out and last["step"] == STEPS
    got = _train_losses(workdir)
    assert [got[s][-1] for s in (7, 8)] == [reference[1][7], reference[1][8]]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6", "8", "8.damaged"]


@pytest.mark.slow
def test_resume_with_another_model_names_the_parameter(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"train/params/embed_in has shape \(1024, 64\) but "
                                                           r"the config expects \(1024, 32\)"):
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
    assert config.model.hidden_size == 64 and config.model.padded_vocab_size == 1024
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
    assert m.padded_vocab_size == 1024
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
