"""Weights and their model config, from any source: an HF GPTNeoX directory (a Pythia or GPT-NeoX-20B download,
anything `save_pretrained` wrote; the mapping is `neox_jax.convert`), a params dir or a training workdir (its
orbax checkpoint, read through `neox_jax.checkpoint`).

    load(path) -> (config, params)          any of the three, told apart by what the directory holds
    load_model(hf=, checkpoint=, dtype=)    (model config, params) for generation and evaluation
    tokenizer_for(m, tokenizer, hf=, checkpoint=)   the tokenizer that model was made with, checked to fit it
    params_for(m, path)                     `train.init_from`: the params at `path`, checked to fit the run's model
    save_params / load_params               a params dir: config.json (the run config) + params.safetensors
                                            ("a/b/c" keys), pickle-free
    load_workdir_params(workdir, step)      the weights of a training workdir's checkpoint

A run started from pretrained weights (`train.init_from`) is defined by its own config and the weights must fit
it: the architecture fields that leave the shapes alone (activation, rotary, residual style, LayerNorm eps) must
agree, then every parameter's shape. The params replace the random init only when the run's workdir holds no
checkpoint (a resumed run continues from its own checkpoint); the optimizer state starts fresh and the schedule is
the config's, from step 0. Loaded params are host numpy arrays (fp32).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import traverse_util

from neox_jax import checkpoint, convert, errors
from neox_jax import config as C
from neox_jax import files as files_lib
from neox_jax.data import tokenizer as tok_lib

PARAMS_FILE = "params.safetensors"
FIELD = "config field train.init_from"
# architecture fields that no parameter shape shows; a mismatch would train a different function in silence
_UNSEEN_FIELDS = ("rotary_pct", "rotary_emb_base", "use_parallel_residual", "layernorm_eps")


# ---- any source ------------------------------------------------------------------------------------------

def _kind(path: str, what: str = FIELD) -> str:
    p = pathlib.Path(path)
    if (p / PARAMS_FILE).is_file():
        return "params"
    if (p / "checkpoints").is_dir():
        return "workdir"
    if (p / convert.CONFIG_FILE).is_file():
        return "hf"
    raise C.ConfigError(f"{what}: {path} is not an HF GPTNeoX directory (config.json + weights), a params dir "
                        f"({PARAMS_FILE}) or a training workdir (checkpoints/)")


def load(path: str, what: str = FIELD):
    """(run config, fp32 host params) of an HF GPTNeoX directory, a params dir or a training workdir; errors name
    `what` (the config field or flag that gave the path)."""
    readers = {"params": load_params, "workdir": load_workdir_params, "hf": convert.load_hf}
    kind = _kind(path, what)
    try:
        return readers[kind](path)
    except (convert.ConversionError, FileNotFoundError, C.ConfigError) as e:
        raise C.ConfigError(f"{what}: {e}") from e


def load_model(*, hf: str | None = None, checkpoint: str | None = None, dtype: str | None = None,
               step: int | None = None) -> tuple[Any, Any]:
    """(model config, params) from an HF GPTNeoX directory (`hf`) or a neox_jax params dir / training workdir
    (`checkpoint`; a workdir's `step`, default its latest), cast to `dtype` when given: what generation and
    evaluation start from."""
    if (hf is None) == (checkpoint is None):
        raise errors.InputError(
            "give exactly one of hf=<HF GPTNeoX dir> or checkpoint=<params dir or training workdir>")
    if dtype is not None and dtype not in C.DTYPES:
        raise errors.InputError(f"dtype={dtype!r}: expected {', '.join(C.DTYPES)}")
    if step is not None:
        config, params = load_workdir_params(checkpoint, step)
    else:
        config, params = load(hf or checkpoint, "hf" if hf else "checkpoint")
    m = config.model
    if dtype:
        m = ml_collections.ConfigDict(m.to_dict())
        m.dtype = m.param_dtype = dtype
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    return m, params


def tokenizer_for(m, tokenizer: str | None = None, *, hf: str | None = None, checkpoint: str | None = None
                  ) -> tok_lib.Tokenizer:
    """The tokenizer of the model `m` loaded from `hf` or `checkpoint`: `tokenizer` (a path) when given, else the one
    it was made with (an HF dir's tokenizer.json; the data.tokenizer of the run that wrote a params dir or training
    workdir), else the bundled 20B tokenizer. One TokenizerError when it has more ids than the model's embedding:
    ids past it would read other rows in silence."""
    if not tokenizer and checkpoint:
        recorded = _run_config(checkpoint).get("data", {}).get("tokenizer") or None
        if recorded and not os.path.isfile(recorded):
            raise tok_lib.TokenizerError(f"{checkpoint} was trained with data.tokenizer={recorded}, which is not "
                                         "there now; give the tokenizer file with --tokenizer")
        tokenizer = recorded
    tok = tok_lib.load_tokenizer(tokenizer or None, hf_dir=hf)
    if tok.vocab_size > C.padded_vocab(m):
        model = f"the model at {hf or checkpoint}" if hf or checkpoint else "the model"
        raise tok_lib.TokenizerError(f"tokenizer {tok.path} has {tok.vocab_size} ids but {model} embeds only "
                                     f"{C.padded_vocab(m)}: give the tokenizer it was trained with (--tokenizer)")
    return tok


def _run_config(path: str) -> dict:
    """The run config (as saved, a dict) of a params dir or a training workdir's latest checkpoint."""
    if _kind(path, "checkpoint") == "params":
        return convert.read_json(pathlib.Path(path) / convert.CONFIG_FILE)
    ckpt = checkpoint.Checkpointer(path, async_save=False, create=False)
    try:
        return ckpt.restore_config()
    finally:
        ckpt.close()


def model_config(path: str):
    """The model config of an HF GPTNeoX directory or a params dir, read from its config.json alone."""
    kind = _kind(path)
    if kind == "workdir":
        raise C.ConfigError(f"{FIELD}: {path} is a training workdir; give its model fields in the config (or export "
                            "a params dir with scripts/export_params.py)")
    file = pathlib.Path(path) / convert.CONFIG_FILE
    try:
        return (read_params_config(file) if kind == "params"
                else convert.config_from_hf(json.loads(file.read_text()), file)).model
    except (convert.ConversionError, json.JSONDecodeError) as e:
        raise C.ConfigError(f"{FIELD}: {e}") from e


def params_for(m, path: str):
    """The params stored at `path`, checked against the run's model config `m` (its vocabulary padded for the
    mesh, `RunSetup.model_config`): one ConfigError naming the first field or parameter that does not fit."""
    stored, params = load(path)
    s = stored.model
    for field in _UNSEEN_FIELDS:
        if not math.isclose(float(s[field]), float(m[field]), rel_tol=1e-9):
            raise C.ConfigError(f"{FIELD}: {path} has model.{field}={s[field]!r}, this run's config has {m[field]!r}")
    if (s.hidden_act == "gelu") != (m.hidden_act == "gelu"):  # the other names are all the tanh approximation
        raise C.ConfigError(f"{FIELD}: {path} has model.hidden_act={s.hidden_act!r}, this run's config has "
                            f"{m.hidden_act!r}")
    try:
        convert.check_params(m, params, source=f"{FIELD}={path}", config_name="this run's model config")
    except convert.ConversionError as e:
        rows = params["embed_in"].shape[0] if "embed_in" in params else None
        hint = (f" (the checkpoint pads the vocabulary to {rows}: set model.padded_vocab_size={rows})"
                if rows and rows != m.padded_vocab_size and s.hidden_size == m.hidden_size else "")
        raise C.ConfigError(f"{e}{hint}") from e
    return params


def describe(config, params) -> str:
    """A short human summary: parameter count and the architecture."""
    m = config.model if "model" in config else config
    n = sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params))
    fields = ("vocab_size", "padded_vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "rotary_pct", "rotary_emb_base", "max_position_embeddings", "layernorm_eps", "hidden_act",
              "use_parallel_residual")
    return f"{n:,} parameters\n" + "\n".join(f"  model.{k} = {m[k]!r}" for k in fields)


# ---- params dir ------------------------------------------------------------------------------------------

def save_params(config, params, directory, overwrite: bool = False) -> pathlib.Path:
    """Write `config.json` (the run config) + `params.safetensors` (keys like "layers/attention/dense/kernel").
    A non-empty `directory` is refused unless `overwrite`; both files are written under temporary names and
    renamed when complete, so an interrupted write leaves what was there before."""
    config = C.validate(convert.pin_padded_vocab(config, params))
    convert.check_params(config.model, params)
    directory = convert.output_dir(directory, overwrite)
    flat = {convert.param_name(p): np.ascontiguousarray(convert.host_array(v))
            for p, v in traverse_util.flatten_dict(params).items()}
    with files_lib.atomic_path(directory / PARAMS_FILE) as tmp:
        safetensors.numpy.save_file(flat, tmp, metadata={"format": "neox_jax"})
    with files_lib.atomic_path(directory / convert.CONFIG_FILE) as tmp:
        tmp.write_text(config.to_json(indent=2) + "\n")
    return directory


def read_params_config(file) -> ml_collections.ConfigDict:
    """A params dir's config.json (a run config saved as JSON), over the current defaults, validated."""
    try:
        return C.from_saved(convert.read_json(pathlib.Path(file)), str(file))
    except C.ConfigError as e:
        raise convert.ConversionError(str(e)) from e


def load_params(directory) -> tuple[ml_collections.ConfigDict, dict]:
    """Read a params dir written by `save_params` -> (config, params as host numpy arrays)."""
    directory = pathlib.Path(directory)
    config = read_params_config(directory / convert.CONFIG_FILE)
    file = directory / PARAMS_FILE
    if not file.is_file():
        raise convert.ConversionError(f"{file} not found")
    expected = convert.flat_param_shapes(config.model)
    flat = {}
    with convert.open_safetensors(file) as f:
        names = set(f.keys())
        for path, shape in expected.items():
            name = convert.param_name(path)
            if name not in names:
                raise convert.ConversionError(f"{file}: param {name} missing (expected shape {list(shape)})")
            found = tuple(f.get_slice(name).get_shape())
            if found != shape:
                raise convert.ConversionError(f"{file}: param {name} has shape {list(found)}, expected "
                                              f"{list(shape)} from {directory / convert.CONFIG_FILE}")
            flat[path] = convert.check_finite(convert.get_tensor(f, name, file), name, file)
    extra = sorted(names - {convert.param_name(p) for p in expected})
    if extra:
        raise convert.ConversionError(f"{file}: unexpected param {extra[0]}")
    return config, traverse_util.unflatten_dict(flat)


# ---- training workdir ------------------------------------------------------------------------------------

def load_workdir_params(workdir: str, step: int | None = None) -> tuple[Any, dict]:
    """(run config, params as host numpy arrays) of a training workdir's latest (or `step`) intact checkpoint.

    Only the weights are read (not the optimizer's moments): the fp32 master of a run with
    precision.mode=master_weights (its 16-bit params are that master's cast), else the params. The config's
    model.padded_vocab_size is pinned to the stored embedding, so `config.model` rebuilds exactly these shapes on
    any mesh.
    """
    if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
        raise FileNotFoundError(f"{workdir}: no checkpoints/ folder; expected a training workdir")
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, create=False)

    def read(s):
        config = C.from_saved(ckpt.restore_config(s), f"{ckpt.directory}/{s}/config")
        stored = ckpt.stored_metadata(s)["train"]
        which = "master" if stored.get("master") else "params"
        return config, ckpt.restore_numpy(s, {"train": {which: stored[which]}})["train"][which]

    try:
        config, params = ckpt.newest_readable(step, read)  # checked against the step's checksums
    finally:
        ckpt.close()
    config.model.padded_vocab_size = int(np.shape(params["embed_in"])[0])
    return config, params
