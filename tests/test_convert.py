"""HF <-> neox_jax conversion against HF's own outputs: the stored reference checkpoints, live transformers on
randomised configs, bit-identical round trips, and every bad-input path naming what is wrong."""

import importlib.util
import json
import shutil

import jax
import numpy as np
import pytest
from safetensors import safe_open

from conftest import FIXTURES, ROOT
from neox_jax import convert, weights
from neox_jax.model import GPTNeoX

TOL = 1e-4
REFERENCES = ("tiny-gpt-neox-parallel", "tiny-gpt-neox-sequential")


def reference_dir(name="tiny-gpt-neox-parallel"):
    return FIXTURES / "hf_reference" / name


def forward(config, params, ids):
    """Logits and HF-style hidden states (embeddings, each layer's output, the last after final_layer_norm)."""
    module = GPTNeoX(config.model)
    logits, state = module.apply({"params": params}, ids, mutable=["intermediates"])
    final, _ = module.apply({"params": params}, ids, method="hidden")
    inter = state["intermediates"]
    per_layer = inter["layers"]["hidden_states"][0]
    hidden = [inter["embeddings"][0]] + [per_layer[i] for i in range(per_layer.shape[0] - 1)] + [final]
    return np.asarray(logits), [np.asarray(h) for h in hidden]


def assert_matches(config, params, ids, logits, hidden_states):
    ours, our_hidden = forward(config, params, ids)
    assert len(our_hidden) == len(hidden_states)
    for i, (a, b) in enumerate(zip(our_hidden, hidden_states)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=f"hidden_state_{i}")
    np.testing.assert_allclose(ours, logits, rtol=0, atol=TOL, err_msg="logits")


def safetensors_dict(path):
    """{name: (dtype, shape, raw bytes)} of every tensor under an HF dir, read with safetensors only."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), sl.get_shape(), sl[:].tobytes() if sl.get_dtype() != "BF16" else None)
    return out


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_logits_and_hidden_states(name):
    d = reference_dir(name)
    config, params = convert.load_hf(d)
    assert config.model.use_parallel_residual == (name == "tiny-gpt-neox-parallel")
    ref = np.load(d / "reference_outputs.npz")
    hidden = [ref[f"hidden_state_{i}"] for i in range(config.model.num_layers + 1)]
    assert_matches(config, params, ref["input_ids"], ref["logits"], hidden)


def test_round_trip_is_bit_identical(tmp_path):
    src = reference_dir()
    config, params = convert.load_hf(src)
    files = convert.save_hf(config, params, tmp_path / "hf")
    assert [f.name for f in files] == ["model.safetensors"]
    original, written = safetensors_dict(src), safetensors_dict(tmp_path / "hf")
    assert sorted(original) == sorted(written)
    for name in original:
        assert original[name] == written[name], name
    config2, _ = convert.load_hf(tmp_path / "hf")
    assert config2.model.to_dict() == config.model.to_dict()


def test_sharded_bf16_round_trip(tmp_path):
    """Index + several shards, and the bfloat16 path (numpy cannot read BF16 by itself)."""
    config, params = convert.load_hf(reference_dir())
    files = convert.save_hf(config, params, tmp_path / "a", dtype="bfloat16", max_shard_bytes=100_000)
    assert len(files) > 1 and (tmp_path / "a" / convert.SAFETENSORS_INDEX).is_file()
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    config_a, params_a = convert.load_hf(tmp_path / "a")
    rounded = jax.tree.map(lambda x: np.asarray(x.astype(jax.numpy.bfloat16).astype(np.float32)), params)
    jax.tree.map(np.testing.assert_array_equal, params_a, rounded)
    convert.save_hf(config_a, params_a, tmp_path / "b", dtype="bfloat16", max_shard_bytes=100_000)
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name


def test_transformers_4x_config_keys(tmp_path):
    src = reference_dir()
    hf = json.loads((src / "config.json").read_text())
    rope = hf.pop("rope_parameters")
    hf.update(rotary_pct=rope["partial_rotary_factor"], rotary_emb_base=rope["rope_theta"], rope_scaling=None,
              torch_dtype=hf.pop("dtype"), transformers_version="4.45.0")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    shutil.copy(src / "model.safetensors", tmp_path)
    config_4x, params_4x = convert.load_hf(tmp_path)
    config_5x, params_5x = convert.load_hf(src)
    assert config_4x.model.to_dict() == config_5x.model.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params_4x, params_5x)


def test_pytorch_bin_with_legacy_buffers(tmp_path):
    torch = pytest.importorskip("torch")
    src = reference_dir()
    with safe_open(src / "model.safetensors", framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    for i in range(2):  # what transformers < 4.31 saved next to the weights
        state[f"gpt_neox.layers.{i}.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
        state[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        state[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = torch.ones(2)
    torch.save(state, tmp_path / "pytorch_model.bin")
    shutil.copy(src / "config.json", tmp_path)
    _, from_bin = convert.load_hf(tmp_path)
    _, from_safetensors = convert.load_hf(src)
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_safetensors)


# ---- live transformers on randomised configs --------------------------------------------------------------

LIVE_CASES = [  # hidden_act, rotary_pct, layer_norm_eps, use_parallel_residual
    ("gelu", 0.25, 1e-5, True),
    ("gelu_new", 0.5, 1e-3, False),
    ("gelu_fast", 1.0, 1e-6, True),
]


def random_hf_model(hidden_act, rotary_pct, eps, parallel, seed):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPTNeoXConfig(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, rotary_pct=rotary_pct, rotary_emb_base=500 + 1000 * seed,
        use_parallel_residual=parallel, layer_norm_eps=eps, hidden_act=hidden_act, tie_word_embeddings=False,
        initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    hf = transformers.GPTNeoXForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits LayerNorms to (1, 0) and biases to 0: randomise them so swaps show
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.config._attn_implementation = "eager"
    return hf


def hf_outputs(hf, ids):
    import torch

    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("case", LIVE_CASES, ids=lambda c: f"{c[0]}-rot{c[1]}-eps{c[2]}-{'par' if c[3] else 'seq'}")
def test_live_transformers(case, tmp_path):
    transformers = pytest.importorskip("transformers")
    seed = LIVE_CASES.index(case)
    hf = random_hf_model(*case, seed=seed)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = np.random.default_rng(seed).integers(0, 96, size=(2, 12)).astype(np.int32)
    logits, hidden = hf_outputs(hf, ids)

    config, params = convert.load_hf(tmp_path / "hf")
    assert config.model.hidden_act == case[0]
    assert config.model.intermediate_size == 48
    assert_matches(config, params, ids, logits, hidden)

    # and back: what save_hf writes (sharded here) loads in transformers and gives the same logits
    convert.save_hf(config, params, tmp_path / "back", max_shard_bytes=40_000)
    reloaded = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert reloaded.config.rope_parameters["partial_rotary_factor"] == case[1]
    back_logits, _ = hf_outputs(reloaded.eval(), ids)
    np.testing.assert_allclose(back_logits, logits, rtol=0, atol=1e-6)


# ---- params that do not fit -------------------------------------------------------------------------------

def test_save_rejects_params_that_do_not_match_config(tmp_path):
    config, params = convert.load_hf(reference_dir())
    params["layers"]["attention"]["dense"]["bias"] = params["layers"]["attention"]["dense"]["bias"][:, :10]
    expected = r"layers/attention/dense/bias has shape \[2, 10\], expected \[2, 64\]"
    with pytest.raises(convert.ConversionError, match=expected):
        convert.save_hf(config, params, tmp_path / "hf")
    with pytest.raises(convert.ConversionError, match="layers/attention/dense/bias"):
        weights.save_params(config, params, tmp_path / "p")


# ---- bad input --------------------------------------------------------------------------------------------

@pytest.fixture
def hf_copy(tmp_path):
    """A writable copy of the parallel reference checkpoint, and a helper that edits its config.json."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(reference_dir() / name, d)

    def edit(**changes):
        hf = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                hf.pop(k, None)
            else:
                hf[k] = v
        (d / "config.json").write_text(json.dumps(hf))
        return d

    return d, edit


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="llama"), r"config.json: model_type is 'llama'; only 'gpt_neox'"),
    (dict(model_type=None), r"config.json: missing required key 'model_type'"),
    (dict(num_hidden_layers=None), r"config.json: missing required key 'num_hidden_layers'"),
    (dict(use_parallel_residual=None, use_parallel_residuals=False),
     r"config.json: unknown key 'use_parallel_residuals'; did you mean 'use_parallel_residual'\?"),
    (dict(num_hidden_layers=None, num_hidden_layer=2),
     r"config.json: unknown key 'num_hidden_layer'; did you mean 'num_hidden_layers'\?"),
    (dict(hidden_size="64"), r"config.json: hidden_size must be a positive integer, got '64'"),
    (dict(tie_word_embeddings=True), r"config.json: tie_word_embeddings=true is not supported"),
    (dict(attention_bias=False), r"config.json: attention_bias=false is not supported"),
    (dict(hidden_act="relu"), r"config.json: hidden_act 'relu' is not supported; expected one of gelu, gelu_new"),
    (dict(rotary_pct=0.5), r"config.json: rotary_pct=0.5 disagrees with rope_parameters \(0.25\)"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0}), r"rope_type='linear' is not supported"),
    (dict(num_attention_heads=5), r"config.json: config field model.hidden_size: 64 is not divisible by num_heads=5"),
])
def test_bad_config(hf_copy, changes, message):
    _, edit = hf_copy
    with pytest.raises(convert.ConversionError, match=message):
        convert.load_hf(edit(**changes))


def test_shape_mismatch_names_tensor_and_file(hf_copy):
    d, edit = hf_copy
    edit(intermediate_size=128)
    with pytest.raises(convert.ConversionError, match=r"model.safetensors: tensor 'gpt_neox.layers.0.mlp.dense_4h_to_h"
                       r".weight' has shape \[64, 256\], expected \[64, 128\] from .*config.json"):
        convert.load_hf(d)


def test_extra_and_missing_tensors(hf_copy):
    d, edit = hf_copy
    edit(num_hidden_layers=1)
    with pytest.raises(convert.ConversionError, match=r"model.safetensors: unexpected tensor 'gpt_neox.layers.1."
                       r"attention.dense.bias'; not part of a GPTNeoXForCausalLM with 1 layers"):
        convert.load_hf(d)
    edit(num_hidden_layers=3)
    with pytest.raises(convert.ConversionError,
                       match=r"tensor\(s\) missing from the weights, first 'gpt_neox.layers.2."):
        convert.load_hf(d)


def test_missing_files(hf_copy, tmp_path):
    d, _ = hf_copy
    with pytest.raises(convert.ConversionError, match="HF checkpoint directory .*nowhere not found"):
        convert.load_hf(tmp_path / "nowhere")
    (d / "model.safetensors").rename(d / "weights.safetensors")
    with pytest.raises(convert.ConversionError, match=r"ckpt: no weights found \(expected model.safetensors"):
        convert.load_hf(d)
    (d / convert.SAFETENSORS_INDEX).write_text(json.dumps({"weight_map": {"embed_out.weight": "shard-1.safetensors"}}))
    with pytest.raises(convert.ConversionError, match=r"shard-1.safetensors listed in .*index.json not found"):
        convert.load_hf(d)
    (d / "config.json").unlink()
    with pytest.raises(convert.ConversionError, match=r"ckpt/config.json not found"):
        convert.load_hf(d)


def test_save_hf_refuses_to_mix_with_existing_weights(tmp_path):
    config, params = convert.load_hf(reference_dir())
    convert.save_hf(config, params, tmp_path)
    with pytest.raises(convert.ConversionError, match="is not empty .*model.safetensors.*--overwrite"):
        convert.save_hf(config, params, tmp_path)


# ---- the script -------------------------------------------------------------------------------------------

def test_convert_script_both_ways(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_hf", ROOT / "scripts" / "convert_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = reference_dir()
    script.main(["--hf_dir", str(src), "--out", str(tmp_path / "p")])
    assert "parameters" in capsys.readouterr().out
    script.main(["--params_dir", str(tmp_path / "p"), "--hf_out", str(tmp_path / "hf")])
    assert safetensors_dict(tmp_path / "hf") == safetensors_dict(src)
    with pytest.raises(SystemExit):
        script.main(["--hf_dir", str(src)])
