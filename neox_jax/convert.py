"""The mapping between HF `GPTNeoXForCausalLM` directories and neox_jax params (any other weights source, and the
params dir, is `neox_jax.weights`).

    load_hf(path) -> (config, params)       HF dir (safetensors, sharded or not; pytorch_model.bin via
                                            torch.load(weights_only=True)) -> run config + param tree
    save_hf(config, params, path)           param tree -> HF dir that transformers 4.x and 5.x load

Every HF tensor maps to one param leaf by a transpose and/or a reshape (`tensor_rules`), so the conversion is
exact both ways. Reading goes tensor by tensor into preallocated stacks (layers are stacked on a leading
axis, as `nn.scan` wants them); writing goes tensor by tensor into shards of bounded size, so neither
direction holds a second full copy of the model. Loaded params are host numpy arrays (fp32).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import pathlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import safetensors.numpy
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from neox_jax import config as C
from neox_jax import errors
from neox_jax import files as files_lib
from neox_jax import model as M

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
_FINITE_SLICE = 1 << 24  # elements per isfinite pass (16 MiB of mask)

# HF activations the model implements (exact GELU; the rest are the tanh approximation), kept by name in
# `model.hidden_act` so save_hf writes back what it read.
HF_ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
# Buffers older transformers versions saved next to the weights; they are recomputed, never loaded.
LEGACY_BUFFERS = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


class ConversionError(errors.InputError):
    """A checkpoint or params dir cannot be converted; the message names the file and what was expected."""


# ---- config ----------------------------------------------------------------------------------------------

# HF key -> neox_jax model field. Keys with a default are optional in HF's own config class too.
_REQUIRED = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
}
_OPTIONAL = {  # HF key -> (neox_jax field, HF's default)
    "layer_norm_eps": ("layernorm_eps", 1e-5),
    "hidden_act": ("hidden_act", "gelu"),
    "use_parallel_residual": ("use_parallel_residual", True),
}
_OTHER_KNOWN = ("model_type", "tie_word_embeddings", "attention_bias", "rope_parameters", "rope_scaling",
                "rotary_pct", "rotary_emb_base", "architectures")


def read_json(file: pathlib.Path) -> dict:
    if not file.is_file():
        raise ConversionError(f"{file} not found")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def _check_typos(hf: dict, file) -> None:
    """A misspelt optional key would silently fall back to HF's default: refuse keys that look like one."""
    known = list(_REQUIRED) + list(_OPTIONAL) + list(_OTHER_KNOWN)
    for key in hf:
        if key in known:
            continue
        near = [k for k in difflib.get_close_matches(key, known, n=1, cutoff=0.85) if k not in hf]
        if near:
            raise ConversionError(f"{file}: unknown key {key!r}; did you mean {near[0]!r}?")


def _rotary(hf: dict, file) -> tuple[float, float]:
    """(rotary_pct, rotary_emb_base) from 5.x `rope_parameters` or 4.x `rotary_pct`/`rotary_emb_base`."""
    if hf.get("rope_scaling"):
        raise ConversionError(f"{file}: rope_scaling={hf['rope_scaling']!r} is not supported (plain rotary only)")
    legacy = (hf.get("rotary_pct", 0.25), hf.get("rotary_emb_base", 10000.0))
    rope = hf.get("rope_parameters")
    if rope is None:
        pct, base = legacy
    else:
        if not isinstance(rope, dict):
            raise ConversionError(f"{file}: rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", "default") != "default":
            raise ConversionError(f"{file}: rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                                  "(only 'default')")
        pct, base = rope.get("partial_rotary_factor", legacy[0]), rope.get("rope_theta", legacy[1])
        for key, new in (("rotary_pct", pct), ("rotary_emb_base", base)):
            if key in hf and not math.isclose(hf[key], new):
                raise ConversionError(f"{file}: {key}={hf[key]} disagrees with rope_parameters ({new}); "
                                      "transformers 4.x and 5.x would build different models")
    for key, value in (("rotary_pct", pct), ("rotary_emb_base", base)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConversionError(f"{file}: {key} must be a number, got {value!r}")
    return float(pct), float(base)


def config_from_hf(hf: dict, file="config.json") -> ml_collections.ConfigDict:
    """A validated neox_jax run config (defaults + the model fields of an HF GPTNeoXConfig dict)."""
    if "model_type" not in hf:
        raise ConversionError(f"{file}: missing required key 'model_type' (expected 'gpt_neox')")
    if hf["model_type"] != "gpt_neox":
        raise ConversionError(f"{file}: model_type is {hf['model_type']!r}; only 'gpt_neox' (GPTNeoXForCausalLM) "
                              "checkpoints can be converted")
    _check_typos(hf, file)
    if hf.get("tie_word_embeddings", False):
        raise ConversionError(f"{file}: tie_word_embeddings=true is not supported; GPT-NeoX has an untied embed_out")
    if not hf.get("attention_bias", True):
        raise ConversionError(f"{file}: attention_bias=false is not supported; GPT-NeoX attention has biases")
    c = C.default_config()
    m = c.model
    for key, field in _REQUIRED.items():
        if key not in hf:
            raise ConversionError(f"{file}: missing required key {key!r}")
        value = hf[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConversionError(f"{file}: {key} must be a positive integer, got {value!r}")
        m[field] = value
    m.padded_vocab_size = hf["vocab_size"]  # HF checkpoints store the padded embedding
    for key, (field, default) in _OPTIONAL.items():
        value = hf.get(key, default)
        if type(value) is not type(default) and not (isinstance(default, float) and type(value) is int):
            raise ConversionError(f"{file}: {key} must be a {type(default).__name__}, got {value!r}")
        m[field] = value
    if m.hidden_act not in HF_ACTIVATIONS:
        raise ConversionError(f"{file}: hidden_act {m.hidden_act!r} is not supported; expected one of "
                              f"{', '.join(HF_ACTIVATIONS)}")
    m.rotary_pct, m.rotary_emb_base = _rotary(hf, file)
    c.train.seq_len = min(c.train.seq_len, m.max_position_embeddings)
    try:
        return C.validate(c)
    except C.ConfigError as e:
        raise ConversionError(f"{file}: {e}") from e


def hf_config(m, dtype: str = "float32") -> dict:
    """The config.json of `save_hf`: transformers 5.x keys plus the 4.x ones (rotary_pct, ...) for older readers."""
    pct, base = float(m.rotary_pct), float(m.rotary_emb_base)
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": C.padded_vocab(m),
        "hidden_size": m.hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "intermediate_size": C.ffn_size(m),
        "hidden_act": m.hidden_act,
        "max_position_embeddings": m.max_position_embeddings,
        "layer_norm_eps": m.layernorm_eps,
        "use_parallel_residual": m.use_parallel_residual,
        "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": pct},
        "rotary_pct": pct,
        "rotary_emb_base": base,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": 0,  # <|endoftext|> of the 20B tokenizer, as in the Pythia configs
        "eos_token_id": 0,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# ---- tensor layout ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one param leaf (one layer's slice of it for per-layer tensors).

    ours = (hf.T if transpose else hf).reshape(leaf shape); the inverse is exact.
    """

    hf_name: str  # per-layer names hold "{}" for the layer index
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transpose: bool

    @property
    def per_layer(self) -> bool:
        return "{}" in self.hf_name

    def to_ours(self, x: np.ndarray, shape) -> np.ndarray:
        return (x.T if self.transpose else x).reshape(shape)

    def to_hf(self, y: np.ndarray) -> np.ndarray:
        if self.transpose:
            return np.ascontiguousarray(y.reshape(self.hf_shape[::-1]).T)
        return np.ascontiguousarray(y.reshape(self.hf_shape))


def tensor_rules(m) -> list[TensorRule]:
    """All tensors of a GPTNeoXForCausalLM, in HF's order. HF Linear weights are [out, in]."""
    v, h, f = C.padded_vocab(m), m.hidden_size, C.ffn_size(m)
    layer = "gpt_neox.layers.{}."

    def norm(hf_prefix, path):
        return [TensorRule(hf_prefix + ".weight", path + ("scale",), (h,), False),
                TensorRule(hf_prefix + ".bias", path + ("bias",), (h,), False)]

    def linear(hf_prefix, path, out_dim, in_dim):
        return [TensorRule(hf_prefix + ".weight", path + ("kernel",), (out_dim, in_dim), True),
                TensorRule(hf_prefix + ".bias", path + ("bias",), (out_dim,), False)]

    per_layer = (
        norm(layer + "input_layernorm", ("layers", "input_layernorm"))
        + norm(layer + "post_attention_layernorm", ("layers", "post_attention_layernorm"))
        + linear(layer + "attention.query_key_value", ("layers", "attention", "query_key_value"), 3 * h, h)
        + linear(layer + "attention.dense", ("layers", "attention", "dense"), h, h)
        + linear(layer + "mlp.dense_h_to_4h", ("layers", "mlp", "dense_h_to_4h"), f, h)
        + linear(layer + "mlp.dense_4h_to_h", ("layers", "mlp", "dense_4h_to_h"), h, f)
    )
    return ([TensorRule("gpt_neox.embed_in.weight", ("embed_in",), (v, h), False)] + per_layer
            + norm("gpt_neox.final_layer_norm", ("final_layer_norm",))
            + [TensorRule("embed_out.weight", ("embed_out",), (v, h), True)])


def flat_param_shapes(m) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the model's params, from the model itself (jax.eval_shape, nothing allocated)."""
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(nn.meta.unbox(M.param_shapes(m))).items()}


def param_name(path) -> str:
    return "/".join(path)


# ---- reading HF tensors ----------------------------------------------------------------------------------

def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS_FILE), (TORCH_INDEX, TORCH_FILE)):
        if (path / index_name).is_file():
            index = read_json(path / index_name)
            if not isinstance(index.get("weight_map"), dict):
                raise ConversionError(f"{path / index_name}: missing 'weight_map' object")
            files = [path / name for name in sorted(set(index["weight_map"].values()))]
            for file in files:
                if not file.is_file():
                    raise ConversionError(f"{file} listed in {path / index_name} not found")
            return files
        if (path / single).is_file():
            return [path / single]
    raise ConversionError(f"{path}: no weights found (expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, "
                          f"{TORCH_FILE} or {TORCH_INDEX})")


def host_array(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


@contextlib.contextmanager
def open_safetensors(file: pathlib.Path, framework: str = "np"):
    """safe_open, with a truncated or garbled file (header, offsets, tensor bytes) as one ConversionError."""
    try:
        with safe_open(file, framework=framework) as f:
            yield f
    except SafetensorError as e:
        raise ConversionError(f"{file}: not a readable safetensors file ({e}); it is truncated or damaged") from None


def check_finite(x: np.ndarray, name: str, file) -> np.ndarray:
    """Refuse a tensor holding NaN or infinity (bytes damaged behind an intact header convert without error into
    weights that make every logit NaN), naming it; scanned in slices so no full-size mask is allocated."""
    flat = np.asarray(x).reshape(-1)
    if flat.dtype.kind == "f":
        for a in range(0, flat.size, _FINITE_SLICE):
            part = flat[a:a + _FINITE_SLICE]
            if not np.isfinite(part).all():
                bad = int(np.count_nonzero(~np.isfinite(flat)))
                raise ConversionError(f"{file}: tensor {name!r} holds {bad:,} non-finite values (NaN or inf) of "
                                      f"{flat.size:,}; the file is damaged or the weights diverged")
    return x


def _safetensors_tensors(file: pathlib.Path) -> Iterator[tuple[str, tuple, Any]]:
    """(name, shape, read) per tensor; nothing is read until `read()`. numpy has no bfloat16, so BF16
    tensors go through safetensors' flax reader, kept on the CPU."""
    with open_safetensors(file) as f:
        for name in f.keys():
            tensor = f.get_slice(name)
            if tensor.get_dtype() == "BF16":
                def read(name=name):
                    with jax.default_device(jax.local_devices(backend="cpu")[0]):
                        with open_safetensors(file, "flax") as fx:
                            return host_array(get_tensor(fx, name, file))
            else:
                def read(name=name):
                    return get_tensor(f, name, file)
            yield name, tuple(tensor.get_shape()), read


def get_tensor(f, name: str, file):
    try:
        return f.get_tensor(name)
    except SafetensorError as e:
        raise ConversionError(f"{file}: tensor {name!r} cannot be read ({e}); the file is truncated or damaged") \
            from None


def _torch_tensors(file: pathlib.Path) -> Iterator[tuple[str, tuple, Any]]:
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{file}: reading pytorch_model.bin needs torch; convert it to safetensors or "
                              "install torch") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # weights_only refuses pickled code; say which file
        raise ConversionError(f"{file}: cannot be read with torch.load(weights_only=True): {e}") from e
    for name, t in state.items():
        yield name, tuple(t.shape), lambda t=t: (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def _hf_tensors(path: pathlib.Path) -> Iterator[tuple[str, tuple, Any, pathlib.Path]]:
    for file in _weight_files(path):
        reader = _safetensors_tensors if file.suffix == ".safetensors" else _torch_tensors
        for name, shape, read in reader(file):
            yield name, shape, read, file


def load_hf(path) -> tuple[ml_collections.ConfigDict, dict]:
    """HF GPTNeoXForCausalLM directory -> (validated run config, params as host numpy arrays)."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ConversionError(f"HF checkpoint directory {path} not found")
    config = config_from_hf(read_json(path / CONFIG_FILE), path / CONFIG_FILE)
    m = config.model
    shapes = flat_param_shapes(m)
    dtype = np.dtype(m.param_dtype)
    flat = {p: np.empty(s, dtype) for p, s in shapes.items()}  # every slot is filled or we raise below
    by_name = {}
    for rule in tensor_rules(m):
        for i in range(m.num_layers) if rule.per_layer else [None]:
            by_name[rule.hf_name.format(i)] = (rule, i)
    seen = set()
    for name, shape, read, file in _hf_tensors(path):
        if name not in by_name:
            if name.endswith(LEGACY_BUFFERS):
                continue
            raise ConversionError(f"{file}: unexpected tensor {name!r}; not part of a GPTNeoXForCausalLM "
                                  f"with {m.num_layers} layers")
        rule, layer = by_name[name]
        if shape != rule.hf_shape:
            raise ConversionError(f"{file}: tensor {name!r} has shape {list(shape)}, expected "
                                  f"{list(rule.hf_shape)} from {path / CONFIG_FILE}")
        if name in seen:
            raise ConversionError(f"{file}: tensor {name!r} appears twice")
        seen.add(name)
        leaf = flat[rule.path]
        value = check_finite(read(), name, file)
        if layer is None:
            leaf[...] = rule.to_ours(value, leaf.shape)
        else:
            leaf[layer] = rule.to_ours(value, leaf.shape[1:])
    missing = [n for n in by_name if n not in seen]
    if missing:
        raise ConversionError(f"{path}: {len(missing)} tensor(s) missing from the weights, first {missing[0]!r}")
    return config, traverse_util.unflatten_dict(flat)


# ---- writing HF ------------------------------------------------------------------------------------------

def pin_padded_vocab(config, params) -> ml_collections.ConfigDict:
    """A copy of `config` whose auto (0) padded_vocab_size is fixed to the embedding's rows: training pads to a
    multiple of 128 x tensor-parallel size, which the saved config must record to rebuild the same shapes."""
    config = ml_collections.ConfigDict(config.to_dict())
    m = config.model if "model" in config else config
    rows = np.shape(params.get("embed_in", ()))[:1]
    if not m.padded_vocab_size and rows and rows[0] >= m.vocab_size and rows[0] % m.make_vocab_size_divisible_by == 0:
        m.padded_vocab_size = rows[0]
    return config


def check_params(m, params, source="params", config_name="its config") -> None:
    """Raise ConversionError naming the first param whose shape differs from what config `m` builds."""
    expected = flat_param_shapes(m)
    found = traverse_util.flatten_dict(params)
    for path, shape in expected.items():
        if path not in found:
            raise ConversionError(f"{source}: param {param_name(path)} missing (expected shape {list(shape)})")
        if tuple(np.shape(found[path])) != shape:
            raise ConversionError(f"{source}: param {param_name(path)} has shape {list(np.shape(found[path]))}, "
                                  f"expected {list(shape)} from {config_name}")
    extra = [p for p in found if p not in expected]
    if extra:
        raise ConversionError(f"{source}: unexpected param {param_name(extra[0])}")


def _hf_tensors_of(m, params, dtype) -> Iterator[tuple[str, np.ndarray]]:
    flat = traverse_util.flatten_dict(params)
    for rule in tensor_rules(m):
        leaf = flat[rule.path]
        for i in range(m.num_layers) if rule.per_layer else [None]:
            value = host_array(leaf if i is None else leaf[i])  # one layer at a time, also for jax arrays
            yield rule.hf_name.format(i), rule.to_hf(value).astype(dtype, copy=False)


def output_dir(path, overwrite: bool = False, create: bool = True) -> pathlib.Path:
    """The directory a conversion writes, created if missing (unless not `create`: a check before a long read).
    One that holds anything (a params dir, weights, a training workdir's config.json) is refused unless
    `overwrite` (the scripts' --overwrite): nothing is replaced without being asked for."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{path} exists and is not a directory; choose a directory to write")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not overwrite:
        listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ConversionError(f"{path} is not empty (it holds {listed}); choose a new directory, or pass "
                              "--overwrite to replace what is written there")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def save_hf(config, params, path, *, dtype: str = "float32", max_shard_bytes: int = 4 << 30,
            overwrite: bool = False) -> list[pathlib.Path]:
    """Write an HF GPTNeoXForCausalLM directory (config.json + safetensors) and return the weight files.

    Tensors are converted one at a time and flushed in shards of at most `max_shard_bytes` (a single
    model.safetensors when it fits, else model-0000i-of-0000N.safetensors + index, HF's convention). A non-empty
    `path` is refused unless `overwrite`; then its old weight files are removed once the new ones are complete, so
    shards of two models never mix.
    """
    config = pin_padded_vocab(config, params)
    m = config.model if "model" in config else config
    C.validate_model(m)
    check_params(m, params)
    path = output_dir(path, overwrite)
    np_dtype = jnp.dtype(dtype)
    shards, shard, size = [], {}, 0
    for name, tensor in _hf_tensors_of(m, params, np_dtype):
        if shard and size + tensor.nbytes > max_shard_bytes:
            shards.append(_write_shard(path, len(shards), shard))
            shard, size = {}, 0
        shard[name], size = tensor, size + tensor.nbytes
    shards.append(_write_shard(path, len(shards), shard))
    for stale in sorted(path.glob("model*.safetensors*")) + sorted(path.glob("pytorch_model*.bin*")):
        if not stale.name.endswith(".tmp"):
            stale.unlink()
    files = [path / SAFETENSORS_FILE] if len(shards) == 1 else [
        path / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for (tmp, _, _), file in zip(shards, files):
        files_lib.publish(tmp, file)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s for _, _, s in shards)},
                 "weight_map": {n: f.name for f, (_, names, _) in zip(files, shards) for n in names}}
        (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (path / CONFIG_FILE).write_text(json.dumps(hf_config(m, np_dtype.name), indent=2) + "\n")
    return files


def _write_shard(path, i, tensors):
    tmp = path / f"model.part{i}.safetensors.tmp"
    safetensors.numpy.save_file(tensors, tmp, metadata={"format": "pt"})  # "pt": what transformers expects
    return tmp, list(tensors), sum(t.nbytes for t in tensors.values())
