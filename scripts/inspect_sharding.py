"""Show how a config lays out on a mesh: per-parameter sharding and per-device memory, without weights.

    python scripts/inspect_sharding.py --config configs/neox_20b.py --mesh data=48,tensor=2
    python scripts/inspect_sharding.py --config configs/pythia.py:410m --mesh data=4,tensor=2 --zero_stage 1 \\
        --compare fsdp=8,zero_stage=3 --format json
    python scripts/inspect_sharding.py --config configs/tiny.py --mesh data=8 --config.train.micro_batches=2
    python scripts/inspect_sharding.py --config configs/neox_20b.py --mesh stage=4,tensor=2,data=12 --zero_stage 1 \
        --micro_batches 32

Runs on a CPU with simulated devices (one per mesh position); shapes come from `jax.eval_shape` and the
memory table from XLA's analysis of the AOT-compiled train step. `--compile_layers N` compiles N-layer and
2N-layer variants and extrapolates the compiled temp linearly in the layer count (exact for a scanned
stack; with a stage axis the count per stage); params, grads and optimizer bytes are always exact. With
`stage=S` the train step is the GPipe pipeline over `train.micro_batches` and the report adds its bubble. The logic lives in neox_jax/sharding.py.
"""

import math
import os
import sys

MESH_AXES = ("stage", "data", "fsdp", "tensor")
MESH_KEYS = (*MESH_AXES, "zero_stage")


def parse_layout(spec: str) -> dict:
    """"stage=4,data=12,tensor=2[,zero_stage=1]" -> {"stage": 4, "data": 12, "tensor": 2, "zero_stage": 1}."""
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in MESH_KEYS or not value.isdigit() or int(value) < (0 if key == "zero_stage" else 1):
            raise SystemExit(f"inspect_sharding: bad layout {spec!r}: expected comma-separated "
                             f"{'/'.join(MESH_KEYS)}=N with positive sizes, e.g. data=12,tensor=2")
        out[key] = int(value)
    return out


def _flag_value(argv, name):
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def _devices_needed(argv) -> int:
    sizes = [parse_layout(_flag_value(argv, f) or "") for f in ("mesh", "compare")]
    return max(math.prod(s.get(a, 1) for a in MESH_AXES) for s in sizes)


if __name__ == "__main__":
    # Simulated devices must be configured before jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_devices_needed(sys.argv)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file, optionally path.py:arg")
_MESH = flags.DEFINE_string("mesh", None, "layout, e.g. data=12,tensor=2 (axes stage/data/fsdp/tensor, default 1)")
_ZERO = flags.DEFINE_integer("zero_stage", None, "ZeRO stage 0/1/3 (default: the config's)")
_REMAT = flags.DEFINE_string("remat", None, "model.remat_policy (none/full/dots/...)")
_BATCH = flags.DEFINE_integer("batch_size", None, "train.batch_size (global)")
_MICRO = flags.DEFINE_integer("micro_batches", None, "train.micro_batches")
_COMPARE = flags.DEFINE_string("compare", None, "second layout to compare, e.g. data=48,tensor=2,zero_stage=1")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "json"], "output format")
_COMPILE = flags.DEFINE_bool("compile", True, "AOT-compile the train step for the activation/temp estimate")
_COMPILE_LAYERS = flags.DEFINE_integer("compile_layers", 0,
                                       "0: compile all layers; N: compile N and 2N layers and extrapolate linearly")


def layout_config(base, layout: dict):
    c = base.copy_and_resolve_references()
    for axis in MESH_AXES:
        c.mesh[axis] = layout.get(axis, 1)
    if "zero_stage" in layout:
        c.zero_stage = layout["zero_stage"]
    return c


def inspect(config, layout: dict) -> dict:
    import jax

    from neox_jax import config as cfg, model, optim, sharding, train

    config = cfg.validate(layout_config(config, layout))
    devices = math.prod(config.mesh[a] for a in MESH_AXES)
    mesh = sharding.make_mesh(config, jax.devices()[:devices])
    m = train.model_config(config, mesh)
    report = sharding.layout_report(model.param_shapes(m), optim.make_optimizer(config), mesh, config.zero_stage,
                                    micro_batches=config.train.micro_batches)
    if not _COMPILE.value:
        return report
    start = time.time()
    if jax.default_backend() == "cpu" and config.model.dtype == "float16":
        # XLA:CPU has no fp16 dot with fp32 accumulation; bf16 has the same size.
        config = config.copy_and_resolve_references()
        config.model.dtype = "bfloat16"
        report["notes"].append("fp16 compute compiled as bf16 (same bytes): XLA:CPU lacks fp16 dots with fp32 accumulation")
    n = _COMPILE_LAYERS.value
    stages = config.mesh.stage
    if n and 2 * n * stages < config.model.num_layers:
        # Every compiled size is a + b * layers for a scanned stack: fit a, b from two compiles.
        small, double = (train.compile_train_step(_with_layers(config, k * stages), mesh).memory_analysis()
                         for k in (n, 2 * n))
        extra = config.model.num_layers // stages - n  # layers per stage beyond the small compile
        stats = types.SimpleNamespace(**{
            f: int(getattr(small, f) + (getattr(double, f) - getattr(small, f)) / n * extra)
            for f in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")})
        note = (f"compiled sizes extrapolated linearly from {n}- and {2 * n}-layer(-per-stage) compiles "
                f"(temp {small.temp_size_in_bytes / 1e9:.3f} / {double.temp_size_in_bytes / 1e9:.3f} GB)")
        report = sharding.add_compiled_memory(report, stats, note=note)
    else:
        report = sharding.add_compiled_memory(report, train.compile_train_step(config, mesh).memory_analysis())
    report["compile_seconds"] = round(time.time() - start, 1)
    report["notes"].append(f"compiled on CPU ({jax.default_backend()}); XLA CPU may keep fp16/bf16 temporaries "
                           "in fp32, so the temp estimate is an upper bound for GPU")
    return report


def _with_layers(config, layers):
    c = config.copy_and_resolve_references()
    c.model.num_layers = layers
    return c


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _MESH.value:
        raise app.UsageError("--mesh is required, e.g. --mesh data=12,tensor=2")
    config = _CONFIG.value.copy_and_resolve_references()
    if _REMAT.value is not None:
        config.model.remat_policy = _REMAT.value
    if _BATCH.value is not None:
        config.train.batch_size = _BATCH.value
    if _MICRO.value is not None:
        config.train.micro_batches = _MICRO.value
    layout = parse_layout(_MESH.value)
    if _ZERO.value is not None:
        layout.setdefault("zero_stage", _ZERO.value)
    from neox_jax.config import ConfigError

    try:
        report = inspect(config, layout)
        other = None
        if _COMPARE.value:  # a full layout of its own; the ZeRO stage carries over unless it names one
            second = parse_layout(_COMPARE.value)
            if "zero_stage" in layout:
                second.setdefault("zero_stage", layout["zero_stage"])
            other = inspect(config, second)
    except ConfigError as e:
        raise SystemExit(f"inspect_sharding: {e}")
    from neox_jax import sharding

    if _FORMAT.value == "json":
        out = {"layout": report}
        if other is not None:
            out["compare"] = {"layout": other, "diff": sharding.compare_reports(report, other)}
        print(json.dumps(out, indent=1))
        return
    print(sharding.format_report(report))
    if other is not None:
        print()
        print(sharding.format_comparison(sharding.compare_reports(report, other)))


if __name__ == "__main__":
    app.run(main)
