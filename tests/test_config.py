"""Config schema, validation errors and derived sizes against the published GPT-NeoX / Pythia numbers."""

import re

import pytest

from configs import neox_20b, pythia, tiny
from neox_jax import config as C
from neox_jax import model

# Published parameter counts (neox_reference.md, from the released checkpoints).
PUBLISHED = {
    "14m": 14_067_712, "31m": 30_494_720, "70m": 70_426_624, "160m": 162_322_944, "410m": 405_334_016,
    "1b": 1_011_781_632, "1.4b": 1_414_647_808, "2.8b": 2_775_208_960, "6.9b": 6_857_302_016,
    "12b": 11_846_072_320,
}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_pythia_param_counts_from_eval_shape(size):
    m = pythia.get_config(size).model
    assert model.count_params(m) == PUBLISHED[size]
    assert C.param_count(m) == PUBLISHED[size]


def test_neox_20b_param_count():
    m = neox_20b.get_config().model
    assert model.count_params(m) == 20_554_567_680


def test_all_configs_validate():
    for c in [tiny.get_config(), neox_20b.get_config()] + [pythia.get_config(s) for s in pythia.SIZES]:
        C.validate(c)


def test_vocab_padding_rule():
    m = C.model_defaults()
    assert [C.padded_vocab(m, tp) for tp in (1, 2, 4)] == [50304, 50432, 50688]


def test_unknown_pythia_size():
    with pytest.raises(ValueError, match="unknown size '7b'"):
        pythia.get_config("7b")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.num_heads", 3, "model.hidden_size: 128 is not divisible by num_heads=3"),
        ("model.rotary_pct", 0.1, "rotary dims must be even"),
        ("model.rotary_pct", 1.5, "model.rotary_pct: must be in"),
        ("model.hidden_act", "relu", "model.hidden_act: 'relu' is not one of"),
        ("model.padded_vocab_size", 100, "model.padded_vocab_size: 100 is smaller than vocab_size"),
        ("train.micro_batches", 3, "train.batch_size: 16 is not divisible by train.micro_batches=3"),
        ("train.seq_len", 4096, "train.seq_len: 4096 exceeds model.max_position_embeddings"),
        ("zero_stage", 2, "zero_stage: must be 0, 1 or 3"),
        ("train.loss_chunks", 3, "train.loss_chunks: must be a positive divisor of train.seq_len=32"),
        ("mesh.tensor", 0, "mesh.tensor: must be -1 or a positive integer"),
        ("train.profile_steps", "10", "train.profile_steps: '10' is not 'START,STOP'"),
        ("train.profile_steps", "12,10", "train.profile_steps: need 0 <= START < STOP, got '12,10'"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
    c = C.override(tiny.get_config(), {field: value})
    with pytest.raises(C.ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        C.validate(c)



@pytest.mark.parametrize("weights,message", [
    ("1", "data.train_weights has 1 weights for 2 datasets in data.train_paths"),
    ("1,x", "data.train_weights: '1,x' is not a comma-separated list of numbers"),
    ("1,0", "data.train_weights: every weight must be positive, got '1,0'"),
])
def test_bad_mixing_weights_are_refused_up_front(weights, message):
    """validate checks data.train_weights against the datasets data.train_paths names, before any data is read."""
    c = C.override(tiny.get_config(), {"data.train_paths": "a, b,", "data.train_weights": weights})
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.validate(c)
    assert C.mixing_weights("", 2) == [1.0, 1.0] and C.mixing_weights("2,1", 2) == [2.0, 1.0]

def test_typo_is_rejected_with_near_names():
    with pytest.raises(C.ConfigError, match=r"unknown config field 'model.hiden_size'; did you mean 'model.hidden_size'"):
        C.override(tiny.get_config(), {"model.hiden_size": 64})
    c = tiny.get_config()
    c.model.unlock()
    c.model.num_layer = 3  # a typo inside a config file
    with pytest.raises(C.ConfigError, match="model.num_layer"):
        C.validate(c)


def test_command_line_config_args_are_split_once_and_typed_by_their_fields():
    from neox_jax import cli

    argv = ["--workdir", "w", "--config", "configs/tiny.py", "--config.optimizer.lr=3e-4", "--config.train.steps",
            "7", "--config.data.order=gpt_neox", "--config.train.log_every=2", "--steps=5"]
    spec, overrides, rest = cli.split_config_args(argv)
    assert spec == "configs/tiny.py" and rest == ["--workdir", "w", "--steps=5"]
    config = C.from_spec(spec, overrides, "--config")
    assert (config.optimizer.lr, config.train.steps, config.data.order) == (3e-4, 7, "gpt_neox")
    assert isinstance(config.train.steps, int) and isinstance(config.optimizer.lr, float)
    for text, value in (("true", True), ("False", False), ("1", True), ("no", False)):
        assert C.override(config, {"energy.track": text}).energy.track is value
    for field, text, message in (("train.steps", "abc", "--config.train.steps=abc: expected an integer"),
                                 ("optimizer.lr", "fast", "--config.optimizer.lr=fast: expected a number"),
                                 ("energy.track", "maybe", "--config.energy.track=maybe: expected true or false")):
        with pytest.raises(C.ConfigError, match=message):
            C.from_spec(spec, {field: text}, "--config")
    with pytest.raises(C.ConfigError, match="config file nope.py not found"):
        C.from_spec("nope.py")
    with pytest.raises(ValueError, match="--config.train.steps expects a value"):
        cli.split_config_args(["--config.train.steps"])
