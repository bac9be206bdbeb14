"""Weights from any source (`neox_jax.weights`). Training from pretrained weights (`train.init_from`): step 0's
loss equals HF transformers' loss on the same batch, a resumed run ignores init_from, and weights that do not fit
the config stop with one clear error. Params dirs: round trip, the pinned vocabulary, shape mismatches. Workdirs:
one without checkpoints is named."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors import safe_open

from conftest import FIXTURES
from neox_jax import cli, convert, metrics, trainer, weights
from neox_jax.config import ConfigError, from_spec
from neox_jax.data import dataset, indexed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_HF = FIXTURES / "hf_reference" / "tiny-gpt-neox-parallel"
# a tiny GPTNeoX whose embedding is the 20B tokenizer's padded vocabulary, so the bundled tokenizer fits
HF = dict(vocab_size=50304, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
          max_position_embeddings=64, rotary_pct=0.5, hidden_act="gelu", use_parallel_residual=True,
          layer_norm_eps=1e-5, tie_word_embeddings=False)
OVERRIDES = {"model.hidden_size": 32, "model.num_layers": 2, "model.num_heads": 4, "model.intermediate_size": 96,
             "model.rotary_pct": 0.5, "model.scan_unroll": 1, "train.batch_size": 8, "train.seq_len": 32,
             "train.steps": 1, "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 1}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**HF)).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a dropped or swapped tensor shows in the loss
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tokens") / "random")
    rng = np.random.default_rng(0)
    with indexed.IndexedWriter(prefix, np.uint16) as w:
        for _ in range(40):
            w.add(rng.integers(0, 50277, rng.integers(20, 200)))
    return prefix


def run_config(tokens, **extra):
    return from_spec(os.path.join(ROOT, "configs", "tiny.py"),
                           {**OVERRIDES, "data.train_paths": tokens, **extra})


def hf_loss(model, batch):
    import torch

    ids = torch.as_tensor(np.asarray(batch, np.int64))
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.float()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


@pytest.mark.slow
def test_step_0_loss_equals_hf_and_resume_ignores_init_from(hf_dir, tokens, tmp_path, capsys):
    path, model = hf_dir
    config = run_config(tokens, **{"train.init_from": str(path)})
    trainer.train(config, str(tmp_path))
    assert f"initialised params from {path}" in capsys.readouterr().out
    first = next(dataset.make_train_iterator(config, 0, 1))["tokens"]
    (row,) = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert row["loss"] == pytest.approx(hf_loss(model, first), abs=2e-5)

    # the workdir has a checkpoint now: it resumes from it and init_from (a missing path here) is not read
    trainer.train(run_config(tokens, **{"train.init_from": str(tmp_path / "missing")}), str(tmp_path))
    assert "resumed from" in capsys.readouterr().out


def test_params_dir_and_hf_dir_give_the_same_params(hf_dir, tmp_path):
    path, _ = hf_dir
    config, params = convert.load_hf(path)
    weights.save_params(config, params, tmp_path / "params")
    m = config.model
    a, b = weights.params_for(m, str(path)), weights.params_for(m, str(tmp_path / "params"))
    for x, y in zip(*(sorted(convert.traverse_util.flatten_dict(p).items()) for p in (a, b))):
        assert x[0] == y[0]
        np.testing.assert_array_equal(x[1], y[1])


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 64, r"param embed_in has shape \[50304, 32\], expected \[50304, 64\] from this run's model"),
    ("padded_vocab_size", 50432, r"embed_in has shape \[50304, 32\], expected \[50432, 32\] .* set "
                                 r"model.padded_vocab_size=50304"),
    ("use_parallel_residual", False, "has model.use_parallel_residual=True, this run's config has False"),
    ("hidden_act", "gelu_fast", "has model.hidden_act='gelu', this run's config has 'gelu_fast'"),
])
def test_weights_that_do_not_fit_name_field_and_shapes(hf_dir, field, value, match):
    path, _ = hf_dir
    m = convert.load_hf(path)[0].model
    m[field] = value
    with pytest.raises(ConfigError, match="config field train.init_from.*" + match):
        weights.params_for(m, str(path))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="is not an HF GPTNeoX directory .* params dir .* training workdir"):
        weights.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="train.init_from: .*config.json: model_type is 'llama'"):
        weights.load(str(tmp_path))


def test_pretrained_config_takes_the_model_from_the_checkpoint(hf_dir, tmp_path):
    path, _ = hf_dir
    c = from_spec(os.path.join(ROOT, "configs", "pretrained.py") + f":{path}")
    assert (c.model.hidden_size, c.model.num_layers, c.model.rotary_pct, c.train.init_from) == (32, 2, 0.5, str(path))
    assert c.train.seq_len == 64 and cli.default_workdir(f"configs/pretrained.py:{path}/") == "runs/pretrained_tiny"
    weights.params_for(c.model, str(path))  # fits by construction
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ConfigError, match="is a training workdir; give its model fields"):
        weights.model_config(str(tmp_path))


# ---- params dirs -------------------------------------------------------------------------------------------

def test_params_dir_round_trip(tmp_path):
    config, params = convert.load_hf(TINY_HF)
    weights.save_params(config, params, tmp_path / "p")
    config2, params2 = weights.load_params(tmp_path / "p")
    assert config2.to_dict() == config.to_dict()
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with safe_open(tmp_path / "p" / "params.safetensors", framework="np") as f:
        assert "layers/attention/dense/kernel" in f.keys()


def test_auto_padded_vocab_is_pinned_to_the_embedding(tmp_path):
    """Training pads the vocabulary to 128 x tensor-parallel size (300 -> 512 at TP 2, not 384): the saved
    config must say what the params hold."""
    config, params = convert.load_hf(TINY_HF)
    config.model.vocab_size, config.model.padded_vocab_size = 300, 0
    weights.save_params(config, params, tmp_path / "p")
    config2, _ = weights.load_params(tmp_path / "p")
    assert (config2.model.vocab_size, config2.model.padded_vocab_size) == (300, 512)
    convert.save_hf(config, params, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 512


def test_params_dir_shape_mismatch(tmp_path):
    config, params = convert.load_hf(TINY_HF)
    weights.save_params(config, params, tmp_path / "p")
    saved = json.loads((tmp_path / "p" / "config.json").read_text())
    saved["model"]["intermediate_size"] = 128
    (tmp_path / "p" / "config.json").write_text(json.dumps(saved))
    expected = r"param layers/mlp/dense_4h_to_h/kernel has shape \[2, 256, 64\], expected \[2, 128, 64\]"
    with pytest.raises(convert.ConversionError, match=expected):
        weights.load_params(tmp_path / "p")
    saved["model"]["intermediat_size"] = saved["model"].pop("intermediate_size")
    (tmp_path / "p" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(convert.ConversionError, match="unknown config field 'model.intermediat_size'"):
        weights.load_params(tmp_path / "p")


# ---- training workdirs ------------------------------------------------------------------------------------

def test_workdir_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        weights.load_workdir_params(str(tmp_path / "elsewhere"))
