"""Configuration: defaults, validation and derived sizes.

A run is described by one `ml_collections.ConfigDict` built by a `get_config()` file under `configs/`
(configs are code), loaded from a `path[:arg]` spec by `from_spec`. This module owns the schema: `default_config()` lists every field with its default,
`validate()` checks a finished config once at start-up and raises `ConfigError` naming the offending field,
and the small helpers below derive sizes (padded vocabulary, head dim, rotary dims, parameter count) so no
other module recomputes them.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
from typing import Any, Mapping

import ml_collections

from neox_jax import errors

ACTIVATIONS = ("gelu", "gelu_fast", "gelu_new", "gelu_pytorch_tanh")
INITS = ("small_init", "normal")
DTYPES = ("float32", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")
# precision.mode: where the weights the optimizer updates live (see `default_config`).
PRECISION_MODES = ("fp32_params", "master_weights")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "splash")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attention_out")
MESH_AXES = ("stage", "data", "fsdp", "context", "tensor")
OPTIONAL_AXES = ("stage", "context")  # join the device mesh only when larger than 1
SLICE_AXES = ("data", "fsdp")  # mesh axes that may span TPU slices (DCN); the others stay inside one
DATA_ORDERS = ("grain", "gpt_neox", "sequential")


class ConfigError(errors.InputError):
    """A config field holds a value the project cannot use; the message names the field."""


def model_defaults() -> ml_collections.ConfigDict:
    """The GPT-NeoX architecture fields; defaults are the 20B / Pythia conventions."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=50277,  # ids the tokenizer produces (20B tokenizer)
            padded_vocab_size=0,  # 0: round vocab_size up to make_vocab_size_divisible_by x mesh.tensor
            make_vocab_size_divisible_by=128,
            hidden_size=512,
            num_layers=6,
            num_heads=8,
            intermediate_size=0,  # 0: 4 x hidden_size
            rotary_pct=0.25,
            rotary_emb_base=10000.0,
            max_position_embeddings=2048,
            layernorm_eps=1e-5,
            hidden_act="gelu",  # "gelu" exact (Pythia); "gelu_fast"/"gelu_new" tanh approximation (NeoX fused)
            use_parallel_residual=True,
            init="small_init",  # small_init + wang_init (20B), or normal + scaled_normal (Pythia 6.9b/12b)
            init_std=0.02,  # used by init="normal"
            param_dtype="float32",  # dtype params are created in (with precision.mode=master_weights: the master's)
            dtype="float32",  # compute dtype; "bfloat16"/"float16" for mixed precision (see precision.mode)
            attention_impl="auto",  # auto: splash on TPU, cuDNN flash on GPU with bf16/fp16, XLA elsewhere; model.attention_impl
            attention_chunk=512,  # attention_impl="chunked": queries per block (scores held: B x heads x chunk x T)
            splash_block_q=0,  # attention_impl="splash" (TPU): queries per kernel block; 0 = min(512, seq_len)
            splash_block_kv=0,  # keys per kernel block; 0 = min(512, seq_len)
            splash_interpret=False,  # run the splash kernel in Pallas interpret mode off TPU (slow; for tests)
            remat_policy="none",
            scan_unroll=1,  # layers per iteration of the layer scan; = num_layers removes the loop (fast decode)
        )
    )


def default_config() -> ml_collections.ConfigDict:
    """Every field a run understands. `configs/*.py` start from this and change what they need."""
    c = ml_collections.ConfigDict()
    c.model = model_defaults()
    # stage > 1: pipeline parallelism (layers split evenly into stages; train.micro_batches flow through them)
    # slices: TPU slices (or simulated ones) the mesh spans; mesh.slice_axis (data or fsdp) crosses them over DCN
    # context: splits every sequence (context parallelism: K/V all-gathered, see neox_jax/context.py)
    c.mesh = ml_collections.ConfigDict(dict(stage=1, data=-1, fsdp=1, context=1, tensor=1, slices=1,
                                            slice_axis="data"))
    c.zero_stage = 1
    c.optimizer = ml_collections.ConfigDict(
        dict(
            lr=6e-4,
            min_lr_ratio=0.1,
            warmup_fraction=0.01,
            warmup_steps=-1,  # -1: warmup_fraction x train.steps
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.01,
            grad_clip=1.0,
        )
    )
    c.precision = ml_collections.ConfigDict(
        dict(
            # fp32_params: the train state's params are fp32 and cast to model.dtype where they are used (one copy,
            #   4 bytes per parameter, plus fp32 gradients).
            # master_weights: params stored in model.dtype (2 bytes, what the model computes with), gradients in
            #   model.dtype, and an fp32 master copy that AdamW updates, placed like the Adam moments (split over
            #   data x fsdp with ZeRO-1): DeepSpeed's FP16/BF16 optimizer, as GPT-NeoX-20B was trained.
            mode="fp32_params",
            loss_scale="none",  # "none" | "dynamic" (fp16 training)
            initial_scale_power=12,
            loss_scale_window=1000,
            hysteresis=2,
            min_loss_scale=1.0,
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=1000,
            batch_size=8,  # global batch, sequences per optimizer step
            micro_batches=1,  # gradient accumulation steps inside one train step
            loss_chunks=1,  # >1: logits and loss computed one sequence slice at a time (saves head memory)
            seq_len=128,
            seed=0,
            log_every=10,
            eval_every=100,
            eval_batches=4,
            checkpoint_every=200,
            keep_checkpoints=3,
            keep_every=0,  # 0: none kept permanently
            # steps saved and kept for good beside the rolling ones (config.checkpoint_schedule): "" none; "pythia"
            # (0, 1, 2, 4, ..., 512, then every 1,000); "log2" (0 and the powers of 2); "log:N" (N log-spaced
            # steps up to train.steps, and 0); or a list "0,100,2000". Step 0 is the initial weights.
            checkpoint_steps="",
            # lm-eval tasks scored on the training devices every eval_tasks_every steps (0: never), e.g.
            # "lambada_openai,piqa"; eval_tasks_limit: documents per task (0: all; < 1: a fraction)
            eval_tasks="",
            eval_tasks_every=0,
            eval_tasks_limit=0.0,
            max_nonfinite_in_a_row=5,
            # before the first step the compiled step's per-device peak is compared with the device's memory: over
            # it the run stops naming settings that fit, near it a warning (neox_jax/fit.py); false: no check
            memory_check=True,
            device_memory_gb=0.0,  # 0: what the device reports (GPU/TPU; CPU reports none); else this many GB
            profile_steps="",  # "10,12": JAX profiler trace from step 10 to 12
            peak_tflops=0.0,  # 0: look up the device in metrics.PEAK_TFLOPS
            wandb_project="",  # "": no Weights & Biases logging; else the wandb project (needs wandb installed)
            # HF GPTNeoX dir, params dir or training workdir whose params start a new run (fresh optimizer); used
            # only when the workdir has no checkpoint. Shapes must match this config's model.
            init_from="",
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            train_paths="",  # comma-separated .bin/.idx prefixes or Pile-format files (README, "Data")
            # with no train_paths, train on the 6 MB Pile sample bundled with the package: configs/tiny.py and the
            # tests set it; any other run without data stops with one line instead of training on a toy corpus
            bundled_sample=False,
            train_weights="",  # comma-separated mixing weights, same order as train_paths
            val_paths="",
            tokenizer="",  # "" -> bundled 20B tokenizer
            cache_dir="",  # where on-the-fly preprocessing writes .bin/.idx; "" -> ~/.cache/neox_jax
            workers=0,  # grain worker processes; 0 = in-process
            # "grain": shuffled windows, grain's mix | "gpt_neox": GPT-NeoX's sample order exactly |
            # "sequential": documents in stored order, each one seq_len + 1 sequence (Pythia's pre-shuffled data)
            order="grain",
            num_samples=0,  # gpt_neox: N, the samples its index is built for; 0 = train.steps x train.batch_size
            split="",  # gpt_neox with one train path: "969,30,1" cuts its documents into train/valid/test ranges
            start_batch=0,  # a new run's first batch is this global batch of the order (continuing a released run)
            # resume although a training dataset's files changed since the checkpoint (refused by default: the
            # checkpoint records each one's fingerprint, indexed.fingerprint)
            allow_changed_data=False,
        )
    )
    # energy and carbon accounting (neox_jax/energy.py): measured where the hardware reports it, else estimated
    c.energy = ml_collections.ConfigDict(
        dict(
            track=True,  # False: no energy or carbon accounting at all
            country="",  # ISO 3166-1 alpha-3 code of the grid (USA, FRA, DEU, ...); "": the world average
            region="",  # finer grid data where codecarbon has it: US states, Canadian provinces ("california")
            carbon_intensity=0.0,  # g CO2e per kWh; > 0 overrides country and region
            pue=1.0,  # data-centre power usage effectiveness: every kWh is multiplied by it
            sample_secs=10.0,  # how often the background thread reads the meters (1 s cost ~2% of a 2-core CPU step)
            cpu_watts=0.0,  # rated CPU power (W) for the estimate; 0: codecarbon's CPU table, else 4 W a thread
        )
    )
    c.workdir = ""
    return c


def override(base: ml_collections.ConfigDict, overrides: Mapping[str, Any], flag: str | None = None
             ) -> ml_collections.ConfigDict:
    """Apply {"a.b.c": value} overrides, refusing unknown keys with near names. A text value for a field that
    is not text is read as the field's type (`"3e-4"` for a float, `"true"` for a bool), as a command line gives
    it; errors name `flag`.a.b.c=value when the overrides came from that flag."""
    c = ml_collections.ConfigDict(base.to_dict())
    for dotted, value in overrides.items():
        node = c
        parts = dotted.split(".")
        where = f"{flag}.{dotted}={value}" if flag else f"config field {dotted}"
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict):  # `train.steps.x`: a value has no fields
                raise ConfigError(f"{where}: {'.'.join(parts[:i])} is a value, not a section with fields")
            keys = list(node.keys())
            if part not in keys:
                raise ConfigError(_unknown(".".join(parts[: i + 1]), keys, ".".join(parts[:i])))
            if i == len(parts) - 1:
                _set(node, part, value, where, dotted)
            else:
                node = node[part]
    return c


def _set(node: ml_collections.ConfigDict, key: str, value: Any, where: str, dotted: str) -> None:
    """node[key] = value typed by the field; a section replaced by a scalar (`--config.model=3`) would lose every
    field under it, so it is refused, as is any value ConfigDict cannot cast to the field's type."""
    if isinstance(node[key], ml_collections.ConfigDict) and not isinstance(value, Mapping):
        fields = ", ".join(f"{dotted}.{k}" for k in sorted(node[key].keys())[:3])
        raise ConfigError(f"{where}: {dotted} is a section, not a value; set one of its fields instead "
                          f"({fields}, ...)")
    try:
        node[key] = typed(node[key], value, where)
    except TypeError as e:  # ConfigDict's own type check, e.g. a list for an integer field
        raise ConfigError(f"{where}: {e}") from None


def import_file(path: str, prefix: str):
    """Import a Python file (a config or sweep file) by path, as a module named after it."""
    module_spec = importlib.util.spec_from_file_location(f"{prefix}{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def from_spec(spec: str, overrides: Mapping[str, Any] | None = None, flag: str | None = None
              ) -> ml_collections.ConfigDict:
    """`configs/pythia.py:410m` -> the file's get_config("410m"), with {"a.b": value} overrides applied (text
    values typed by their fields; errors name `flag`.FIELD=VALUE when the overrides came from that flag)."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} not found (from {spec!r})")
    try:  # a config file is the user's code: whatever it raises is a bad config spec
        module = import_file(path, "_neox_config_")
        c = module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"config {spec}: get_config() raised {type(e).__name__}: {e}") from e
    if not isinstance(c, ml_collections.ConfigDict):  # e.g. a get_config that forgot its `return`
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"config file {path}: {call} returned {type(c).__name__}, expected an "
                          "ml_collections.ConfigDict (does it end with `return config`?)")
    return override(c, overrides or {}, flag)


def parse_overrides(pairs, flag: str) -> dict:
    """["a.b=1", "c=x"] -> {"a.b": "1", "c": "x"}; `override` types each value by its field."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise errors.InputError(f"{flag} expects field=value, got {pair!r}")
        out[key] = value
    return out


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def typed(current: Any, value: Any, where: str) -> Any:
    """`value` for a field now holding `current`: text read as the field's type, anything else as it is."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if isinstance(current, bool):
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false")
    for kind, name in ((int, "an integer"), (float, "a number")):
        if isinstance(current, kind):
            try:
                return kind(value)
            except ValueError:
                raise ConfigError(f"{where}: expected {name}") from None
    try:  # a field without a value yet (None): JSON where it is JSON, else the text
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _unknown(field: str, keys, parent: str) -> str:
    near = difflib.get_close_matches(field.rsplit(".", 1)[-1], keys, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr((parent + '.' if parent else '') + n) for n in near)}?" if near else ""
    return f"unknown config field {field!r}{hint} (known under {parent or 'config'}: {', '.join(sorted(keys))})"


def check_keys(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict | None = None, prefix=""):
    """Raise ConfigError for any field not in the schema (catches typos in config files)."""
    reference = default_config() if reference is None else reference
    for key in config.keys():
        name = prefix + key
        if key not in reference:
            raise ConfigError(_unknown(name, list(reference.keys()), prefix.rstrip(".")))
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
            check_keys(config[key], reference[key], name + ".")


def _require(ok: bool, field: str, message: str):
    if not ok:
        raise ConfigError(f"config field {field}: {message}")


def validate_model(m: ml_collections.ConfigDict, prefix: str = "model.") -> None:
    """Check the architecture fields; raises ConfigError naming the first bad field."""
    check_keys(m, model_defaults(), prefix)
    for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
        _require(isinstance(m[f], int) and m[f] > 0, prefix + f, f"must be a positive integer, got {m[f]!r}")
    _require(m.hidden_size % m.num_heads == 0, prefix + "hidden_size",
             f"{m.hidden_size} is not divisible by num_heads={m.num_heads}")
    _require(0.0 <= m.rotary_pct <= 1.0, prefix + "rotary_pct", f"must be in [0, 1], got {m.rotary_pct}")
    r = rotary_dims(m)
    _require(r % 2 == 0, prefix + "rotary_pct",
             f"gives {r} rotary dims of head_dim {head_dim(m)}; rotary dims must be even")
    _require(m.rotary_emb_base > 0, prefix + "rotary_emb_base", f"must be positive, got {m.rotary_emb_base}")
    _require(m.padded_vocab_size == 0 or m.padded_vocab_size >= m.vocab_size, prefix + "padded_vocab_size",
             f"{m.padded_vocab_size} is smaller than vocab_size={m.vocab_size}")
    _require(m.intermediate_size >= 0, prefix + "intermediate_size", "must be >= 0 (0 means 4 x hidden_size)")
    _require(isinstance(m.make_vocab_size_divisible_by, int) and m.make_vocab_size_divisible_by >= 1,
             prefix + "make_vocab_size_divisible_by",
             f"must be a positive integer (the vocabulary is padded to a multiple of it), got "
             f"{m.make_vocab_size_divisible_by!r}")
    _require(isinstance(m.attention_chunk, int) and m.attention_chunk >= 1, prefix + "attention_chunk",
             f"must be a positive integer, got {m.attention_chunk!r}")
    for f in ("splash_block_q", "splash_block_kv"):
        _require(isinstance(m[f], int) and m[f] >= 0, prefix + f, f"must be >= 0 (0: min(512, seq_len)), got {m[f]!r}")
    _require(isinstance(m.scan_unroll, int) and m.scan_unroll >= 1, prefix + "scan_unroll",
             f"must be a positive integer, got {m.scan_unroll!r}")
    _require(m.layernorm_eps > 0, prefix + "layernorm_eps", f"must be positive, got {m.layernorm_eps}")
    for field, allowed in (("hidden_act", ACTIVATIONS), ("init", INITS), ("param_dtype", DTYPES), ("dtype", DTYPES),
                           ("attention_impl", ATTENTION_IMPLS), ("remat_policy", REMAT_POLICIES)):
        _require(m[field] in allowed, prefix + field, f"{m[field]!r} is not one of {', '.join(allowed)}")


def validate_energy(e: ml_collections.ConfigDict) -> None:
    """The energy fields' shapes; whether codecarbon knows the country is checked when a run starts."""
    iso = isinstance(e.country, str) and len(e.country) == 3 and e.country.isalpha() and e.country.isupper()
    _require(e.country == "" or iso, "energy.country",
             f"expected a 3-letter upper-case ISO code such as USA or FRA, or \"\", got {e.country!r}")
    _require(e.pue >= 1.0, "energy.pue", f"must be >= 1 (1 = no data-centre overhead), got {e.pue}")
    _require(e.carbon_intensity >= 0, "energy.carbon_intensity", f"must be >= 0 g CO2e/kWh, got {e.carbon_intensity}")
    _require(e.sample_secs > 0, "energy.sample_secs", f"must be positive, got {e.sample_secs}")
    _require(e.cpu_watts >= 0, "energy.cpu_watts", f"must be >= 0 W (0 = look the CPU up), got {e.cpu_watts}")


# Interval and count fields with the least each may hold. A step number is taken modulo the intervals (and the
# validation loss is a mean over eval_batches), so there a 0 would divide by zero, and only after the first compiled
# step; the fields where 0 means "off" may hold it. Other fields a value is divided by are checked beside their
# kin: model.make_vocab_size_divisible_by, train.micro_batches, train.loss_chunks, energy.sample_secs.
COUNT_FIELDS = (
    ("train.log_every", 1, "a step number is taken modulo it"),
    ("train.checkpoint_every", 1, "a step number is taken modulo it; the last step is always saved"),
    ("train.eval_every", 0, "0: no evaluation"),
    ("train.eval_batches", 1, "the validation loss is their mean"),
    ("train.keep_checkpoints", 0, "0: keep every checkpoint"),
    ("train.keep_every", 0, "0: none kept permanently"),
    ("train.eval_tasks_every", 0, "0: no evaluation of train.eval_tasks"),
    ("train.max_nonfinite_in_a_row", 1, "the run stops after this many non-finite steps in a row"),
    ("precision.loss_scale_window", 1, "the count of finite steps is taken modulo it"),
    ("precision.hysteresis", 1, "overflows tolerated before the loss scale is cut"),
    ("data.workers", 0, "0: in-process"),
)


def check_counts(c: ml_collections.ConfigDict) -> None:
    """Every field of COUNT_FIELDS an integer at or above its least value."""
    for field, least, why in COUNT_FIELDS:
        section, name = field.split(".")
        v = c[section][name]
        _require(isinstance(v, int) and v >= least, field, f"must be an integer >= {least} ({why}), got {v!r}")


def validate(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Validate a whole run config once at start-up. Returns it for chaining."""
    check_keys(c)
    validate_model(c.model)
    validate_energy(c.energy)
    for axis in MESH_AXES:
        v = c.mesh[axis]
        _require(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{axis}", f"must be -1 or a positive integer, got {v!r}")
    _require(sum(c.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", "at most one axis may be -1")
    _require(isinstance(c.mesh.slices, int) and c.mesh.slices >= 1, "mesh.slices",
             f"must be a positive integer (1: one slice), got {c.mesh.slices!r}")
    _require(c.mesh.slice_axis in SLICE_AXES, "mesh.slice_axis",
             f"{c.mesh.slice_axis!r} is not one of {', '.join(SLICE_AXES)} (tensor and stage stay inside a slice)")
    _require(c.zero_stage in (0, 1, 3), "zero_stage", f"must be 0, 1 or 3, got {c.zero_stage!r}")
    t = c.train
    for f in ("steps", "batch_size", "micro_batches", "seq_len"):
        _require(isinstance(t[f], int) and t[f] > 0, f"train.{f}", f"must be a positive integer, got {t[f]!r}")
    check_counts(c)
    for f, zero in (("device_memory_gb", "what the device reports"), ("peak_tflops", "the device's table entry")):
        _require(isinstance(t[f], (int, float)) and t[f] >= 0, f"train.{f}", f"must be >= 0 (0: {zero}), got {t[f]!r}")
    _require(t.batch_size % t.micro_batches == 0, "train.batch_size",
             f"{t.batch_size} is not divisible by train.micro_batches={t.micro_batches}")
    _require(isinstance(t.loss_chunks, int) and t.loss_chunks >= 1 and t.seq_len % t.loss_chunks == 0,
             "train.loss_chunks", f"must be a positive divisor of train.seq_len={t.seq_len}, got {t.loss_chunks!r}")
    _require(t.seq_len <= c.model.max_position_embeddings, "train.seq_len",
             f"{t.seq_len} exceeds model.max_position_embeddings={c.model.max_position_embeddings}")
    chunk = min(c.model.attention_chunk, t.seq_len)
    _require(c.model.attention_impl != "chunked" or t.seq_len % chunk == 0, "model.attention_chunk",
             f"{c.model.attention_chunk} does not divide train.seq_len={t.seq_len} (attention_impl=chunked)")
    context = c.mesh.context
    _require(context == -1 or t.seq_len % context == 0, "mesh.context",
             f"{context} does not divide train.seq_len={t.seq_len} (each device holds seq_len / context tokens)")
    local = t.seq_len // context if context > 0 else t.seq_len
    if c.model.attention_impl == "splash" and splash_block_problem(c.model, local):
        _require(False, *splash_block_problem(c.model, local))
    if c.mesh.stage > 1:
        check_pipeline(c, c.mesh.stage)
    _require(c.optimizer.lr > 0, "optimizer.lr", f"must be positive, got {c.optimizer.lr}")
    _require(0 <= c.optimizer.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
    _require(c.precision.loss_scale in ("none", "dynamic"), "precision.loss_scale",
             f"{c.precision.loss_scale!r} is not one of none, dynamic")
    _require(c.precision.mode in PRECISION_MODES, "precision.mode",
             f"{c.precision.mode!r} is not one of {', '.join(PRECISION_MODES)}")
    if c.precision.mode == "master_weights":
        _require(c.model.dtype in HALF_DTYPES, "model.dtype",
                 f"precision.mode=master_weights stores the params in model.dtype, which must be one of "
                 f"{', '.join(HALF_DTYPES)} (got {c.model.dtype!r}); use precision.mode=fp32_params for fp32 training")
        _require(c.model.param_dtype == "float32", "model.param_dtype",
                 f"precision.mode=master_weights keeps an fp32 master copy; model.param_dtype must be float32, "
                 f"got {c.model.param_dtype!r}")
    validate_data(c)
    profile_window(t.profile_steps)
    checkpoint_schedule(t.checkpoint_steps, t.steps)
    _require(not t.eval_tasks or t.eval_tasks_every > 0, "train.eval_tasks_every",
             f"train.eval_tasks={t.eval_tasks!r} are scored every train.eval_tasks_every steps: set it above 0")
    _require(t.eval_tasks_limit >= 0, "train.eval_tasks_limit",
             f"documents per task: 0 (all), a count, or a fraction below 1; got {t.eval_tasks_limit}")
    return c


def validate_data(c: ml_collections.ConfigDict) -> None:
    d = c.data
    _require(d.order in DATA_ORDERS, "data.order", f"{d.order!r} is not one of {', '.join(DATA_ORDERS)}")
    for f in ("num_samples", "start_batch"):
        _require(isinstance(d[f], int) and d[f] >= 0, f"data.{f}", f"must be a non-negative integer, got {d[f]!r}")
    _require(not d.num_samples or d.order == "gpt_neox", "data.num_samples", "applies to data.order='gpt_neox' only")
    if d.split:
        _require(d.order == "gpt_neox", "data.split", "applies to data.order='gpt_neox' only")
        _require(not d.val_paths, "data.split", "takes the validation documents from the train data; leave "
                 "data.val_paths empty")
        split_proportions(d.split)
    _require(d.order != "sequential" or not d.train_weights, "data.train_weights",
             "data.order='sequential' reads the datasets one after another; weights do not apply")
    datasets = path_entries(d.train_paths)
    if datasets:
        mixing_weights(d.train_weights, len(datasets))


def path_entries(spec: str) -> list[str]:
    """A comma-separated paths field (data.train_paths, data.val_paths) -> its entries, stripped, empty ones
    dropped: one dataset each."""
    return [e.strip() for e in spec.split(",") if e.strip()]


def mixing_weights(spec: str, count: int) -> list[float]:
    """data.train_weights for `count` training datasets (empty: all equal); a ConfigError unless `spec` holds
    `count` positive numbers."""
    if not spec.strip():
        return [1.0] * count
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        raise ConfigError(f"data.train_weights: {spec!r} is not a comma-separated list of numbers") from None
    if len(weights) != count:
        raise ConfigError(f"data.train_weights has {len(weights)} weights for {count} datasets in data.train_paths")
    if any(not w > 0 for w in weights):
        raise ConfigError(f"data.train_weights: every weight must be positive, got {spec!r}")
    return weights


PYTHIA_EVERY = 1000  # Pythia's checkpoints after step 512: every 1,000 steps


def checkpoint_schedule(spec: str, steps: int) -> tuple[int, ...]:
    """train.checkpoint_steps -> the steps whose checkpoints are kept for good, in order. A named rule stops at
    `steps` (train.steps); a listed step beyond it is a ConfigError. "pythia" over Pythia's 143,000 steps gives
    its 154 checkpoints."""
    field = "train.checkpoint_steps"
    if not spec:
        return ()
    powers = {0} | {2**k for k in range(max(steps, 1).bit_length())}
    if spec == "pythia":
        chosen = {s for s in powers if s <= 512} | set(range(PYTHIA_EVERY, steps + 1, PYTHIA_EVERY))
    elif spec == "log2":
        chosen = powers
    elif spec.startswith("log:"):
        count = spec[4:]
        _require(count.isdigit() and int(count) >= 2, field, f"{spec!r}: log:N needs a whole N >= 2 (e.g. log:20)")
        n = int(count)
        chosen = {0} | {round(steps ** (i / (n - 1))) for i in range(n)}  # evenly spaced in log(step)
    else:
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        _require(all(p.isdigit() for p in parts), field, f"{spec!r} is not pythia, log2, log:N or a list of "
                 "steps like '0,100,2000'")
        chosen = {int(p) for p in parts}
        beyond = sorted(s for s in chosen if s > steps)
        if beyond:
            _require(False, field, f"step {beyond[0]} is beyond train.steps={steps}: drop it or raise train.steps")
    return tuple(sorted(s for s in chosen if s <= steps))


def profile_window(spec: str) -> tuple[int, int] | None:
    """train.profile_steps ("START,STOP") -> (START, STOP), the steps the profiler traces; None when "" (off)."""
    if not spec:
        return None
    try:
        start, stop = (int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"config field train.profile_steps: {spec!r} is not 'START,STOP' (e.g. '10,12')") from None
    _require(0 <= start < stop, "train.profile_steps", f"need 0 <= START < STOP, got {spec!r}")
    return start, stop


def split_proportions(spec: str) -> list[float]:
    """GPT-NeoX's `split` ("969,30,1" or "969/30/1") -> train, valid, test proportions summing to 1."""
    try:
        parts = [float(p) for p in spec.replace("/", ",").split(",")]
    except ValueError:
        parts = []
    _require(0 < len(parts) <= 3 and min(parts) >= 0 and sum(parts) > 0, "data.split",
             f"{spec!r} is not up to 3 non-negative proportions with a positive sum, like '969,30,1'")
    parts += [0.0] * (3 - len(parts))
    return [p / sum(parts) for p in parts]


def check_pipeline(c: ml_collections.ConfigDict, stages: int) -> None:
    """Layers split evenly into `stages`, and the micro-batches fill the pipeline in whole rounds."""
    _require(c.model.num_layers % stages == 0, "mesh.stage",
             f"model.num_layers={c.model.num_layers} cannot be split evenly into {stages} pipeline stages")
    _require(c.train.seq_len % stages == 0, "train.seq_len",
             f"{c.train.seq_len} is not divisible by mesh.stage={stages} (the stages share the head's work, each "
             "taking an equal slice of the sequence)")
    _require(c.train.micro_batches % stages == 0, "train.micro_batches",
             f"{c.train.micro_batches} micro-batches do not fill a {stages}-stage pipeline; use a multiple of "
             f"mesh.stage={stages} (the idle 'bubble' is (stages - 1) / (micro_batches + stages - 1) of the step)")


def mesh_shape(sizes, num_devices: int) -> dict[str, int]:
    """Resolve mesh sizes {axis: size} (one axis may be -1: it takes what the others leave; a missing one is 1)
    against a device count."""
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    given = ", ".join(f"mesh.{a}={v}" for a, v in sizes.items() if a not in OPTIONAL_AXES or v != 1)
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"config field mesh: {given} cannot fill {num_devices} devices "
                              f"({num_devices} is not divisible by {fixed})")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"config field mesh: {given} uses {fixed} devices but {num_devices} are available; "
                          "set one axis to -1 or make the product equal the device count")
    return sizes


def check_batch(c: ml_collections.ConfigDict) -> None:
    """The global batch splits into micro-batches that divide over data x fsdp, and a pipeline's stages fit.
    Needs the mesh's actual sizes in mesh.* (`sharding.with_mesh_sizes`): `setup.build` calls it."""
    if c.mesh.stage > 1:
        check_pipeline(c, c.mesh.stage)
    t, n = c.train, c.mesh.data * c.mesh.fsdp
    _require((t.batch_size // t.micro_batches) % n == 0, "train.batch_size",
             f"{t.batch_size} sequences in {t.micro_batches} micro-batches give {t.batch_size // t.micro_batches} "
             f"per micro-batch, not divisible by mesh.data x mesh.fsdp = {n}")


def from_saved(stored: Mapping[str, Any], where: str) -> ml_collections.ConfigDict:
    """A run config saved as JSON (checkpoint, params dir), over the current defaults so fields added since it
    was written get their defaults; validated. Any problem is one ConfigError prefixed with `where`."""
    try:
        check_keys(ml_collections.ConfigDict(stored))
        config = default_config()
        config.update(stored)
        return validate(config)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{where}: {e}") from e


# ---- derived sizes -------------------------------------------------------------------------------------

SPLASH_BLOCK = 512  # splash attention's default block (MaxText's): the kernel's own 128 leaves the MXU idle
TPU_LANES = 128  # the splash kernel tiles keys (and Mosaic queries) in multiples of 128 lanes


def splash_blocks(m, seq_len: int) -> tuple[int, int]:
    """Splash attention's (block_q, block_kv): model.splash_block_q/kv, or min(512, seq_len) where they are 0."""
    return (m.splash_block_q or min(SPLASH_BLOCK, seq_len), m.splash_block_kv or min(SPLASH_BLOCK, seq_len))


def splash_block_problem(m, seq_len: int) -> tuple[str, str] | None:
    """(field, what is wrong) when splash attention's blocks cannot tile sequences of seq_len; None when they can."""
    for field, block in zip(("splash_block_q", "splash_block_kv"), splash_blocks(m, seq_len)):
        if block % TPU_LANES or seq_len % block:
            return (f"model.{field}", f"block {block} must be a multiple of {TPU_LANES} that divides the sequence "
                    f"length {seq_len} (attention_impl=splash; below {TPU_LANES} tokens use attention_impl=xla)")
    return None


def head_dim(m) -> int:
    return m.hidden_size // m.num_heads


def rotary_dims(m) -> int:
    return int(head_dim(m) * m.rotary_pct)


def ffn_size(m) -> int:
    return m.intermediate_size or 4 * m.hidden_size


def padded_vocab(m, tensor_parallel: int = 1) -> int:
    """NeoX pads the embedding to a multiple of 128 x tensor-parallel size (50,304 at TP 1, 50,432 at TP 2)."""
    if m.padded_vocab_size:
        return m.padded_vocab_size
    multiple = m.make_vocab_size_divisible_by * max(tensor_parallel, 1)
    return int(math.ceil(m.vocab_size / multiple) * multiple)


def param_count(m, tensor_parallel: int = 1) -> int:
    """Closed form L(12H^2 + 13H) + 2VH + 2H (4H FFN); the general form for other FFN sizes."""
    h, f, v = m.hidden_size, ffn_size(m), padded_vocab(m, tensor_parallel)
    per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # qkv+dense, mlp, two LayerNorms
    return m.num_layers * per_layer + 2 * v * h + 2 * h


def state_param_dtype(c: ml_collections.ConfigDict) -> str:
    """The dtype of the train state's params: model.dtype with master weights, else model.param_dtype."""
    return c.model.dtype if c.precision.mode == "master_weights" else c.model.param_dtype


def resolve_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The model config with padded_vocab_size fixed for this run's tensor-parallel size."""
    m = ml_collections.ConfigDict(c.model.to_dict())
    m.padded_vocab_size = padded_vocab(m, c.mesh.tensor)
    return m
