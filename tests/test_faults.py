"""Faults a user can cause end in one clear line, with nothing lost (issue 15; the table in BUILD.md, "Fault
injection", maps each case to its test here). Cases: token ids outside the vocabulary, damaged checkpoints and a
full disk, orphaned workers and a second trainer on one workdir, tracebacks where one line is promised, non-finite
weights and overwritten outputs in conversion, broken workflows, README commands that did not hold; issue 25:
colliding preprocessing outputs, Ctrl-C and `kill -9` during preprocessing, zero intervals and broken configs,
outputs replaced without --overwrite, nonsense numbers."""

import json
import logging
import os
import pathlib
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FIXTURES, ROOT, SMALL_TOKENIZER, script_env
from neox_jax import checkpoint as ckpt
from neox_jax import convert, errors, metrics, trainer, weights
from neox_jax import evaluate as E
from neox_jax.data import dataset, default_paths, indexed, preprocess
from neox_jax.workdir import WorkdirBusyError, hold_workdir
from tiny_configs import TINY_PY, script as _script, tiny_py

TINY_HF = FIXTURES / "hf_reference" / "tiny-gpt-neox-parallel"  # max_position_embeddings 64


def _fails(main, argv, capsys, status=2):
    """The script's main(argv) exits with `status` and one FATAL: line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == status, err
    assert err.startswith("FATAL: ") and len(err.splitlines()) == 1, err
    return err


def _env(devices=1):
    env = script_env(devices)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # this tree's neox_jax
    return env


def _run(*argv, timeout=120):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=ROOT, env=_env(),
                          timeout=timeout)


def _one_fatal_line(proc, status=2):
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL: "), proc.stderr[-3000:]
    return lines[0]


def _pair(prefix, docs, dtype=np.uint16):
    with indexed.IndexedWriter(prefix, dtype) as w:
        for d in docs:
            w.add(np.asarray(d))
    return str(prefix)


def _config(**fields):
    """configs/tiny.py, the tiny model, on datasets of a few dozen tokens."""
    return tiny_py(**{"train.seq_len": 8, "train.batch_size": 4, **fields})


# ---- 1. token ids beyond the model's vocabulary ------------------------------------------------------------

def test_out_of_vocab_ids_are_refused_when_a_dataset_is_opened(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    bad = _pair(tmp_path / "oov", [rng.integers(0, 50_000, 64), [3, 65_000, 7]])
    good = _pair(tmp_path / "ok", [rng.integers(0, 50_000, 64)])
    message = r"oov.bin holds token id 65000, outside the model's vocabulary of 50277 ids \(model.vocab_size\)"
    with pytest.raises(indexed.IndexedFormatError, match="data.train_paths: .*" + message):
        dataset.make_train_iterator(_config(**{"data.train_paths": bad}), 0, 1)
    with pytest.raises(indexed.IndexedFormatError, match="data.val_paths: .*" + message):
        dataset.make_val_batches(_config(**{"data.train_paths": good, "data.val_paths": bad}), 0, 1)
    # scanned once: the cached range is used while the .bin is unchanged, a rewritten .bin is scanned again
    assert json.loads((tmp_path / "oov.ids.json").read_text())["max_id"] == 65_000
    monkeypatch.setattr(indexed, "_scan_range", lambda data: pytest.fail("scanned again"))
    with pytest.raises(indexed.IndexedFormatError):
        dataset.make_train_iterator(_config(**{"data.train_paths": bad}), 0, 1)
    monkeypatch.undo()
    _pair(tmp_path / "oov", [[1, 2, 3] * 20])
    dataset.make_train_iterator(_config(**{"data.train_paths": bad}), 0, 1)  # fits now
    # a read-only data folder caches the range in data.cache_dir
    monkeypatch.setattr(indexed.os, "access", lambda path, mode: False)
    ro = _pair(tmp_path / "ro", [[1, 2, 3] * 20])
    dataset.make_train_iterator(_config(**{"data.train_paths": ro, "data.cache_dir": str(tmp_path / "c")}), 0, 1)
    assert list((tmp_path / "c" / "index").glob("ro-*.ids.json")) and not (tmp_path / "ro.ids.json").exists()


def test_unigram_baseline_names_an_out_of_vocab_id():
    with pytest.raises(errors.InputError, match="validation token id 52862 is outside the vocabulary of 50277"):
        metrics.unigram_cross_entropy([np.arange(100)], np.array([1, 52862]), 50277)


# ---- 2. damaged checkpoints and a full disk ----------------------------------------------------------------

def _state(step):
    w = jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256) + step  # 256 KiB: a value file, not inline
    return {"train": {"params": {"w": w}, "step": jnp.asarray(step, jnp.int32)}}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _save(workdir, steps):
    c = ckpt.Checkpointer(str(workdir), async_save=False)
    for s in steps:
        c.save(s, _state(s), {"samples": s * 8}, {"train": {"steps": 100}})
    c.close()


def _damage(step_dir: pathlib.Path, kind: str) -> str:
    """Damage a committed step as a user, a copy or a disk could; returns what the warning should name."""
    if kind == "tensor":
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
        biggest = max(files, key=lambda p: p.stat().st_size)
        os.truncate(biggest, biggest.stat().st_size // 2)
        return f"{biggest.name} has {biggest.stat().st_size} bytes"
    if kind == "metadata":
        (step_dir / "state" / "_METADATA").write_text("")
        return "state/_METADATA is not readable JSON"
    meta = step_dir / "data" / "metadata"
    meta.write_bytes(meta.read_bytes()[:10])
    return "data/metadata is not readable JSON"


@pytest.mark.parametrize("kind", ["tensor", "metadata", "data_state"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, kind, caplog):
    _save(tmp_path, [1, 2])
    root = pathlib.Path(ckpt.checkpoint_dir(str(tmp_path)))
    reason = _damage(root / "2", kind)
    kept = sorted(str(p.relative_to(root / "2")) for p in (root / "2").rglob("*"))
    c = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert c.intact_step() == 1 and (root / "2").is_dir()  # a reader (export, eval) moves nothing
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        restored, data, _ = c.restore(_abstract(_state(0)), move_aside=True)
    assert int(restored["train"]["step"]) == 1 and data == {"samples": 8}
    np.testing.assert_array_equal(restored["train"]["params"]["w"], _state(1)["train"]["params"]["w"])
    assert f"{root / '2'} is damaged" in caplog.text and reason in caplog.text and "2.damaged" in caplog.text
    # nothing lost: the damaged step is kept whole under another name, and saving step 2 again does not collide
    assert sorted(os.listdir(root)) == ["1", "2.damaged"]
    assert sorted(str(p.relative_to(root / "2.damaged")) for p in (root / "2.damaged").rglob("*")) == kept
    c.save(2, _state(2), {"samples": 16}, {})
    c.close()
    assert ckpt.Checkpointer(str(tmp_path)).all_steps() == [1, 2]


def _noise_state(step):
    """Random weights (incompressible: zstd stores them as they are, so flipped bytes decode without an error)."""
    w = np.random.default_rng(step).standard_normal((256, 256)).astype(np.float32)
    return {"train": {"params": {"w": jnp.asarray(w)}, "step": jnp.asarray(step, jnp.int32)}}


def _corrupt(path: pathlib.Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    if how == "flip":
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    elif how == "zero":
        data[mid:mid + 64] = bytes(len(data[mid:mid + 64]))
    elif how == "truncate":
        data = data[:mid]
    if how == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))


@pytest.mark.slow
def test_any_corruption_of_any_checkpoint_file_is_caught_before_the_weights_are_used(tmp_path):
    """Every file of the newest step, flipped, zeroed, truncated or deleted: the restore either passes the step
    over for the one before (with the reason), or returns exactly what was saved (bytes nothing reads, such as
    orbax's commit timestamp). Never other weights."""
    c = ckpt.Checkpointer(str(tmp_path / "clean"), async_save=False)
    for s in (1, 2):
        c.save(s, _noise_state(s), {"samples": s * 8}, {"train": {"steps": 100}})
    c.close()
    step2 = pathlib.Path(ckpt.checkpoint_dir(str(tmp_path / "clean"))) / "2"
    files = sorted(str(p.relative_to(step2)) for p in step2.rglob("*") if p.is_file())
    caught, harmless = [], []
    for i, (rel, how) in enumerate((rel, how) for rel in files for how in ("flip", "zero", "truncate", "delete")):
        work = tmp_path / f"w{i}"
        shutil.copytree(tmp_path / "clean", work)
        _corrupt(pathlib.Path(ckpt.checkpoint_dir(str(work))) / "2" / rel, how)
        reader = ckpt.Checkpointer(str(work), async_save=False, create=False)
        try:
            restored, data, _ = reader.restore(_abstract(_noise_state(0)))
        finally:
            reader.close()
        step = int(restored["train"]["step"])
        np.testing.assert_array_equal(restored["train"]["params"]["w"], _noise_state(step)["train"]["params"]["w"],
                                      err_msg=f"{how} {rel}")
        assert data == {"samples": step * 8}, (how, rel)
        (caught if step == 1 else harmless).append(f"{how} {rel}")
    # every file a restore reads is caught whatever is done to it: the merged database (its manifest and data
    # files, tensor values included), the tree metadata and the JSON items; what else is harmless is files
    # nothing reads back (commit markers, the per-process databases orbax merged, an absent sharding file)
    read = [f for f in files if f.startswith(("state/d/", "state/manifest.ocdbt", "state/_METADATA", "data/metadata",
                                              "config/metadata", "integrity/metadata"))]
    assert {f"{how} {f}" for f in read for how in ("flip", "zero", "truncate", "delete")} <= set(caught), harmless
    assert any(f.startswith("state/d/") for f in read)


def test_no_intact_checkpoint_is_one_error_and_nothing_moves(tmp_path):
    _save(tmp_path, [1, 2])
    root = pathlib.Path(ckpt.checkpoint_dir(str(tmp_path)))
    _damage(root / "1", "tensor")
    _damage(root / "2", "metadata")
    c = ckpt.Checkpointer(str(tmp_path), async_save=False)
    with pytest.raises(ckpt.CheckpointDamagedError, match=r"no intact checkpoint in .*checkpoints: step 2: state/"
                                                          r"_METADATA is not readable JSON .*; step 1: .* bytes"):
        c.restore(_abstract(_state(0)), move_aside=True)
    with pytest.raises(ckpt.CheckpointDamagedError, match="checkpoints/2 is damaged"):
        c.intact_step(2)
    assert sorted(os.listdir(root)) == ["1", "2"]
    assert issubclass(ckpt.CheckpointDamagedError, errors.RunFailure)  # scripts: exit 1


def test_a_failed_save_is_one_error_naming_the_intact_step(tmp_path, monkeypatch, capsys):
    _save(tmp_path, [1])
    c = ckpt.Checkpointer(str(tmp_path), async_save=True)
    c.save(2, _state(2), {}, {})
    c.wait()
    # what orbax raises (and logs with a traceback from its thread) when tensorstore hits ENOSPC in the background
    cause = ValueError("RESOURCE_EXHAUSTED: Error writing \"train.params.w/0\" in OCDBT database at local file "
                       f"\"{tmp_path}/checkpoints/3.orbax-checkpoint-tmp/state\": Failed to write 262144 bytes to "
                       "file 11: No space left on device [os_error_code='28']")

    def fail():
        logging.getLogger("absl").error("save thread failed", exc_info=(ValueError, cause, None))
        raise cause

    c.save(3, _state(3), {}, {})
    monkeypatch.setattr(c.manager, "wait_until_finished", fail)
    with pytest.raises(ckpt.CheckpointSaveError) as e:
        c.wait()
    assert str(e.value).startswith(f"checkpoint step 3 could not be written to {ckpt.checkpoint_dir(str(tmp_path))}: "
                                   "the disk is full (no space left on device); the newest complete checkpoint is "
                                   "step 2; run the same command again to resume from it once space is free")
    c.close()  # after the failure was raised: quietly
    assert "Traceback" not in capsys.readouterr().err  # orbax's background traceback is dropped
    monkeypatch.undo()
    c = ckpt.Checkpointer(str(tmp_path), async_save=True)  # a last save that fails while the run closes
    c.save(4, _state(4), {}, {})
    monkeypatch.setattr(c.manager, "wait_until_finished", fail)
    with pytest.raises(ckpt.CheckpointSaveError, match="checkpoint step 4 could not be written"):
        c.close()
    monkeypatch.undo()
    c.manager.close()


FULL_DISK = """
import sys
import numpy as np
from neox_jax import checkpoint as ckpt
c = ckpt.Checkpointer(sys.argv[1])
c.save(1, {"w": np.zeros(16, np.float32)}, {"samples": 1}, {})
c.wait()
noise = np.random.default_rng(0).standard_normal(3 << 20).astype(np.float32)  # 12 MB, does not compress
try:
    c.save(2, {"w": noise}, {"samples": 2}, {})
    c.wait()
except ckpt.CheckpointSaveError as e:
    print(e)
c.close()
"""


def _unshare_available() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged user namespaces to mount a small tmpfs")
def test_a_really_full_disk_during_a_save(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=4m tmpfs {tmp_path}/disk && "
                           f"{sys.executable} {tmp_path}/full_disk.py {tmp_path}/disk/run"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines() == [
        f"checkpoint step 2 could not be written to {tmp_path}/disk/run/checkpoints: the disk is full (no space left "
        "on device); the newest complete checkpoint is step 1; run the same command again to resume from it once "
        "space is free (the partial folder it left is ignored)"]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


# ---- 3. orphans and collisions ------------------------------------------------------------------------------

HOLDER = """
import sys, time
from neox_jax.data.dataset import TrainIterator
from neox_jax.workdir import hold_workdir
if __name__ == "__main__":
    with hold_workdir(sys.argv[1]):
        it = TrainIterator([sys.argv[2]], [1.0], seq_len=8, global_batch=4, seed=0, workers=2)
        next(it)
        print("ready", flush=True)
        time.sleep(300)
"""


@pytest.mark.slow
def test_kill_9_takes_the_workers_and_the_workdir_lock_with_it(tmp_path):
    import psutil

    data = _pair(tmp_path / "d", [np.arange(1, 200)])
    (tmp_path / "holder.py").write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), str(tmp_path / "run"), data],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
        with pytest.raises(WorkdirBusyError, match=rf"workdir {tmp_path / 'run'} is in use by another "
                                                   rf"training run \(pid {proc.pid} on "):
            with hold_workdir(str(tmp_path / "run")):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    # a worker still importing when its parent dies exits once its initialiser runs: allow a loaded machine's
    # start-up time
    deadline = time.time() + 60
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), [w.cmdline() for w in workers if alive(w)]
    with hold_workdir(str(tmp_path / "run")):  # the kernel released the dead run's lock
        pass


# ---- 4. tracebacks where one line is promised ---------------------------------------------------------------

def test_guarded_scripts_print_one_line_with_the_documented_status(capsys):
    def raising(e):
        @errors.guarded
        def main():
            raise e
        return main

    cases = [(errors.InputError("bad\nvalue"), 2, "FATAL: bad; value"), (trainer.NonFiniteError("nan"), 1, "nan"),
             (FileNotFoundError(2, "No such file or directory", "/x"), 2, "/x: No such file or directory"),
             (OSError(28, "No space left on device", "/y"), 1, "/y: No space left on device (the disk is full")]
    for e, status, text in cases:
        assert text in _fails(lambda argv: raising(e)(), [], capsys, status)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        raising(KeyError("bug"))()


def _datasets(tmp_path):
    ok = _pair(tmp_path / "ok", [np.arange(1, 100)])
    for name in ("short_idx", "short_bin"):
        for ext in (".bin", ".idx"):
            shutil.copy(ok + ext, tmp_path / f"{name}{ext}")
    os.truncate(tmp_path / "short_idx.idx", 40)
    os.truncate(tmp_path / "short_bin.bin", 20)
    _pair(tmp_path / "empty", [[]])
    return {"short_idx": "short_idx.idx: truncated", "short_bin": r"short_bin.bin: truncated \(20 bytes",
            "empty": "empty holds no tokens", "nowhere": "is neither a .bin/.idx prefix",
            "nowhere.jsonl": "input file .*nowhere.jsonl not found"}


def test_bad_training_data_is_one_error_naming_the_file(tmp_path):
    for name, message in _datasets(tmp_path).items():
        with pytest.raises(errors.InputError, match=f"data.train_paths: .*{message}"):
            dataset.make_train_iterator(_config(**{"data.train_paths": str(tmp_path / name)}), 0, 1)
    with pytest.raises(errors.InputError, match="tokenizer file /no/tok.json not found"):
        dataset.make_train_iterator(_config(**{"data.train_paths": str(ROOT / "neox_jax/assets/val.jsonl.zst"),
                                               "data.tokenizer": "/no/tok.json"}), 0, 1)


@pytest.mark.slow
def test_train_script_bad_data_and_bad_value_types_exit_2(tmp_path, capsys):
    """Bad data, found once the run has started JAX, as a real process (its stderr holds the one line alone); bad
    values, refused while the flags are read, through the scripts' main in this process."""
    _datasets(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "metrics.jsonl").write_text('{"split": "train", "step": 1}\n')  # an earlier session's
    line = _one_fatal_line(_run(ROOT / "scripts/train.py", "--workdir", tmp_path / "w",
                                f"--config.data.train_paths={tmp_path / 'short_idx'}"))
    assert "short_idx.idx: truncated" in line
    assert (tmp_path / "w" / "metrics.jsonl").read_text() == '{"split": "train", "step": 1}\n'
    line = _fails(_script("train").main, ["--config.train.steps=abc"], capsys)
    assert "--config.train.steps=abc" in line
    line = _fails(_script("inspect_sharding").main, ["--config", TINY_PY, "--mesh", "data=1",
                                                      "--config.model.hiden_size=3"], capsys)
    assert "did you mean 'model.hidden_size'" in line


def test_a_damaged_cache_entry_is_tokenized_again(tmp_path, caplog):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3)))
    prefix = preprocess.prepare_dataset(str(text), cache_dir=str(tmp_path), progress=False)
    whole = pathlib.Path(prefix + ".bin").read_bytes()
    for damage in (whole[:10], b"\xff" * len(whole)):  # truncated; ids beyond the tokenizer's vocabulary
        pathlib.Path(prefix + ".bin").write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="neox_jax"):
            assert preprocess.prepare_dataset(str(text), cache_dir=str(tmp_path), progress=False) == prefix
        assert "tokenizing" in caplog.text and pathlib.Path(prefix + ".bin").read_bytes() == whole
        caplog.clear()


def _hf_copy(tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(TINY_HF, d)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


def _first_f32_tensor(file):
    raw = bytearray(file.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    name, info = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")
    return raw, name, 8 + n + info["data_offsets"][0]


def test_damaged_safetensors_are_one_line_in_convert_and_evaluate(tmp_path, capsys):
    hf = _hf_copy(tmp_path)
    weights = hf / "model.safetensors"
    whole = weights.read_bytes()
    convert_hf, evaluate = _script("convert_hf"), _script("evaluate")
    for damaged in (whole[:len(whole) // 2], struct.pack("<Q", 1 << 40) + whole[8:]):  # truncated; garbled header
        weights.write_bytes(damaged)
        line = _fails(convert_hf.main, ["--hf_dir", str(hf), "--out", str(tmp_path / "p")], capsys)
        assert f"{weights}: not a readable safetensors file" in line
        line = _fails(evaluate.main, ["--hf", str(hf), "--tasks", "piqa", "--limit", "1"], capsys)
        assert f"{weights}: not a readable safetensors file" in line


@pytest.mark.slow
def test_generate_empty_and_too_long_prompts(tmp_path, capsys):
    generate = _script("generate")
    hf = ["--hf", str(TINY_HF), "--tokenizer", SMALL_TOKENIZER]  # a tokenizer within the model's 512 ids
    line = _fails(generate.main, [*hf, "--prompt", "a " * 80, "--max_new_tokens", "2"], capsys)
    assert re.search(r"prompt 0 has 8\d tokens, .* max_position_embeddings=64", line)
    assert capsys.readouterr().out == ""  # refused before the prompt is echoed
    generate.main([*hf, "--prompt", "", "--max_new_tokens", "3", "--output", str(tmp_path / "o.jsonl")])
    row = json.loads((tmp_path / "o.jsonl").read_text())
    assert row["prompt"] == "" and len(row["tokens"]) == 3 and row["finish_reason"]


def test_other_scripts_refuse_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "sweep.py").write_text("def get_sweep():\n    raise KeyError('lr')\n")
    line = _fails(_script("sweep").main, ["--sweep", str(tmp_path / "sweep.py")], capsys)
    assert line == f"FATAL: sweep file {tmp_path / 'sweep.py'}: KeyError: 'lr'"
    plan = ["--config", TINY_PY, "--device", "A100", "--devices", "8", "--mfu", "0.4"]
    assert "--json /no/dir/p.json: the folder /no/dir does not exist" in _fails(
        _script("plan_run").main, plan + ["--json", "/no/dir/p.json"], capsys)
    assert "unknown size '7b'" in _fails(_script("plan_run").main, ["--config", "configs/pythia.py:7b"] + plan[2:],
                                         capsys)
    # checked before any model is loaded: the model paths do not even exist
    assert "--output /no/dir/r.json" in _fails(_script("evaluate").main, ["--hf", "/no/model", "--output",
                                                                          "/no/dir/r.json"], capsys)
    assert "--output /no/dir/c.jsonl" in _fails(_script("generate").main, ["--hf", "/no/model", "--prompt", "x",
                                                                          "--output", "/no/dir/c.jsonl"], capsys)



SCRIPTS = ("train", "inspect_sharding", "batch_viewer", "benchmark", "convert_hf", "dedup_report", "evaluate",
           "export_params", "generate", "plan_run", "preprocess_data", "sweep", "train_tokenizer")


def test_a_bad_flag_is_one_line_in_every_script(capsys):
    for name in SCRIPTS:  # checked before a missing required flag or argument
        line = _fails(_script(name).main, ["data"] * (name == "benchmark") + ["--wokdir=/tmp/x"], capsys)
        assert line.startswith("FATAL: unknown flag --wokdir") and "flags: " in line, (name, line)
    assert _fails(_script("train").main, ["--wokdir", "/tmp/x"], capsys) == (
        "FATAL: unknown flag --wokdir; did you mean --workdir? (this script's flags: --config, --config.FIELD, "
        "--coordinator_address, --num_processes, --preflight, --process_id, --verbosity, --workdir)")
    assert "did you mean --nocompile" in _fails(_script("inspect_sharding").main, ["--nocomplie"], capsys)
    assert "did you mean --warmup? (train's flags: --config, --config.FIELD, --compare-hf," in _fails(
        _script("benchmark").main, ["train", "--wrmup", "3"], capsys)
    assert _fails(_script("train").main, ["runs/x"], capsys) == ("FATAL: unexpected arguments: runs/x (flags are "
                                                                  "--name=value)")
    assert _fails(_script("batch_viewer").main, ["--chars=x"], capsys) == (
        "FATAL: argument --chars: invalid int value: 'x'")
    assert _fails(_script("evaluate").main, ["--batch_size", "0"], capsys) == (
        "FATAL: argument --batch_size: expected an integer >= 1, got 0")
    assert "required" in _fails(_script("evaluate").main, [], capsys)
    inspect = _script("inspect_sharding")  # absl's boolean spellings, which the docs use, still parse
    assert [inspect.parse(argv).compile for argv in ([], ["--nocompile"], ["--no-compile"], ["--compile"])] == [
        True, False, False, True]
    assert inspect.parse(["--cpu_hoisting", "--mesh=data=2", "--compare", "fsdp=2", "--compare=tensor=2"]).compare == [
        "fsdp=2", "tensor=2"]

# ---- 5. silent damage in conversion ----------------------------------------------------------------------------

def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path):
    hf = _hf_copy(tmp_path)
    raw, name, start = _first_f32_tensor(hf / "model.safetensors")
    raw[start:start + 4 * 37] = b"\x00\x00\xc0\x7f" * 37  # 37 NaNs behind an intact header
    (hf / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(convert.ConversionError, match=rf"tensor '{name}' holds 37 non-finite values"):
        convert.load_hf(hf)
    config, params = convert.load_hf(TINY_HF)
    params["final_layer_norm"]["bias"] = np.full_like(params["final_layer_norm"]["bias"], np.inf)
    weights.save_params(config, params, tmp_path / "p")
    with pytest.raises(convert.ConversionError, match="tensor 'final_layer_norm/bias' holds 64 non-finite"):
        weights.load_params(tmp_path / "p")


def test_outputs_are_not_overwritten_without_overwrite(tmp_path, capsys):
    convert_hf, export = _script("convert_hf"), _script("export_params")
    src = str(TINY_HF)
    workdir = tmp_path / "run"  # a training workdir's config.json must survive a mistyped --out
    workdir.mkdir()
    (workdir / "config.json").write_text('{"mine": 1}')
    line = _fails(convert_hf.main, ["--hf_dir", src, "--out", str(workdir)], capsys)
    assert f"{workdir} is not empty (it holds config.json)" in line and "--overwrite" in line
    line = _fails(export.main, ["--workdir", "/no/such/run", "--out", str(workdir)], capsys)  # before any read
    assert f"{workdir} is not empty" in line
    assert (workdir / "config.json").read_text() == '{"mine": 1}'
    convert_hf.main(["--hf_dir", src, "--out", str(workdir), "--overwrite"])
    _, params = weights.load_params(workdir)
    _, reference = convert.load_hf(src)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    assert sorted(os.listdir(workdir)) == ["config.json", "params.safetensors"]  # no temporary left


# ---- 6. workflows that broke -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def custom_tokenizer_run(tmp_path_factory):
    """train_tokenizer.py -> preprocess_data.py --tokenizer -> training with model.vocab_size set to it, on
    pre-tokenized train_paths and val_paths, with every evaluation made 1 s longer."""
    tmp = tmp_path_factory.mktemp("custom_tok")
    sample = str(ROOT / "neox_jax" / "assets" / "val.jsonl.zst")
    _script("train_tokenizer").main([sample, "--vocab-size", "512", "--max-docs", "8", "--output-prefix",
                                     str(tmp / "tok")])
    _script("preprocess_data").main([sample, "--tokenizer", str(tmp / "tok.model"), "--output-prefix",
                                     str(tmp / "data"), "--workers", "1", "--no-progress"])
    config = _config(**{"model.vocab_size": 512, "data.train_paths": str(tmp / "data"),
                        "data.val_paths": str(tmp / "data"), "train.steps": 6, "train.batch_size": 8, "train.log_every": 1,
                        "train.eval_every": 3, "train.eval_batches": 1, "train.checkpoint_every": 100,
                        "energy.track": False})
    real = trainer.validation_loss

    def slow_validation_loss(*args):
        time.sleep(1.0)
        return real(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "validation_loss", slow_validation_loss)
    try:
        last = trainer.train(config, str(tmp / "run"))
    finally:
        mp.undo()
    return last, metrics.read_jsonl(str(tmp / "run" / "metrics.jsonl")), tmp


@pytest.mark.slow
def test_custom_tokenizer_workflow_trains(custom_tokenizer_run):
    last, rows, _ = custom_tokenizer_run
    assert last["step"] == 6 and np.isfinite(last["val_loss"]) and last["unigram_val_loss"] < np.log(512)


@pytest.mark.slow
def test_throughput_excludes_evaluation_time(custom_tokenizer_run):
    _, rows, _ = custom_tokenizer_run
    train = [r for r in rows if r["split"] == "train" and r.get("step_time") is not None]
    assert [r["step"] for r in train] == [2, 3, 4, 5, 6]  # steps 3 and 6 were each followed by a 1 s evaluation
    assert max(r["step_time"] for r in train) < 0.7, [(r["step"], r["step_time"]) for r in train]


@pytest.mark.slow
def test_a_run_is_read_back_with_its_own_tokenizer(custom_tokenizer_run, tmp_path, capsys):
    """generate.py and evaluate.py default to the tokenizer a model was made with; where that is not known (a run
    on pre-tokenized data) or gone, one line asks for --tokenizer instead of ids past the model's embedding."""
    *_, tmp = custom_tokenizer_run
    generate, workdir = _script("generate").main, str(tmp / "run")
    prompt = ["--prompt", "The", "--max_new_tokens", "2", "--output", str(tmp_path / "o.jsonl")]
    line = _fails(generate, ["--checkpoint", workdir, *prompt], capsys)  # data.tokenizer "": the 20B tokenizer
    assert line == (f"FATAL: tokenizer {default_paths()['tokenizer']} has 50277 ids but the model at {workdir} embeds "
                    "only 512: give the tokenizer it was trained with (--tokenizer)")
    generate(["--checkpoint", workdir, "--tokenizer", str(tmp / "tok.model"), *prompt])
    assert len(json.loads((tmp_path / "o.jsonl").read_text())["tokens"]) == 2
    # a params dir of a run that named its tokenizer reads it; one whose tokenizer is gone says so
    config, params = weights.load(workdir)
    config.data.tokenizer = str(tmp / "tok.model")
    weights.save_params(config, params, tmp_path / "params")
    assert E.NeoXLM(checkpoint=str(tmp_path / "params")).tokenizer.path == config.data.tokenizer
    config.data.tokenizer = str(tmp_path / "moved.model")
    weights.save_params(config, params, tmp_path / "params", overwrite=True)
    assert _fails(_script("evaluate").main, ["--checkpoint", str(tmp_path / "params"), "--tasks", "piqa"], capsys) == (
        f"FATAL: {tmp_path / 'params'} was trained with data.tokenizer={tmp_path / 'moved.model'}, which is not "
        "there now; give the tokenizer file with --tokenizer")


def test_preprocessing_a_directory_and_empty_input(tmp_path, capsys):
    (tmp_path / "in" / "b").mkdir(parents=True)
    for path, text in (("in/b/2.jsonl", "two"), ("in/1.jsonl", "one"), ("in/notes.md", "not read")):
        (tmp_path / path).write_text(json.dumps({"text": text}) + "\n")
    s = preprocess.preprocess(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert s.docs == 2  # in/1.jsonl then in/b/2.jsonl, sorted by path
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="input directory .*none holds no Pile-format files"):
        preprocess.preprocess(str(tmp_path / "none"), str(tmp_path / "x"), progress=False)
    (tmp_path / "empty.jsonl").write_text("")
    line = _fails(_script("preprocess_data").main, [str(tmp_path / "empty.jsonl"), "--output-prefix",
                                                    str(tmp_path / "e"), "--no-progress"], capsys)
    assert line == f"FATAL: no documents in {tmp_path / 'empty.jsonl'}; nothing written to {tmp_path / 'e'}"
    assert not list(tmp_path.glob("e.*"))


# ---- 7. README claims ----------------------------------------------------------------------------------------------

def test_readme_commands_name_the_venv_python():
    text = (ROOT / "README.md").read_text()
    bare = [line for line in text.splitlines() if re.search(r"(^|[\s`;(])python3? scripts/", line)]
    assert not bare, bare


def test_convert_hf_takes_a_training_workdir(tmp_path, capsys):
    config, params = convert.load_hf(TINY_HF)
    c = ckpt.Checkpointer(str(tmp_path / "run"), async_save=False)
    c.save(3, {"train": {"params": params}}, {}, json.loads(config.to_json()))
    c.close()
    _script("convert_hf").main(["--params_dir", str(tmp_path / "run"), "--hf_out", str(tmp_path / "hf")])
    _, back = convert.load_hf(tmp_path / "hf")
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_benchmark_data_prints_the_table(capsys):
    _script("benchmark").main(["data", "--skip-preprocess", "--skip-index", "--num-tokens", "50000", "--batches",
                               "3", "--seq-len", "16", "--batch-size", "2", "--merge-mb", "0"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["measure", "goal", "measured"] and "loader tokens/s, one core" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


# issue 25: preprocessing, config and script outputs

def _jsonl(path, components, words=3):
    path.write_text("".join(json.dumps({"text": f"document {i} " + "lorem ipsum " * words,
                                        "meta": {"pile_set_name": c}}) + "\n" for i, c in enumerate(components)))
    return str(path)


def test_colliding_component_names_are_refused_before_anything_is_written(tmp_path, capsys):
    preprocess_data = _script("preprocess_data").main
    text = _jsonl(tmp_path / "in.jsonl", ["a/b", "x", "a_b", "a b"])
    line = _fails(preprocess_data, [text, "--output-prefix", str(tmp_path / "c"), "--split-by-component",
                                    "--no-progress"], capsys)
    assert line == (f"FATAL: --split-by-component: components 'a/b' and 'a_b' would both be written to "
                    f"{tmp_path / 'c_a_b'}.bin/.idx (an output name has _ for each run of characters other than "
                    "letters and digits); nothing was written; rename one (meta.pile_set_name) or preprocess without "
                    "--split-by-component")
    assert os.listdir(tmp_path) == ["in.jsonl"]  # no output, no temporary file
    preprocess_data([text, "--output-prefix", str(tmp_path / "c"), "--no-progress"])  # one output: all 4 documents
    assert len(indexed.IndexedDataset(str(tmp_path / "c")).sizes) == 4


def _preprocessing_until_progress(text, prefix):
    """preprocess_data.py as a process in a session of its own (a Ctrl-C reaches its whole group), returned once it
    has recorded progress (it is writing)."""
    # under a shell's `cmd &` this process ignores SIGINT, and a child would inherit that: give it Python's handler
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen([sys.executable, ROOT / "scripts/preprocess_data.py", text, "--output-prefix", prefix,
                                 "--workers", "1", "--no-progress", "--progress-every", "0"], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 60
    while not os.path.exists(prefix + ".progress.json") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_ctrl_c_and_kill_9_during_preprocessing_keep_progress_and_nothing_final(tmp_path, caplog):
    big = _jsonl(tmp_path / "big.jsonl", ["A", "B"] * 6000, words=300)  # ~20 MB: seconds of tokenizing
    prefix = str(tmp_path / "out" / "p")
    partial = ["p.bin.partial", "p.progress.json", "p.sizes.partial"]
    proc = _preprocessing_until_progress(big, prefix)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == (
        f"FATAL: interrupted before {prefix} was complete: nothing under that prefix was written or replaced; its "
        "progress is kept: the same command with --resume continues it"), err
    assert sorted(os.listdir(tmp_path / "out")) == partial
    _script("preprocess_data").main([big, "--output-prefix", prefix, "--no-progress", "--resume"])
    assert sorted(os.listdir(tmp_path / "out")) == ["p.bin", "p.idx", "p.manifest.json"]
    assert len(indexed.IndexedDataset(prefix)) == 12000
    shutil.rmtree(tmp_path / "out")
    proc = _preprocessing_until_progress(big, prefix)
    proc.kill()  # kill -9: no exit path runs
    proc.wait()
    assert sorted(os.listdir(tmp_path / "out")) == partial
    with caplog.at_level(logging.WARNING, logger="neox_jax"):  # without --resume: starts over, saying so
        _script("preprocess_data").main([_jsonl(tmp_path / "small.jsonl", ["A"]), "--output-prefix", prefix,
                                         "--no-progress"])
    assert f"discarded the progress of an unfinished run of {prefix} (" in caplog.text
    assert sorted(os.listdir(tmp_path / "out")) == ["p.bin", "p.idx", "p.manifest.json"]


def test_count_fields_a_config_that_is_no_config_and_a_section_given_a_value(tmp_path, capsys):
    from neox_jax import config as cfg

    train = _script("train").main
    workdir = ["--workdir", str(tmp_path / "w")]
    for field in ("checkpoint_every", "log_every"):  # were a ZeroDivisionError after the first compiled step
        line = _fails(train, workdir + [f"--config.train.{field}=0"], capsys)
        assert line.startswith(f"FATAL: config field train.{field}: must be an integer >= 1 (a step number is taken "
                               f"modulo it"), line
    assert not (tmp_path / "w").exists()  # refused before the workdir is made
    for field, least, _ in cfg.COUNT_FIELDS:
        with pytest.raises(cfg.ConfigError, match=f"config field {field}: must be an integer >= {least} "):
            cfg.validate(tiny_py(**{field: least - 1}))
        cfg.validate(tiny_py(**{field: least}))
    (tmp_path / "none.py").write_text("def get_config():\n    config = 1\n")
    assert _fails(train, ["--config", str(tmp_path / "none.py")], capsys) == (
        f"FATAL: config file {tmp_path / 'none.py'}: get_config() returned NoneType, expected an "
        "ml_collections.ConfigDict (does it end with `return config`?)")
    assert _fails(train, ["--config.model=3"], capsys) == (
        "FATAL: --config.model=3: model is a section, not a value; set one of its fields instead "
        "(model.attention_chunk, model.attention_impl, model.dtype, ...)")
    assert "train.steps is a value, not a section" in _fails(train, ["--config.train.steps.x=3"], capsys)
    assert cfg.from_spec(TINY_PY, {"train.log_every": "5"}, "--config").train.log_every == 5  # the correct command


def test_script_outputs_are_not_replaced_without_overwrite(tmp_path, capsys):
    """Checked before any work: the models, inputs and sweep runs named here do not even exist."""
    old = tmp_path / "old.txt"
    old.write_text("results of an earlier run")
    plan = ["--config", TINY_PY, "--device", "A100", "--devices", "8", "--mfu", "0.4"]
    sweep = tmp_path / "sweep.py"
    sweep.write_text(f"from neox_jax.sweep import Sweep\n\ndef get_sweep():\n    return Sweep(config={TINY_PY!r}, "
                     "runs=[{'optimizer.lr': 1e-3}])\n")
    cases = {"generate": ["--hf", "/no/model", "--prompt", "x", "--output"], "evaluate": ["--hf", "/no/model",
             "--output"], "plan_run": plan + ["--json"], "dedup_report": ["/no/in.jsonl", "--json"],
             "benchmark": ["data", "--json"], "batch_viewer": ["--json"], "inspect_sharding": ["--mesh", "data=1",
             "--plot"], "sweep": ["--sweep", str(sweep), "--emit", "slurm", "--slurm_script"]}
    for name, argv in cases.items():
        line = _fails(_script(name).main, argv + [str(old)], capsys)
        assert line.endswith(f" {old}: the file exists; choose a new name, or pass --overwrite to replace it"), line
    for name, ext in (("train_tokenizer", ".model"), ("preprocess_data", ".bin")):  # an output prefix's files
        shutil.copy(old, tmp_path / f"old{ext}")
        assert f"--output-prefix {tmp_path / 'old'}{ext}: the file exists" in _fails(
            _script(name).main, ["/no/in.jsonl", "--output-prefix", str(tmp_path / "old")], capsys)
    assert old.read_text() == "results of an earlier run"
    _script("plan_run").main(plan + ["--json", str(old), "--overwrite"])
    assert json.loads(old.read_text())[0]["devices"] == 8


def test_negative_watts_and_few_shot_counts_are_refused(capsys):
    plan_run = _script("plan_run").main
    plan = ["--config", TINY_PY, "--device", "A100", "--devices", "8", "--mfu", "0.4"]
    assert _fails(plan_run, plan + ["--watts", "-300"], capsys) == (
        "FATAL: --watts must be > 0 W (leave it out for the device's rated power), got -300.0")
    assert "--watts must be > 0 W" in _fails(plan_run, plan + ["--watts", "0"], capsys)  # was: the table's in silence
    assert _fails(_script("evaluate").main, ["--hf", "/no/model", "--num_fewshot", "-1"], capsys) == (
        "FATAL: argument --num_fewshot: expected an integer >= 0, got -1")
    plan_run(plan + ["--watts", "300"])
    assert "300" in capsys.readouterr().out


# issue 25: checkpoints, metrics.jsonl and data that change under a run

TORN = b'{"step": 7, "split": "train", "loss": '


def test_a_torn_metrics_line_is_skipped_by_readers_and_repaired_by_the_next_writer(tmp_path, caplog):
    from neox_jax import energy, sweep

    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    rows = [{"step": 6, "split": "train", "loss": 2.5, "energy_kwh_total": 0.25}]
    path = run / "metrics.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + TORN)  # a full disk, a kill
    assert metrics.read_jsonl(str(path)) == rows
    assert energy.previous_totals(str(run)) == {"energy_kwh_total": 0.25}  # what a restart reads first
    assert sweep.summarize(str(tmp_path / "runs"))[1][0]["train_loss"] == 2.5
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        writers = metrics.Writers(str(run), tensorboard=False)
        writers.write(8, {"loss": 2.0})
        writers.close()
    assert f"its last line was cut short ({len(TORN)} bytes, kept in" in caplog.text
    assert [r["step"] for r in metrics.read_jsonl(str(path))] == [6, 8]
    assert (run / "metrics.jsonl.torn").read_bytes() == TORN + b"\n"  # nothing lost
    path.write_bytes(path.read_bytes().replace(b'"step": 6', b'"step": ?'))  # damage in the middle is not a torn end
    with pytest.raises(errors.InputError, match=r"metrics.jsonl: line 1 is not a JSON row"):
        metrics.read_jsonl(str(path))


def test_dangling_links_and_stray_entries_in_checkpoints_are_reported_once_and_skipped(tmp_path, caplog):
    _save(tmp_path, [1])
    root = pathlib.Path(ckpt.checkpoint_dir(str(tmp_path)))
    os.symlink(tmp_path / "gone", root / "2")  # a checkpoint moved away by hand
    (root / "notes.txt").write_text("mine")
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        c = ckpt.Checkpointer(str(tmp_path), async_save=False)
    assert caplog.text.count("dangling links ['2'] (to missing targets) skipped, renamed ['2.dangling']") == 1
    assert "entries ['notes.txt'] are not checkpoints, skipped" in caplog.text
    assert c.all_steps() == [1]
    c.save(2, _state(2), {"samples": 16}, {})  # the step the link blocked saves
    c.close()
    assert sorted(os.listdir(root)) == ["1", "2", "2.dangling", "notes.txt"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neox_jax"):
        ckpt.Checkpointer(str(tmp_path), async_save=False).close()
    assert "dangling links" not in caplog.text  # reported once: what was set aside is not reported again


def test_a_bin_of_another_dataset_is_refused(tmp_path):
    a = _pair(tmp_path / "a", [np.arange(1, 50)])
    b = _pair(tmp_path / "b", [np.arange(1, 90)])
    shutil.copy(b + ".bin", a + ".bin")
    with pytest.raises(indexed.IndexedFormatError, match=r"a\.bin: 178 bytes, but .*a\.idx describes 98 \(49 tokens "
                                                         r"of uint16\); the two files are not one pair"):
        indexed.IndexedDataset(a)


def test_a_resume_on_changed_data_is_refused_unless_asked(tmp_path):
    prefix = _pair(tmp_path / "d", [np.arange(1, 200)])
    it = dataset.TrainIterator([prefix], [1.0], seq_len=8, global_batch=4, seed=0)
    next(it)
    state = it.get_state()
    _pair(tmp_path / "d", [np.arange(2, 201)])  # preprocessed again from other text, same name and size
    again = dataset.TrainIterator([prefix], [1.0], seq_len=8, global_batch=4, seed=0)
    with pytest.raises(dataset.ResumeError, match=rf"data.train_paths: {prefix} changed since the checkpoint was saved "
                                                  r"\(bin_ends_sha256 differ\); .*allow_changed_data=true"):
        again.set_state(state)
    again.set_state(state, allow_changed_data=True)
    assert again.samples == 4


SMALL = {"model.num_layers": 2, "model.hidden_size": 64, "model.num_heads": 4, "train.seq_len": 32,
         "train.batch_size": 8, "train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
         "train.eval_every": 0, "optimizer.warmup_steps": 2}


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_available(), reason="needs unprivileged user namespaces to mount a small tmpfs")
def test_a_run_that_fills_the_disk_ends_in_one_line_and_resumes_once_space_is_free(tmp_path, capsys):
    """The workdir on a 70 MB disk: step 3's checkpoint (~47 MB) fits, step 6's does not. The run ends in one line
    (no tracebacks from the TensorBoard writer or orbax's abandoned writes); the workdir, copied to a disk with
    room, resumes from step 3 and finishes (metrics.jsonl and energy totals readable)."""
    (tmp_path / "disk").mkdir()
    flags = " ".join(f"--config.{k}={v}" for k, v in SMALL.items())
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=70m tmpfs {tmp_path}/disk && {sys.executable} "
                           f"{ROOT}/scripts/train.py --config {TINY_PY} {flags} --workdir {tmp_path}/disk/run; "
                           f"status=$?; cp -a {tmp_path}/disk/run {tmp_path}/run; exit $status"],
                          capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"FATAL: checkpoint step 6 could not be written to {tmp_path}/disk/run/checkpoints: the disk is full (no space "
        "left on device); the newest complete checkpoint is step 3; run the same command again to resume from it once "
        "space is free (the partial folder it left is ignored)"], proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout
    last = trainer.train(tiny_py(**SMALL), str(tmp_path / "run"))
    assert "at step 3" in capsys.readouterr().out and last["step"] == 6
