"""Every file the package writes gets the mode a plain `open(path, "w")` would under the user's umask (shared
storage: colleagues must be able to read exports and preprocessed data), atomic writers included."""

import json
import os
import stat

import pytest

from conftest import FIXTURES
from neox_jax import convert, files, weights
from neox_jax.data import indexed, neox_index, preprocess as pp


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(folder):
    """{file name: permission bits} of every file under `folder`."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_umask_is_read_without_changing_it(umask):
    assert files.umask() == umask and os.umask(umask) == umask
    assert files.new_file_mode() == {0o022: 0o644, 0o077: 0o600}[umask]


def test_exports_follow_the_umask(umask, tmp_path):
    expected = {0o022: 0o644, 0o077: 0o600}[umask]
    config, params = convert.load_hf(FIXTURES / "hf_reference" / "tiny-gpt-neox-parallel")
    weights.save_params(config, params, tmp_path / "params")
    convert.save_hf(config, params, tmp_path / "hf")
    convert.save_hf(config, params, tmp_path / "hf_sharded", max_shard_bytes=1 << 14)
    written = {f"{d}/{name}": mode for d in ("params", "hf", "hf_sharded") for name, mode in modes(tmp_path / d).items()}
    assert {"params/params.safetensors", "params/config.json", "hf/model.safetensors",
            "hf_sharded/model.safetensors.index.json"} <= set(written)
    assert len([n for n in written if n.startswith("hf_sharded/model-")]) > 1
    assert written == {name: expected for name in written}


def test_preprocessing_outputs_and_caches_follow_the_umask(umask, tmp_path):
    expected = {0o022: 0o644, 0o077: 0o600}[umask]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} with some words"}) + "\n" for i in range(20)))
    out = tmp_path / "out"
    pp.preprocess(str(source), str(out / "data"), workers=1, progress=False)
    data = indexed.IndexedDataset(str(out / "data"))
    indexed.token_range(data)  # the .ids.json cache
    paths = neox_index.index_paths(str(out / "data"), "train", 8, 4, 1)
    neox_index.load_or_build(paths, data.sizes, (0, len(data.sizes)), 8, 4, 1)
    written = modes(out)
    assert {"data.bin", "data.idx", "data.ids.json"} <= set(written)
    assert sum(name.endswith("_idx.npy") for name in written) == 3
    assert written == {name: expected for name in written}


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with files.atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
