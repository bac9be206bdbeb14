"""Faults a user can cause end in one clear line, with nothing lost (issue 15; the table in BUILD.md, "Fault
injection", maps each case to its test here). Cases: token ids outside the vocabulary, damaged checkpoints and a
full disk, orphaned workers and a second trainer on one workdir, tracebacks where one line is promised, non-finite
weights and overwritten outputs in conversion, broken workflows, README commands that did not hold."""

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

from conftest import FIXTURES, ROOT, script_env
from neox_jax import checkpoint as ckpt
from neox_jax import convert, errors, metrics, trainer, weights
from neox_jax.data import dataset, indexed, preprocess
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
    hf = str(TINY_HF)
    line = _fails(generate.main, ["--hf", hf, "--prompt", "a " * 80, "--max_new_tokens", "2"], capsys)
    assert re.search(r"prompt 0 has 8\d tokens, .* max_position_embeddings=64", line)
    assert capsys.readouterr().out == ""  # refused before the prompt is echoed
    generate.main(["--hf", hf, "--prompt", "", "--max_new_tokens", "3", "--output", str(tmp_path / "o.jsonl")])
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
        "--coordinator_address, --num_processes, --process_id, --verbosity, --workdir)")
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
    return last, metrics.read_jsonl(str(tmp / "run" / "metrics.jsonl"))


@pytest.mark.slow
def test_custom_tokenizer_workflow_trains(custom_tokenizer_run):
    last, rows = custom_tokenizer_run
    assert last["step"] == 6 and np.isfinite(last["val_loss"]) and last["unigram_val_loss"] < np.log(512)


@pytest.mark.slow
def test_throughput_excludes_evaluation_time(custom_tokenizer_run):
    _, rows = custom_tokenizer_run
    train = [r for r in rows if r["split"] == "train" and r.get("step_time") is not None]
    assert [r["step"] for r in train] == [2, 3, 4, 5, 6]  # steps 3 and 6 were each followed by a 1 s evaluation
    assert max(r["step_time"] for r in train) < 0.7, [(r["step"], r["step_time"]) for r in train]


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
                               "3", "--seq-len", "16", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["measure", "goal", "measured"] and "loader tokens/s, one core" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
