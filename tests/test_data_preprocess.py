"""Tokenizers, Pile preprocessing and the .bin/.idx format, checked against an independent reader."""

import concurrent.futures
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import zstandard

from conftest import FIXTURES
from neox_jax.data import default_paths, indexed, preprocess as pp
from neox_jax.data.documents import DataError, iter_documents
from neox_jax.data.tokenizer import TokenizerError, check_vocab, load_tokenizer, train_sentencepiece
from tiny_configs import script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = default_paths()


def read_megatron(prefix):
    """Independent reader written from the documented MMIDIDX layout (not from neox_jax.data.indexed)."""
    codes = {4: np.int32, 8: np.uint16}
    with open(prefix + ".idx", "rb") as f:
        assert f.read(9) == b"MMIDIDX\x00\x00"
        assert struct.unpack("<Q", f.read(8)) == (1,)
        (code,) = struct.unpack("<B", f.read(1))
        (n,) = struct.unpack("<Q", f.read(8))
        (d,) = struct.unpack("<Q", f.read(8))
        sizes = np.frombuffer(f.read(4 * n), "<i4")
        pointers = np.frombuffer(f.read(8 * n), "<i8")
        doc_idx = np.frombuffer(f.read(8 * d), "<i8")
        assert f.read() == b""
    dtype = np.dtype(codes[code]).newbyteorder("<")
    raw = open(prefix + ".bin", "rb").read()
    docs = [np.frombuffer(raw, dtype, int(s), int(p)) for s, p in zip(sizes, pointers)]
    return code, docs, doc_idx


def write_megatron(prefix, docs, code, dtype):
    """Independent writer of the same layout (what GPT-NeoX's preprocessing produces)."""
    sizes = np.array([len(x) for x in docs], "<i4")
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype("<i8") * np.dtype(dtype).itemsize
    with open(prefix + ".bin", "wb") as f:
        for x in docs:
            f.write(np.asarray(x, dtype).tobytes())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(docs), len(docs) + 1))
        f.write(sizes.tobytes() + pointers.tobytes() + np.arange(len(docs) + 1, dtype="<i8").tobytes())


def pile_docs(path):
    with open(path, "rb") as f:
        lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(f)).read().splitlines()
    return [json.loads(x) for x in lines]


def write_jsonl(path, lines):
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    if path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as f:
        f.write(data)
    return path


def doc(text, name="Pile-CC"):
    return json.dumps({"text": text, "meta": {"pile_set_name": name}})


@pytest.fixture(scope="module")
def val_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("val") / "val")
    pp.preprocess(ASSETS["val"], prefix, workers=1, progress=False)
    return prefix


def test_bundled_20b_tokenizer_matches_published_ids():
    tok = load_tokenizer()
    assert (tok.vocab_size, tok.eod_id) == (50277, 0)
    assert tok.encode("Hello world") == [12092, 1533]


def test_gpt2_tokenizer_matches_published_ids(tmp_path):
    path = tmp_path / "gpt2_tokenizer.json"
    path.write_bytes(gzip.decompress((FIXTURES / "tokenizers" / "gpt2_tokenizer.json.gz").read_bytes()))
    gpt2 = load_tokenizer(str(path))
    assert (gpt2.vocab_size, gpt2.eod_id, gpt2.encode("Hello world")) == (50257, 50256, [15496, 995])


def test_check_vocab_names_both_sizes():
    tok = load_tokenizer()
    check_vocab(tok, 50304)
    with pytest.raises(TokenizerError) as e:
        check_vocab(tok, 50176)
    assert str(e.value) == (f"tokenizer {ASSETS['tokenizer']} has 50277 ids but the model's padded vocabulary holds "
                            "only 50176 (set model.vocab_size >= 50277)")


def test_val_file_round_trips_through_independent_reader(val_prefix):
    code, docs, doc_idx = read_megatron(val_prefix)
    originals = pile_docs(ASSETS["val"])
    tok = load_tokenizer()
    assert code == 8  # uint16: the 20B vocabulary fits
    assert len(docs) == len(originals) == 23
    assert doc_idx.tolist() == list(range(24))
    for toks, original in zip(docs, originals):
        assert toks[-1] == 0 and 0 not in toks[:-1]  # exactly one EOD, at the end
        assert tok.decode(toks[:-1]) == original["text"]
    assert os.path.getsize(val_prefix + ".bin") == 2 * sum(len(x) for x in docs)


@pytest.mark.parametrize("code,dtype", [(8, np.uint16), (4, np.int32)])
def test_reads_gpt_neox_written_files(tmp_path, code, dtype):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, n) for n in (5, 1, 300, 17)]
    write_megatron(str(tmp_path / "neox"), docs, code, dtype)
    ds = indexed.IndexedDataset(str(tmp_path / "neox.idx"))
    assert ds.dtype == dtype and len(ds) == 4
    for i, x in enumerate(docs):
        np.testing.assert_array_equal(ds[i], x)
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    with indexed.IndexedWriter(str(tmp_path / "ours"), dtype) as w:
        for x in docs:
            w.add(x)
    assert open(tmp_path / "ours.idx", "rb").read() == open(tmp_path / "neox.idx", "rb").read()
    assert open(tmp_path / "ours.bin", "rb").read() == open(tmp_path / "neox.bin", "rb").read()


def test_token_dtype_follows_vocab():
    assert indexed.token_dtype(50277) == np.uint16 and indexed.token_dtype(65500) == np.int32


def test_not_an_index_is_refused(tmp_path):
    (tmp_path / "x.idx").write_bytes(b"TNTIDX\x00\x00" + bytes(40))
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(indexed.IndexedFormatError, match=r"x.idx: not an MMIDIDX index"):
        indexed.IndexedDataset(str(tmp_path / "x"))


def _truncated_zst(path):
    """Two zstd frames: lines 1-3 complete, the second frame (lines 4-5) cut short."""
    good = zstandard.ZstdCompressor().compress("".join(doc(f"doc {i}") + "\n" for i in range(3)).encode())
    rest = zstandard.ZstdCompressor().compress("".join(doc(f"doc {i} " * 50) + "\n" for i in range(3, 5)).encode())
    with open(path, "wb") as f:
        f.write(good + rest[: len(rest) // 2])
    return path


def _truncated_gz(path):
    data = gzip.compress("".join(doc(f"doc {i} " * 200) + "\n" for i in range(5)).encode())
    with open(path, "wb") as f:
        f.write(data[: len(data) - 20])
    return path


BAD_CASES = {
    "malformed_json": (lambda p: write_jsonl(p + ".jsonl", [doc("a"), '{"text": "abc"', doc("b")]),
                       2, "malformed JSON (Expecting ',' delimiter at column 15)"),
    "invalid_utf8": (lambda p: write_jsonl(p + ".jsonl", [doc("a"), doc("b"), b'{"text": "caf\xe9 x"}']),
                     3, "invalid UTF-8 at byte 13 of the line (invalid continuation byte)"),
    "missing_text": (lambda p: write_jsonl(p + ".jsonl.zst", [doc("a"), '{"meta": {"pile_set_name": "x"}}']),
                     2, 'no "text" string field (expected {"text": ..., "meta": {...}})'),
    "empty_document": (lambda p: write_jsonl(p + ".jsonl", [doc(" \n\t ")]),
                       1, 'empty document ("text" has no non-space characters)'),
    "truncated": (lambda p: _truncated_zst(p + ".jsonl.zst"),
                  4, "truncated zstd stream (the file ends inside a compressed frame)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_input_stops_with_file_and_line(tmp_path, kind):
    make, line, detail = BAD_CASES[kind]
    path = make(str(tmp_path / "in"))
    with pytest.raises(DataError) as e:
        pp.preprocess(path, str(tmp_path / "out"), workers=1, progress=False)
    assert str(e.value) == f"{path}:{line}: {detail}"
    assert e.value.kind == kind
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # nothing written, no temporary left


def test_truncated_gzip(tmp_path):
    path = _truncated_gz(str(tmp_path / "in.jsonl.gz"))
    with pytest.raises(DataError, match=r"in.jsonl.gz:\d+: truncated gzip stream"):
        list(iter_documents(path))


def test_skip_bad_counts_every_kind(tmp_path):
    paths = [make(str(tmp_path / k)) for k, (make, _, _) in sorted(BAD_CASES.items())]
    s = pp.preprocess(paths, str(tmp_path / "out"), workers=1, skip_bad=True, progress=False)
    assert dict(s.bad) == {k: 1 for k in BAD_CASES}
    # good documents: a,b (json) + a,b (utf8) + a (missing) + doc 0..2 before the truncation
    tok = load_tokenizer()
    texts = [tok.decode(x[:-1]) for x in read_megatron(str(tmp_path / "out"))[1]]
    assert texts == ["a", "b", "a", "b", "a", "doc 0", "doc 1", "doc 2"]
    assert "skipped bad input: malformed_json=1, invalid_utf8=1, missing_text=1, empty_document=1, truncated=1" \
        in s.format()


@pytest.mark.parametrize("workers", [1, 2])
def test_failing_input_after_some_documents_leaves_no_output(tmp_path, workers):
    good = write_jsonl(str(tmp_path / "a.jsonl"), [doc(f"document {i}") for i in range(2000)])
    bad = write_jsonl(str(tmp_path / "b.jsonl"), [doc("fine"), "not json"])
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="b.jsonl:2: malformed JSON"):
        pp.preprocess([good, bad], str(tmp_path / "out" / "data"), workers=workers, progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_split_by_component_and_dedup(tmp_path):
    path = write_jsonl(str(tmp_path / "in.jsonl"), [
        doc("alpha beta", "Github"), doc("gamma", "Wikipedia (en)"), doc("Alpha   BETA", "Github"),
        doc("gamma", "Pile-CC"), doc("delta", "Wikipedia (en)")])
    s = pp.preprocess(path, str(tmp_path / "out"), workers=1, split_by_component=True, dedup=True,
                      progress=False)
    assert s.duplicates_dropped == 2
    assert s.outputs == {"Github": str(tmp_path / "out_Github"), "Wikipedia (en)": str(tmp_path / "out_Wikipedia_en")}
    tok = load_tokenizer()
    assert [tok.decode(x) for x in read_megatron(s.outputs["Wikipedia (en)"])[1]] == \
        ["gamma<|endoftext|>", "delta<|endoftext|>"]


def test_txt_input_is_one_document_without_eod(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    s = pp.preprocess(str(tmp_path / "a.txt"), str(tmp_path / "out"), workers=1, append_eod=False,
                      progress=False)
    assert s.per_component == {"a.txt": [1, s.tokens]}
    assert load_tokenizer().decode(read_megatron(str(tmp_path / "out"))[1][0]) == "line one\nline two\n"


def test_prepare_dataset_caches_by_content(tmp_path):
    src = write_jsonl(str(tmp_path / "c.jsonl"), [doc("cached text"), doc("more")])
    first = pp.prepare_dataset(src, cache_dir=str(tmp_path / "cache"), progress=False)
    mtime = os.path.getmtime(first + ".idx")
    assert pp.prepare_dataset(src, cache_dir=str(tmp_path / "cache"), progress=False) == first
    assert os.path.getmtime(first + ".idx") == mtime
    write_jsonl(src, [doc("changed text")])
    second = pp.prepare_dataset(src, cache_dir=str(tmp_path / "cache"), progress=False)
    assert second != first and len(indexed.IndexedDataset(second)) == 1


def test_builders_of_one_cache_entry_take_turns(tmp_path):
    """Runs started together on a fresh machine (a sweep, the tests' workers) all build the bundled sample's cache
    entry: the resumable writer's unfinished files have fixed names, so without the lock they wrote into each
    other's and one ended with an error (seen: an IndexError in the .idx writer, then a missing .sizes.partial)."""
    src = ASSETS["val"]
    cache, n = str(tmp_path / "cache"), 4
    start = threading.Barrier(n)

    def build(_):
        start.wait()
        return pp.prepare_dataset(src, cache_dir=cache, progress=False)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:  # flock holds between two opens in one process too
        prefixes = set(pool.map(build, range(n)))
    alone = pp.prepare_dataset(src, cache_dir=str(tmp_path / "alone"), progress=False)
    (prefix,) = prefixes
    for suffix in (".bin", ".idx"):
        assert open(prefix + suffix, "rb").read() == open(alone + suffix, "rb").read()
    assert not [f for f in os.listdir(cache) if f.endswith((".partial", ".tmp"))]  # no unfinished file left


def test_train_sentencepiece_and_preprocess_with_it(tmp_path):
    model = train_sentencepiece([ASSETS["val"]], str(tmp_path / "sp"), 400)
    tok = load_tokenizer(model)
    assert (tok.kind, tok.vocab_size, tok.eod_id) == ("sentencepiece", 400, 0)
    text = "def main():\n    return 42  # café"
    assert tok.decode(tok.encode(text)) == text
    s = pp.preprocess(write_jsonl(str(tmp_path / "x.jsonl"), [doc(text)]), str(tmp_path / "sp_out"),
                      tokenizer_path=model, workers=1, progress=False)
    code, docs, _ = read_megatron(str(tmp_path / "sp_out"))
    assert code == 8 and docs[0][-1] == 0 and tok.decode(docs[0][:-1]) == text and s.docs == 1


@pytest.mark.slow
def test_cli_whole_train_sample_two_workers(tmp_path):
    """The acceptance command: the whole bundled train sample, 2 worker processes."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "preprocess_data.py"), ASSETS["train"],
                          "--workers", "2", "--output-prefix", str(tmp_path / "train")],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    assert "362 documents" in out.stdout and "Github: 153 documents" in out.stdout
    code, docs, doc_idx = read_megatron(str(tmp_path / "train"))
    originals = pile_docs(ASSETS["train"])
    assert code == 8 and len(docs) == len(originals) == 362 and len(doc_idx) == 363
    tok = load_tokenizer()
    for i in range(0, 362, 9):
        assert docs[i][-1] == 0 and tok.decode(docs[i][:-1]) == originals[i]["text"]


def test_cli_reports_bad_input(tmp_path):
    path = write_jsonl(str(tmp_path / "bad.jsonl"), [doc("a"), "{"])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "preprocess_data.py"), path,
                          "--workers", "1", "--output-prefix", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2  # bad input (README, "When something goes wrong")
    assert out.stderr.strip() == (f"FATAL: {path}:2: malformed JSON (Expecting property name enclosed in double "
                                  "quotes at column 2) (--skip-bad skips and counts bad lines)")


def test_documents_spanning_decompression_chunks_are_read_whole():
    """The train sample decompresses in several chunks; every line must come out whole and in order."""
    texts = [d.text for d in iter_documents(ASSETS["train"])]
    assert texts == [x["text"] for x in pile_docs(ASSETS["train"])]


def test_whitespace_only_documents_policy(tmp_path):
    path = write_jsonl(str(tmp_path / "ws.jsonl"), [doc("a"), doc("  \n "), doc(""), doc("b")])
    with pytest.raises(DataError, match="ws.jsonl:2: empty document"):  # the default: bad input
        pp.preprocess(path, str(tmp_path / "strict"), workers=1, progress=False)
    skipped = pp.preprocess(path, str(tmp_path / "skip"), workers=1, skip_bad=True, progress=False)
    assert (skipped.docs, dict(skipped.bad)) == (2, {"empty_document": 2})
    # GPT-NeoX: lm_dataformat's reader drops "" and the whitespace-only text is tokenized as a document
    kept = pp.preprocess(path, str(tmp_path / "kept"), workers=1, keep_whitespace_docs=True, progress=False)
    assert (kept.docs, dict(kept.bad)) == (3, {"empty_document": 1})
    tok = load_tokenizer()
    assert [list(x) for x in read_megatron(str(tmp_path / "kept"))[1]] == \
        [tok.encode(t) + [tok.eod_id] for t in ("a", "  \n ", "b")]


def test_gpt_neox_output_names_are_written_and_found(tmp_path):
    from neox_jax.data.dataset import resolve_paths

    path = write_jsonl(str(tmp_path / "in.jsonl"), [doc("alpha", "Github"), doc("beta", "Pile-CC")])
    s = pp.preprocess(path, str(tmp_path / "pile"), workers=1, neox_names=True, progress=False)
    assert s.outputs == {"all": str(tmp_path / "pile_text_document")}
    assert resolve_paths(str(tmp_path / "pile")) == [str(tmp_path / "pile_text_document")]
    s = pp.preprocess(path, str(tmp_path / "parts"), workers=1, neox_names=True, split_by_component=True,
                      progress=False)
    assert sorted(s.outputs.values()) == [str(tmp_path / f"parts_{c}_text_document") for c in ("Github", "Pile_CC")]


def test_add_special_tokens_adds_the_tokenizers_bos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "bos.json"))
    path = write_jsonl(str(tmp_path / "in.jsonl"), [doc("hello world"), doc("world")])
    for flag, first in ((False, [[3, 4, 1], [4, 1]]), (True, [[0, 3, 4, 1], [0, 4, 1]])):
        pp.preprocess(path, str(tmp_path / f"out{flag}"), str(tmp_path / "bos.json"), workers=1,
                      add_special_tokens=flag, progress=False)
        assert [list(x) for x in read_megatron(str(tmp_path / f"out{flag}"))[1]] == first


# ---- Parquet inputs (issue 29, part 1) -------------------------------------------------------------------------

def _parquet(path, docs, row_group_size=None, text_key="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({text_key: [d["text"] for d in docs],
                      "meta": [{"pile_set_name": d["meta"]["pile_set_name"]} for d in docs]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def _outputs(prefix):
    return open(prefix + ".bin", "rb").read(), open(prefix + ".idx", "rb").read()


def test_parquet_shards_give_the_bytes_jsonl_and_zst_give(tmp_path):
    """The bundled validation set's Pile documents as .jsonl, .jsonl.zst, one Parquet file of several row groups (read
    a batch at a time), a directory of 3 Parquet shards and a dataset saved by `datasets`: byte-identical .bin/.idx,
    components from the meta column."""
    docs = pile_docs(ASSETS["val"])
    lines = [json.dumps(d) for d in docs]
    sources = {
        "jsonl": write_jsonl(str(tmp_path / "d.jsonl"), lines),
        "zst": write_jsonl(str(tmp_path / "d.jsonl.zst"), lines),
        "parquet": _parquet(tmp_path / "d.parquet", docs, row_group_size=5),
    }
    (tmp_path / "shards").mkdir()
    for i, part in enumerate((docs[:8], docs[8:15], docs[15:])):
        _parquet(tmp_path / "shards" / f"part-{i:05d}.parquet", part)
    sources["shards"] = str(tmp_path / "shards")
    datasets = pytest.importorskip("datasets")
    saved = datasets.Dataset.from_dict({"text": [d["text"] for d in docs], "meta": [d["meta"] for d in docs]})
    saved.save_to_disk(str(tmp_path / "saved"))
    sources["saved dataset"] = str(tmp_path / "saved")
    written = {}
    for name, src in sources.items():
        summary = pp.preprocess(src, str(tmp_path / name / "out"), workers=2, progress=False)
        written[name] = _outputs(str(tmp_path / name / "out"))
        assert summary.docs == len(docs) > 20, name
    assert all(v == written["jsonl"] for v in written.values())
    for name in ("parquet", "saved dataset"):
        assert [d.component for d in iter_documents(sources[name])] == [d["meta"]["pile_set_name"] for d in docs]


def test_parquet_text_key_and_bad_files_are_one_line_each(tmp_path):
    docs = [{"text": "hello world", "meta": {"pile_set_name": "x"}}, {"text": "second doc", "meta": {"pile_set_name": "x"}}]
    other = _parquet(tmp_path / "content.parquet", docs, text_key="content")
    assert [d.text for d in iter_documents(other, text_key="content")] == ["hello world", "second doc"]
    with pytest.raises(DataError, match=r"content.parquet:0: no column 'text' \(its columns: content, meta\); "
                                        r"choose one with --text-key"):
        list(iter_documents(other))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints.parquet:0: column 'text' holds int64, expected strings"):
        list(iter_documents(str(tmp_path / "ints.parquet")))
    whole = open(_parquet(tmp_path / "whole.parquet", docs * 50), "rb").read()
    (tmp_path / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.parquet:0: not a readable Parquet file"):
        pp.preprocess(str(tmp_path / "cut.parquet"), str(tmp_path / "out" / "cut"), workers=1, progress=False)
    assert not os.path.exists(tmp_path / "out" / "cut.bin")  # nothing half-written
    datasets = pytest.importorskip("datasets")
    both = datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["a b"]}),
                                test=datasets.Dataset.from_dict({"text": ["c d"]}))
    both.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict:0: holds the splits train, test: give .*dict/<split>"):
        list(iter_documents(str(tmp_path / "dict")))
    from neox_jax import errors

    with pytest.raises(errors.InputError, match=r"input hf:no-such/dataset: could not open it from the Hugging Face"):
        list(iter_documents("hf:no-such/dataset"))


def test_every_pair_gets_a_manifest_that_proves_its_bytes(tmp_path, capsys):
    """preprocess writes PREFIX.manifest.json; verify_data.py finds the files as recorded and as published, then a
    flipped byte in the .bin and a wrong published hash, one line each; training's fingerprint records the
    manifest's hash without making it part of what a resume compares."""
    from neox_jax.data import manifest

    src = write_jsonl(str(tmp_path / "in.jsonl"), [doc("alpha beta gamma"), doc("delta epsilon")])
    prefix = str(tmp_path / "out" / "data")
    pp.preprocess(src, prefix, workers=1, progress=False)
    record = json.loads(open(prefix + ".manifest.json").read())
    assert (record["documents"], record["dtype"]) == (2, "uint16")
    assert record["bin"]["bytes"] == os.path.getsize(prefix + ".bin") and len(record["idx"]["sha256"]) == 64
    assert record["inputs"][0]["name"] == src and record["inputs"][0]["sha256"] == manifest.file_sha256(src)
    assert record["tokenizer"]["sha256"] == manifest.file_sha256(ASSETS["tokenizer"])
    verify = script("verify_data").main
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{manifest.file_sha256(prefix + s)}  data{s}\n" for s in (".bin", ".idx")))
    assert verify([prefix, "--hashes", str(sums)]) == 0
    assert "match their manifest and the published hashes" in capsys.readouterr().out
    fingerprint = indexed.fingerprint(prefix)
    assert fingerprint["manifest_sha256"] == manifest.file_sha256(prefix + ".manifest.json")
    raw = bytearray(open(prefix + ".bin", "rb").read())
    raw[0] ^= 1
    open(prefix + ".bin", "wb").write(bytes(raw))
    assert verify([prefix, "--hashes", str(sums)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{prefix}.bin: sha256 differs (manifest {record['bin']['sha256']}, file ")
    assert out[1].startswith(f"{prefix}.bin: sha256 ") and out[1].endswith("is not the published "
                                                                           f"{record['bin']['sha256']}")
    assert [k for k in indexed.CONTENT_KEYS if fingerprint[k] != indexed.fingerprint(prefix)[k]] == ["bin_ends_sha256"]
    sums.write_text("not a hash line\n")
    with pytest.raises(SystemExit) as stop:
        verify([prefix, "--hashes", str(sums)])
    assert stop.value.code == 2 and "SHA256SUMS:1: expected 'SHA256  FILENAME'" in capsys.readouterr().err
