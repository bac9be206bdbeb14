"""Start a run from pretrained weights: `train.init_from` names an HF GPTNeoX directory (a Pythia or GPT-NeoX-20B
download, anything `save_pretrained` wrote), a params dir (`convert.save_params`) or a training workdir.

The run's config defines the model and the weights must fit it: the architecture fields that leave the shapes
alone (activation, rotary, residual style, LayerNorm eps) must agree, then every parameter's shape. The params
replace the random init only when the run's workdir holds no checkpoint (a resumed run continues from its own
checkpoint); the optimizer state starts fresh and the schedule is the config's, from step 0.
"""

from __future__ import annotations

import json
import math
import pathlib

from neox_jax import checkpoint, convert
from neox_jax.config import ConfigError

FIELD = "config field train.init_from"
# architecture fields that no parameter shape shows; a mismatch would train a different function in silence
_UNSEEN_FIELDS = ("rotary_pct", "rotary_emb_base", "use_parallel_residual", "layernorm_eps")


def _kind(path: str, what: str = FIELD) -> str:
    p = pathlib.Path(path)
    if (p / convert.PARAMS_FILE).is_file():
        return "params"
    if (p / "checkpoints").is_dir():
        return "workdir"
    if (p / convert.CONFIG_FILE).is_file():
        return "hf"
    raise ConfigError(f"{what}: {path} is not an HF GPTNeoX directory (config.json + weights), a params dir "
                      f"({convert.PARAMS_FILE}) or a training workdir (checkpoints/)")


def load(path: str, what: str = FIELD):
    """(run config, fp32 host params) of an HF GPTNeoX directory, a params dir or a training workdir; errors name
    `what` (the config field or flag that gave the path)."""
    readers = {"params": convert.load_params, "workdir": checkpoint.load_workdir_params, "hf": convert.load_hf}
    kind = _kind(path, what)
    try:
        return readers[kind](path)
    except (convert.ConversionError, FileNotFoundError, ConfigError) as e:
        raise ConfigError(f"{what}: {e}") from e


def model_config(path: str):
    """The model config of an HF GPTNeoX directory or a params dir, read from its config.json alone."""
    kind = _kind(path)
    if kind == "workdir":
        raise ConfigError(f"{FIELD}: {path} is a training workdir; give its model fields in the config (or export a "
                          "params dir with scripts/export_params.py)")
    file = pathlib.Path(path) / convert.CONFIG_FILE
    try:
        return (convert.load_config(file) if kind == "params" else convert.config_from_hf(json.loads(file.read_text()),
                                                                                            file)).model
    except (convert.ConversionError, json.JSONDecodeError) as e:
        raise ConfigError(f"{FIELD}: {e}") from e


def params_for(m, path: str):
    """The params stored at `path`, checked against the run's model config `m` (its vocabulary padded for the
    mesh, `RunSetup.model_config`): one ConfigError naming the first field or parameter that does not fit."""
    stored, params = load(path)
    s = stored.model
    for field in _UNSEEN_FIELDS:
        if not math.isclose(float(s[field]), float(m[field]), rel_tol=1e-9):
            raise ConfigError(f"{FIELD}: {path} has model.{field}={s[field]!r}, this run's config has {m[field]!r}")
    if (s.hidden_act == "gelu") != (m.hidden_act == "gelu"):  # the other names are all the tanh approximation
        raise ConfigError(f"{FIELD}: {path} has model.hidden_act={s.hidden_act!r}, this run's config has "
                          f"{m.hidden_act!r}")
    try:
        convert.check_params(m, params, source=f"{FIELD}={path}", config_name="this run's model config")
    except convert.ConversionError as e:
        rows = params["embed_in"].shape[0] if "embed_in" in params else None
        hint = (f" (the checkpoint pads the vocabulary to {rows}: set model.padded_vocab_size={rows})"
                if rows and rows != m.padded_vocab_size and s.hidden_size == m.hidden_size else "")
        raise ConfigError(f"{e}{hint}") from e
    return params
