"""Preprocessing that resumes (data/resumable.py) and spreads over parts merged back (data/parts.py): the bytes of a
run stopped anywhere and resumed, and of N parts merged, against one uninterrupted run of the same inputs."""

import filecmp
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from conftest import FIXTURES, ROOT, script_env
from neox_jax import errors
from neox_jax.data import default_paths, indexed, manifest, parts, preprocess as pp, resumable
from neox_jax.data.documents import iter_documents
from test_data_preprocess import doc, pile_docs, write_jsonl
from tiny_configs import script

VAL = default_paths()["val"]


def _same_pair(a, b):
    return all(filecmp.cmp(a + s, b + s, shallow=False) for s in (".bin", ".idx"))


def _outputs_of(folder, stem):
    return sorted(n for n in os.listdir(folder) if n.startswith(stem) and n.endswith((".bin", ".idx")))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The bundled validation sample as 7 jsonl shards (some with a bad line and a duplicate), and one run over all."""
    folder = tmp_path_factory.mktemp("shards")
    docs = [doc(d["text"], d["meta"]["pile_set_name"]) for d in pile_docs(VAL)]
    docs = docs + docs[:3]  # exact duplicates for --dedup
    names = []
    for i in range(7):
        lines = docs[i::7] + (["not json"] if i == 2 else [])
        names.append(write_jsonl(str(folder / f"in{i}.jsonl"), lines))
    return folder, names


def _interrupted(monkeypatch, after_chunks, **kw):
    """preprocess, stopped by a KeyboardInterrupt (as Ctrl-C or SIGTERM) when chunk `after_chunks` + 1 is written."""
    real, calls = pp._Outputs.write, []

    def write(self, *args):
        calls.append(1)
        if len(calls) > after_chunks:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(pp._Outputs, "write", write)
    with pytest.raises(KeyboardInterrupt):
        pp.preprocess(**kw)
    monkeypatch.setattr(pp._Outputs, "write", real)


@pytest.mark.parametrize("settings", [{}, {"dedup": True, "split_by_component": True}])
def test_stopped_anywhere_then_resumed_is_byte_identical(tmp_path, shards, monkeypatch, settings):
    folder, names = shards
    monkeypatch.setattr(pp, "_CHUNK_DOCS", 2)
    common = dict(inputs=names, workers=2, progress=False, skip_bad=True, **settings)
    reference = pp.preprocess(output_prefix=str(tmp_path / "ref"), **common)
    for k in (0, 1, 4, 9):
        prefix = str(tmp_path / f"k{k}")
        _interrupted(monkeypatch, k, output_prefix=prefix, progress_every=0, **common)
        assert not _outputs_of(tmp_path, f"k{k}")  # nothing final before the run is complete
        for name in os.listdir(tmp_path):  # a killed run may have written past its last record
            if name.startswith(f"k{k}") and name.endswith(".partial"):
                with open(tmp_path / name, "ab") as f:
                    f.write(b"\x07" * 5)
        resumed = pp.preprocess(output_prefix=prefix, resume=True, progress_every=0, **common)
        assert (resumed.docs, resumed.tokens, resumed.bad, resumed.duplicates_dropped, resumed.per_component) == (
            reference.docs, reference.tokens, reference.bad, reference.duplicates_dropped, reference.per_component)
        for key, ref_prefix in reference.outputs.items():
            assert _same_pair(ref_prefix, resumed.outputs[key]), (k, key)
            assert manifest.verify(resumed.outputs[key]) == []
        assert not [n for n in os.listdir(tmp_path) if n.endswith((".partial", resumable.SUFFIX))]


def test_resume_refuses_other_inputs_tokenizer_and_settings(tmp_path, shards, monkeypatch):
    folder, names = shards
    monkeypatch.setattr(pp, "_CHUNK_DOCS", 2)
    prefix = str(tmp_path / "p")
    _interrupted(monkeypatch, 2, inputs=names, output_prefix=prefix, progress=False, progress_every=0, skip_bad=True)
    record = str(tmp_path / "p.progress.json")
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_bytes(gzip.decompress((FIXTURES / "tokenizers" / "gpt2_tokenizer.json.gz").read_bytes()))
    cases = [
        (dict(inputs=names[:3]), f"--resume: {record} was recorded for other inputs: 7 then, 3 now; input 4 was "
                                 f"{names[3]}, is (none); run without --resume to start over (that discards it)"),
        (dict(inputs=names, tokenizer_path=str(gpt2)), "was recorded with another tokenizer: "),
        (dict(inputs=names, skip_bad=False), "was recorded with skip_bad=True, now False"),
    ]
    for kw, message in cases:
        kw = {"skip_bad": True, **kw}
        with pytest.raises(errors.InputError) as e:
            pp.preprocess(output_prefix=prefix, progress=False, resume=True, **kw)
        assert message in str(e.value) and str(e.value).count("\n") == 0, str(e.value)
    with open(names[0], "a") as f:  # an input that changed since
        f.write(doc("one more") + "\n")
    with pytest.raises(errors.InputError, match=f"for other contents of input {names[0]}: its bytes was"):
        pp.preprocess(names, prefix, progress=False, resume=True, skip_bad=True)
    assert os.path.exists(record)  # a refused resume loses nothing


def test_without_resume_progress_is_discarded_and_said(tmp_path, shards, monkeypatch, caplog):
    folder, names = shards
    monkeypatch.setattr(pp, "_CHUNK_DOCS", 2)
    prefix = str(tmp_path / "p")
    _interrupted(monkeypatch, 3, inputs=names, output_prefix=prefix, progress=False, progress_every=0, skip_bad=True)
    pp.preprocess(names, prefix, progress=False, skip_bad=True)
    assert f"discarded the progress of an unfinished run of {prefix} (6 documents, up to line" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["p.bin", "p.idx", "p.manifest.json"]
    caplog.clear()
    pp.preprocess(names, str(tmp_path / "q"), progress=False, skip_bad=True, resume=True)  # nothing to resume
    assert "--resume: no progress recorded for" in caplog.text


def test_documents_read_from_a_position_are_those_after_it(shards):
    folder, names = shards
    every = list(iter_documents(names, skip_bad=True))
    for i in (0, 5, 17, len(every) - 1):
        assert list(iter_documents(names, skip_bad=True, start=every[i].position)) == every[i + 1:]


def _kill_after(prefix, args, docs_at_least, env):
    """preprocess_data.py as a process, killed with SIGKILL once its progress record counts `docs_at_least`."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "preprocess_data.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    record, deadline = prefix + resumable.SUFFIX, time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        try:
            with open(record) as f:
                if json.load(f)["summary"]["docs"] >= docs_at_least:
                    break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    return proc


@pytest.mark.slow
def test_kill_9_at_several_points_then_resume_is_byte_identical(tmp_path):
    """The real thing: SIGKILL, so no exit path runs and the partial files hold whatever was written after the last
    record; resumed with the same command plus --resume."""
    texts = [doc(f"document {i} " + "lorem ipsum dolor sit amet " * (50 + i % 97)) for i in range(6000)]
    src = write_jsonl(str(tmp_path / "big.jsonl"), texts)  # ~10 MB: seconds of tokenizing on one worker
    base = [src, "--workers", "1", "--no-progress", "--progress-every", "0"]
    script("preprocess_data").main([*base, "--output-prefix", str(tmp_path / "ref")])
    env = script_env(1)
    points = []
    for n, at in enumerate((500, 2500, 4500)):
        prefix = str(tmp_path / f"k{n}")
        proc = _kill_after(prefix, [*base, "--output-prefix", prefix], at, env)
        assert proc.returncode == -signal.SIGKILL
        assert not indexed.exists(prefix)
        points.append(json.load(open(prefix + resumable.SUFFIX))["summary"]["docs"])
        out = subprocess.run([sys.executable, str(ROOT / "scripts" / "preprocess_data.py"), *base, "--output-prefix",
                              prefix, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert f"--resume: continuing {prefix} after line" in out.stderr
        assert _same_pair(str(tmp_path / "ref"), prefix)
        assert not [n for n in os.listdir(tmp_path) if n.endswith((".partial", resumable.SUFFIX))]
    assert points == sorted(points) and 0 < points[0] < points[-1] < 6000, points


# ---- parts and merge -------------------------------------------------------------------------------------------

def test_split_keeps_order_balances_bytes_and_leaves_no_part_empty(tmp_path):
    names = []
    for i, size in enumerate([100, 100, 100, 100, 5000, 100, 100]):
        (tmp_path / f"f{i}").write_bytes(b"x" * size)
        names.append(str(tmp_path / f"f{i}"))
    for n in range(1, 8):
        groups = parts.split(names, n)
        assert [x for g in groups for x in g] == names and len(groups) == n and all(groups)
    assert parts.split(names, 3) == [names[:4], names[4:5], names[5:]]
    with pytest.raises(errors.InputError, match="--parts 8: the inputs are split by whole files, and there are 7"):
        parts.split(names, 8)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_parts_merged_equal_one_run(tmp_path, shards, n, capsys):
    folder, names = shards
    main = script("preprocess_data").main
    common = [",".join(names), "--skip-bad", "--no-progress", "--workers", "1"]
    main([*common, "--output-prefix", str(tmp_path / "one")])
    for i in range(n):  # what the array's tasks run
        main([*common, "--output-prefix", str(tmp_path / "m"), "--parts", str(n), "--part", str(i)])
    main([*common, "--output-prefix", str(tmp_path / "m"), "--parts", str(n), "--merge"])
    assert f"merged {n} parts: " in capsys.readouterr().out
    assert _same_pair(str(tmp_path / "one"), str(tmp_path / "m"))
    assert sorted(os.listdir(tmp_path)) == ["m.bin", "m.idx", "m.manifest.json", "one.bin", "one.idx",
                                            "one.manifest.json"]  # the parts are removed once merged
    merged = manifest.read(str(tmp_path / "m"))
    assert [i["name"] for i in merged["inputs"]] == names and manifest.verify(str(tmp_path / "m")) == []
    assert merged["bin"] == manifest.read(str(tmp_path / "one"))["bin"]


def test_merge_refuses_other_tokenizers_types_missing_parts_and_foreign_parts(tmp_path, shards, capsys):
    folder, names = shards
    merge = script("merge_data").main
    gpt2 = tmp_path / "gpt2.json"
    gpt2.write_bytes(gzip.decompress((FIXTURES / "tokenizers" / "gpt2_tokenizer.json.gz").read_bytes()))
    pp.preprocess(names[:2], str(tmp_path / "a"), progress=False, skip_bad=True)
    pp.preprocess(names[2:4], str(tmp_path / "b"), str(gpt2), progress=False, skip_bad=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        merge([str(tmp_path / "a"), str(tmp_path / "b"), "--output-prefix", str(tmp_path / "out" / "ab")])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"FATAL: merge: {tmp_path / 'b'} was tokenized with {gpt2} (sha256 ") and err.endswith(
        "pairs of different tokenizers cannot be merged; nothing was written") and err.count("\n") == 0, err
    data = indexed.IndexedDataset(str(tmp_path / "a"))
    with indexed.IndexedWriter(str(tmp_path / "wide"), np.int32) as w:
        w.add(data[0])
    with pytest.raises(errors.InputError, match=r"the pairs hold tokens of different types \(.*a uint16, .*wide int32"):
        parts.merge([str(tmp_path / "a"), str(tmp_path / "wide")], str(tmp_path / "out" / "x"))
    with pytest.raises(errors.InputError, match=r"merge: .*/nothing.bin/.idx not found; nothing was written"):
        parts.merge([str(tmp_path / "a"), str(tmp_path / "nothing")], str(tmp_path / "out" / "x"))
    with pytest.raises(errors.InputError, match=r"was made from other inputs .* than part 1 of these"):
        parts.merge([str(tmp_path / "a"), str(tmp_path / "a")], str(tmp_path / "out" / "x"),
                    expect_inputs=[names[:2], names[2:4]])
    assert os.listdir(tmp_path / "out") == []
    (tmp_path / "same").mkdir()  # GPT-NeoX's merge_datasets: every pair of a folder, sorted by name
    for name, group in {"s2": names[4:], "s0": names[:2], "s1": names[2:4]}.items():
        pp.preprocess(group, str(tmp_path / "same" / name), progress=False, skip_bad=True)
    merge(["--input", str(tmp_path / "same"), "--output-prefix", str(tmp_path / "out" / "all")])
    pp.preprocess(names, str(tmp_path / "one"), progress=False, skip_bad=True)
    assert _same_pair(str(tmp_path / "one"), str(tmp_path / "out" / "all"))


def test_merge_streams_in_flat_memory(tmp_path):
    """40 MB of tokens merged through blocks: Python/numpy allocations stay a fraction of the data."""
    rng = np.random.default_rng(0)
    prefixes = []
    for i in range(2):
        prefixes.append(str(tmp_path / f"p{i}"))
        with indexed.IndexedWriter(prefixes[-1], np.uint16) as w:
            for _ in range(20):
                w.add_many(rng.integers(0, 50000, 500_000), np.full(1000, 500))
    tracemalloc.start()
    done = parts.merge(prefixes, str(tmp_path / "all"))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert done["bytes"] == 40_000_000 and peak < 3 * indexed.COPY_BLOCK, peak
    merged, first = indexed.IndexedDataset(str(tmp_path / "all")), indexed.IndexedDataset(prefixes[0])
    assert len(merged) == 40_000 and np.array_equal(merged[19_999], first[19_999])
    assert np.array_equal(merged.doc_idx, np.arange(40_001))


def test_local_parts_and_the_slurm_scripts(tmp_path, shards, capsys):
    folder, names = shards
    main = script("preprocess_data").main
    common = [str(folder / "in*.jsonl"), "--skip-bad", "--no-progress", "--workers", "2"]
    main([*common, "--output-prefix", str(tmp_path / "one")])
    main([*common, "--output-prefix", str(tmp_path / "local"), "--parts", "3"])
    assert _same_pair(str(tmp_path / "one"), str(tmp_path / "local"))
    main([*common, "--output-prefix", str(tmp_path / "s"), "--parts", "3", "--slurm", "--no-submit",
          "--slurm-args=--partition=cpu --time=2:00:00"])
    array = (tmp_path / "s.parts.sbatch").read_text()
    assert "#SBATCH --array=0-2\n" in array and "#SBATCH --partition=cpu\n#SBATCH --time=2:00:00\n" in array
    assert array.rstrip().endswith('--parts 3 --no-progress --append-eod --skip-bad --part "$SLURM_ARRAY_TASK_ID" '
                                   "--resume")
    assert (tmp_path / "s.merge.sbatch").read_text().rstrip().endswith("--skip-bad --merge")
    with pytest.raises(SystemExit):
        main([*common, "--output-prefix", str(tmp_path / "d"), "--parts", "2", "--dedup"])
    assert "--parts: --dedup and --split-by-component need every document in one run" in capsys.readouterr().err


def test_stopped_while_renaming_or_before_removing_the_record_resumes_too(tmp_path, shards, monkeypatch):
    """The last moments of a run: killed between renaming the .bin and the .idx into place, or after both were
    renamed but before the progress record was removed (simulated: the files as such a kill leaves them)."""
    folder, names = shards
    monkeypatch.setattr(pp, "_CHUNK_DOCS", 2)
    common = dict(inputs=names, progress=False, skip_bad=True)
    pp.preprocess(output_prefix=str(tmp_path / "ref"), **common)
    prefix = str(tmp_path / "p")
    _interrupted(monkeypatch, 3, output_prefix=prefix, progress_every=0, **common)
    os.replace(prefix + ".bin.partial", prefix + ".bin")  # the .bin renamed, the .idx not yet written
    script("preprocess_data").main([",".join(names), "--output-prefix", prefix, "--skip-bad", "--no-progress",
                                    "--resume"])  # without --overwrite: that .bin is not an output yet
    assert _same_pair(str(tmp_path / "ref"), prefix)
    record = json.load(open(tmp_path / "ref.manifest.json"))  # a finished run whose record was left behind
    shutil.copy(tmp_path / "ref.bin", tmp_path / "q.bin")
    shutil.copy(tmp_path / "ref.idx", tmp_path / "q.idx")
    (tmp_path / "q.progress.json").write_text(json.dumps({
        "version": resumable.VERSION, "position": [0, 1], "summary": {}, "run": {
            "inputs": record["inputs"], "tokenizer_path": record["tokenizer"]["path"]},
        "outputs": {"all": {"prefix": str(tmp_path / "q"), "documents": 1, "tokens": 1}}}))
    summary = pp.preprocess(output_prefix=str(tmp_path / "q"), resume=True, **common)
    assert summary.docs == len(indexed.IndexedDataset(str(tmp_path / "ref")))
    assert not os.path.exists(tmp_path / "q.progress.json") and manifest.verify(str(tmp_path / "q")) == []
