"""One device mesh, one table of logical axis rules, ZeRO as shardings of the optimizer state.

Mesh axes are ("data", "fsdp", "tensor"), led by "stage" when mesh.stage > 1 (pipeline parallelism: the
stacked `layers` dim of every block parameter splits over it; see neox_jax/pipeline.py). Every parameter and the block-boundary activations carry logical
axis names; `logical_rules(zero_stage)` maps them to mesh axes, Megatron-style for tensor parallelism
(qkv / h->4h column-parallel over heads / mlp, attention dense / 4h->h row-parallel, vocab-parallel
embedding and head). ZeRO is a placement decision:

    stage 0: optimizer state placed like the params (replicated except for tensor parallelism)
    stage 1: optimizer moments (and the gradient accumulator) additionally split over data x fsdp;
             params replicated
    stage 3: params, grads and optimizer state split over fsdp (the `embed` dim)

`layout_report` describes every array's placement and per-device bytes without allocating anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from neox_jax.config import MESH_AXES, ConfigError

BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (and ZeRO-1 optimizer state)
STAGE_AXIS = "stage"  # pipeline stages; in the mesh only when there are at least two
# Sets the mesh for sharding constraints while tracing (jax.set_mesh is refused inside jit); newer JAX also
# exports it at top level.
_use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None) or getattr(jax, "use_abstract_mesh")


def logical_rules(zero_stage: int, pipelined: bool = False) -> tuple:
    """Logical axis -> mesh axis. Order matters: an activation's batch claims fsdp before embed can.
    Pipelined, each stage holds a contiguous block of layers: the stacked `layers` dim splits over `stage`."""
    return (
        ("batch", BATCH_AXES),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("embed", "fsdp" if zero_stage == 3 else None),
        ("kv", None),
        ("layers", STAGE_AXIS if pipelined else None),
        ("length", None),
    )


# ---- mesh ---------------------------------------------------------------------------------------------

def mesh_shape(config, num_devices: int) -> dict[str, int]:
    """Resolve mesh.* (one axis may be -1: it takes what the others leave) against a device count."""
    sizes = {a: int(config.mesh.get(a, 1)) for a in MESH_AXES}
    given = ", ".join(f"mesh.{a}={v}" for a, v in sizes.items() if a != STAGE_AXIS or v != 1)
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


def make_mesh(config, devices=None) -> Mesh:
    """The ([stage,] data, fsdp, tensor) mesh over `devices` (default: all), with Auto axes for GSPMD.
    `stage` is left out at size 1, so a run without pipelining has exactly the unpipelined mesh."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(config, len(devices))
    axes = tuple(a for a in MESH_AXES if a != STAGE_AXIS or sizes[a] > 1)
    return jax.make_mesh(tuple(sizes[a] for a in axes), axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def num_stages(mesh: Mesh) -> int:
    return int(mesh.shape.get(STAGE_AXIS, 1))


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """GPipe's idle share: M micro-batches cross S stages in M + S - 1 ticks, S - 1 of them partly idle."""
    return (stages - 1) / (micro_batches + stages - 1)


def with_mesh_sizes(config, mesh: Mesh):
    """A copy of config whose mesh.* hold the actual sizes (so -1 never leaks into derived sizes)."""
    c = config.copy_and_resolve_references()
    for axis in MESH_AXES:
        c.mesh[axis] = int(mesh.shape.get(axis, 1))
    return c


def mesh_rules(mesh: Mesh, zero_stage: int) -> tuple:
    """The logical rules for this mesh (pipelined when it has a stage axis)."""
    return logical_rules(zero_stage, pipelined=num_stages(mesh) > 1)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, zero_stage: int):
    """Make the model's `nn.with_logical_constraint` calls take effect while tracing a step (usable inside jit)."""
    with _use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules(mesh, zero_stage)):
        yield


# ---- batches ------------------------------------------------------------------------------------------

def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch axis split over data x fsdp, everything else replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_split(mesh: Mesh) -> int:
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble global jax.Arrays from this process's rows of the batch (all rows on one host)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


# ---- parameter and optimizer-state placement -----------------------------------------------------------

def path_name(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return "/".join(parts)


def logical_axes(boxed_params):
    """Tree of logical-name tuples from a tree of `nn.LogicallyPartitioned` params (or their shapes)."""
    return jax.tree.map(lambda b: tuple(b.names), boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def param_specs(boxed_params, mesh: Mesh, zero_stage: int):
    """PartitionSpec per param from the rules; a dim the mesh axes do not divide is a ConfigError."""
    rules = mesh_rules(mesh, zero_stage)

    def spec(path, boxed):
        names, shape = tuple(boxed.names), boxed.value.shape
        pspec = nn.logical_to_mesh_axes(names, rules)
        for dim, (size, axes, name) in enumerate(zip(shape, pspec, names)):
            n = _axis_size(mesh, axes)
            if size % n:
                field = "mesh." + (axes if isinstance(axes, str) else "/".join(axes))
                raise ConfigError(
                    f"config field {field}: parameter {path_name(path)} dim {dim} ({name}, size {size}) is not "
                    f"divisible by mesh {axes} of size {n}; change {field} or the model size")
        return pspec

    return jax.tree_util.tree_map_with_path(spec, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def zero1_spec(pspec: P, shape, mesh: Mesh) -> P | None:
    """Add the data x fsdp split to the largest unsplit dim it divides; None if no dim fits."""
    n = batch_split(mesh)
    if n == 1:
        return pspec
    dims = list(pspec) + [None] * (len(shape) - len(pspec))
    free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % n == 0]
    if not free:
        return None
    best = max(free, key=lambda d: shape[d])
    dims[best] = BATCH_AXES
    return P(*dims)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where each part of the train state lives: trees of PartitionSpecs plus the ZeRO-1 fallbacks."""

    params: Any
    grads: Any
    opt_state: Any
    replicated_moments: tuple  # names of moments that no dim could split (ZeRO-1), kept replicated


def placement(boxed_params, optimizer: optax.GradientTransformation, mesh: Mesh, zero_stage: int) -> Placement:
    """Decide the specs of params, grads and optax state (shapes only; nothing is allocated)."""
    params = param_specs(boxed_params, mesh, zero_stage)
    shapes = jax.tree.map(lambda b: b.value, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    fallback = []

    def moment_spec(path, shape, pspec):
        if zero_stage != 1:
            return pspec
        spec = zero1_spec(pspec, shape.shape, mesh)
        if spec is None:
            fallback.append(path_name(path))
            return pspec
        return spec

    moments = jax.tree_util.tree_map_with_path(moment_spec, shapes, params)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_state = optax.tree_map_params(optimizer, lambda _, spec: spec, opt_shapes, moments,
                                      transform_non_params=lambda _: P(),
                                      is_leaf=lambda x: isinstance(x, P))
    # ZeRO-1 keeps the fp32 gradient accumulator split like the moments: each micro-batch's gradients are
    # reduce-scattered into it (cheaper than an all-reduce, and 1/(data x fsdp) of the memory).
    grads = moments if zero_stage == 1 else params
    return Placement(params=params, grads=grads, opt_state=opt_state, replicated_moments=tuple(fallback))


def to_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


# ---- layout report ------------------------------------------------------------------------------------

def _entry(name, shape, dtype, spec, mesh, logical=None) -> dict:
    local = NamedSharding(mesh, spec).shard_shape(tuple(shape))
    itemsize = np.dtype(dtype).itemsize
    entry = {"name": name, "spec": str(tuple(spec)), "shape": list(shape), "local_shape": list(local),
             "dtype": str(np.dtype(dtype)), "bytes": math.prod(shape) * itemsize,
             "local_bytes": math.prod(local) * itemsize}
    if logical is not None:
        entry = {"name": name, "logical": [str(a) for a in logical], **{k: v for k, v in entry.items() if k != "name"}}
    return entry


def layout_report(boxed_params, optimizer, mesh: Mesh, zero_stage: int, micro_batches: int | None = None) -> dict:
    """Per-array placement and per-device bytes of params, grads (fp32, like params) and optimizer state;
    with a stage axis also the pipeline: layers per stage and, given `micro_batches`, the bubble fraction."""
    place = placement(boxed_params, optimizer, mesh, zero_stage)
    flat = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    specs = jax.tree.leaves(place.params, is_leaf=lambda x: isinstance(x, P))
    params = [_entry(path_name(p), b.value.shape, b.value.dtype, s, mesh, b.names) for (p, b), s in zip(flat, specs)]
    shapes = jax.tree.map(lambda b: b.value, boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    opt_flat = jax.tree_util.tree_flatten_with_path(opt_shapes)[0]
    opt_specs = jax.tree.leaves(place.opt_state, is_leaf=lambda x: isinstance(x, P))
    opt = [_entry(path_name(p), x.shape, x.dtype, s, mesh) for (p, x), s in zip(opt_flat, opt_specs)]
    grad_specs = jax.tree.leaves(place.grads, is_leaf=lambda x: isinstance(x, P))
    grads = sum(_entry("", b.value.shape, np.float32, s, mesh)["local_bytes"] for (_, b), s in zip(flat, grad_specs))
    totals = {
        "params": sum(e["local_bytes"] for e in params),
        "optimizer": sum(e["local_bytes"] for e in opt),
        "grads": grads,
    }
    totals["total: params + optimizer + grads (no activations)"] = sum(totals.values())
    notes = [f"ZeRO-1: no dim of {n} divisible by data x fsdp = {batch_split(mesh)}; its moments stay replicated"
             for n in place.replicated_moments]
    report = {"mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names}, "zero_stage": zero_stage,
              "param_count": sum(math.prod(e["shape"]) for e in params),
              "params": params, "optimizer": opt, "per_device_bytes": totals, "notes": notes}
    stages = num_stages(mesh)
    if stages > 1:
        layers = next(e["shape"][0] for e in params if e["logical"][0] == "layers")
        report["pipeline"] = {"schedule": "gpipe", "stages": stages, "layers_per_stage": layers // stages}
        if micro_batches:
            report["pipeline"].update(micro_batches=micro_batches,
                                      bubble_fraction=bubble_fraction(stages, micro_batches))
    return report


def add_compiled_memory(report: dict, stats, note: str | None = None) -> dict:
    """Fold XLA's per-device memory analysis of the compiled step into the report.

    The compiled temp holds activations, gradients and workspace; the peak estimate is the standard
    arguments + temp + outputs - aliased (the donated state aliases its outputs)."""
    temp = stats.temp_size_in_bytes
    compiled = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                "aliased": stats.alias_size_in_bytes, "temp": temp}
    peak = compiled["arguments"] + temp + compiled["outputs"] - compiled["aliased"]
    report["compiled"] = compiled
    report["per_device_bytes"]["temp: activations + grads + workspace (compiled)"] = temp
    report["per_device_bytes"]["total: compiled peak estimate"] = peak
    if note:
        report["notes"].append(note)
    return report


def compare_reports(a: dict, b: dict) -> dict:
    """What changes between two layouts: per-param specs / per-device bytes, and the per-device totals."""
    b_params = {e["name"]: e for e in b["params"]}
    changed = [{"name": e["name"], "spec": [e["spec"], b_params[e["name"]]["spec"]],
                "local_bytes": [e["local_bytes"], b_params[e["name"]]["local_bytes"]]}
               for e in a["params"] if e["name"] in b_params and
               (e["spec"], e["local_bytes"]) != (b_params[e["name"]]["spec"], b_params[e["name"]]["local_bytes"])]
    b_opt = {e["name"]: e for e in b["optimizer"]}
    opt_changed = sum(1 for e in a["optimizer"] if e["name"] in b_opt and e["spec"] != b_opt[e["name"]]["spec"])
    keys = list(a["per_device_bytes"]) + [k for k in b["per_device_bytes"] if k not in a["per_device_bytes"]]
    totals = {k: [a["per_device_bytes"].get(k), b["per_device_bytes"].get(k)] for k in keys}
    return {"layouts": [_layout_name(a), _layout_name(b)], "params_changed": changed,
            "optimizer_arrays_changed": opt_changed, "per_device_bytes": totals}


def _layout_name(r: dict) -> str:
    return ",".join(f"{a}={n}" for a, n in r["mesh"].items()) + f" zero{r['zero_stage']}"


def _gb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def format_report(report: dict) -> str:
    """Human-readable tables: params (logical axes, spec, global / per-device shape and bytes), memory."""
    lines = [f"layout {_layout_name(report)}  ({report['param_count']:,} params)", ""]
    header = f"{'parameter':<44} {'logical axes':<34} {'spec':<36} {'global shape':<22} {'per-device shape':<22} {'global':>12} {'per device':>12}"
    lines += [header, "-" * len(header)]
    for e in report["params"]:
        lines.append(f"{e['name']:<44} {','.join(e['logical']):<34} {e['spec']:<36} {str(tuple(e['shape'])):<22} "
                     f"{str(tuple(e['local_shape'])):<22} {_gb(e['bytes']):>12} {_gb(e['local_bytes']):>12}")
    opt_sharded = sum(1 for e in report["optimizer"] if e["local_bytes"] < e["bytes"])
    lines += ["", f"optimizer state: {len(report['optimizer'])} arrays, {opt_sharded} split across devices"]
    lines += ["", "per-device memory", "-" * 63]
    for k, v in report["per_device_bytes"].items():
        lines.append(f"{k:<50} {_gb(v):>12}")
    if "pipeline" in report:
        p = report["pipeline"]
        lines += ["", f"pipeline ({p['schedule']}): {p['stages']} stages x {p['layers_per_stage']} layers"
                  + (f", {p['micro_batches']} micro-batches, bubble {p['bubble_fraction']:.1%} of the step"
                     if "micro_batches" in p else "")]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def format_comparison(cmp: dict) -> str:
    a, b = cmp["layouts"]
    lines = [f"{a}  ->  {b}", ""]
    for e in cmp["params_changed"]:
        lines.append(f"{e['name']:<44} {e['spec'][0]:<34} -> {e['spec'][1]:<34} "
                     f"{_gb(e['local_bytes'][0]):>12} -> {_gb(e['local_bytes'][1]):>12}")
    lines.append(f"optimizer arrays with a different spec: {cmp['optimizer_arrays_changed']}")
    lines += ["", f"{'per device':<50} {a:>30} {b:>30}"]
    for k, (x, y) in cmp["per_device_bytes"].items():
        lines.append(f"{k:<50} {_gb(x):>30} {_gb(y):>30}")
    return "\n".join(lines)
