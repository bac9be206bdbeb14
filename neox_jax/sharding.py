"""One device mesh, one table of logical axis rules, ZeRO as shardings of the optimizer state.

Mesh axes are ("data", "fsdp", "tensor"), led by "stage" when mesh.stage > 1 (pipeline parallelism: the
stacked `layers` dim of every block parameter splits over it; see neox_jax/pipeline.py), with "context" before
"tensor" when mesh.context > 1 (the sequence split; see neox_jax/context.py). With mesh.slices > 1 the data (or
fsdp) axis spans TPU slices (the others stay inside one). Every parameter and the block-boundary activations
carry logical axis names; `logical_rules(zero_stage)` maps them to mesh axes, Megatron-style for tensor parallelism
(qkv / h->4h column-parallel over heads / mlp, attention dense / 4h->h row-parallel, vocab-parallel
embedding and head). ZeRO is a placement decision:

    stage 0: optimizer state placed like the params (replicated except for tensor parallelism)
    stage 1: optimizer moments (and the gradient accumulator) additionally split over data x fsdp;
             params replicated
    stage 3: params, grads and optimizer state split over fsdp (the `embed` dim)

`neox_jax.layout` reports where every array lands and what a step needs per device.
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
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from neox_jax.config import MESH_AXES, OPTIONAL_AXES, ConfigError, mesh_shape
from neox_jax.pytree import path_name

BATCH_AXES = ("data", "fsdp")  # mesh axes that split the batch (and ZeRO-1 optimizer state)
STAGE_AXIS = "stage"  # pipeline stages; in the mesh only when there are at least two
CONTEXT_AXIS = "context"  # context parallelism: splits the sequence; in the mesh only when at least two
# Sets the mesh for sharding constraints while tracing (jax.set_mesh is refused inside jit); newer JAX also
# exports it at top level.
_use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None) or getattr(jax, "use_abstract_mesh")


def logical_rules(zero_stage: int, pipelined: bool = False, context: bool = False) -> tuple:
    """Logical axis -> mesh axis. Order matters: an activation's batch claims fsdp before embed can.
    Pipelined, each stage holds a contiguous block of layers: the stacked `layers` dim splits over `stage`.
    With a context axis, every activation's sequence (`length`) splits over it, and ZeRO-3's params too."""
    return (
        ("batch", BATCH_AXES),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("embed", _zero3_axes(context) if zero_stage == 3 else None),
        ("kv", None),
        ("layers", STAGE_AXIS if pipelined else None),
        ("length", CONTEXT_AXIS if context else None),
    )


def _zero3_axes(context: bool):
    """ZeRO-3 splits the params over fsdp and, when there is one, the context axis too: its devices hold the same
    rows' tokens, so their params (and gradients, summed over it like the batch) need not be copies."""
    return ("fsdp", CONTEXT_AXIS) if context else "fsdp"


# ---- mesh ---------------------------------------------------------------------------------------------

def make_mesh(config, devices=None) -> Mesh:
    """The ([stage,] data, fsdp, [context,] tensor) mesh of config's mesh.* over `devices` (default: all)."""
    return mesh_of({a: config.mesh.get(a, 1) for a in MESH_AXES}, devices,
                   slices=config.mesh.get("slices", 1), slice_axis=config.mesh.get("slice_axis", "data"))


def inference_mesh(tensor_parallel: int = 1) -> Mesh:
    """All devices as (data=-1, fsdp=1, tensor=tensor_parallel), for generation and scoring: weights split over
    tensor, rows over data."""
    return mesh_of({"data": -1, "fsdp": 1, "tensor": int(tensor_parallel)})


def mesh_of(sizes, devices=None, slices: int = 1, slice_axis: str = "data") -> Mesh:
    """The ([stage,] data, fsdp, [context,] tensor) mesh of `sizes` (see `mesh_shape`) over `devices` (default:
    all), with Auto axes for GSPMD. `stage` and `context` are left out at size 1, so a run without them has
    exactly the mesh it had before they existed. With `slices` > 1, `slice_axis` (data or fsdp) spans the slices
    (its collectives cross the data-centre network, DCN) and every other axis stays inside one slice (ICI)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(sizes, len(devices))
    axes = tuple(a for a in MESH_AXES if a not in OPTIONAL_AXES or sizes[a] > 1)
    shape = tuple(sizes[a] for a in axes)
    if slices > 1:
        return Mesh(_multi_slice_grid(sizes, axes, devices, slices, slice_axis), axes,
                    axis_types=(AxisType.Auto,) * len(axes))
    try:
        return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)
    except NotImplementedError:  # an axis that is no product of a TPU torus's dims: let it split one
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, axes, axis_types=(AxisType.Auto,) * len(axes))


def device_slices(devices, slices: int) -> list[int]:
    """Each device's slice: a TPU's `slice_index`; elsewhere (simulated CPU devices, GPUs) `slices` contiguous
    blocks of the device list, so a multi-slice layout can be built and tested anywhere."""
    if slices == 1:
        return [0] * len(devices)
    if hasattr(devices[0], "slice_index"):
        found = sorted({d.slice_index for d in devices})
        if len(found) != slices:
            raise ConfigError(f"config field mesh.slices: {slices} slices asked for, but the {len(devices)} devices "
                              f"are in {len(found)} slice(s); set mesh.slices={len(found)}")
        return [found.index(d.slice_index) for d in devices]
    if len(devices) % slices:
        raise ConfigError(f"config field mesh.slices: {slices} slices do not divide the {len(devices)} devices")
    return [i * slices // len(devices) for i in range(len(devices))]


def mesh_device_slices(mesh: Mesh, devices, slices: int) -> list[int]:
    """The slice of each of the mesh's devices, in the mesh's order (a compiled program's device ids)."""
    of = dict(zip(devices, device_slices(list(devices), slices)))
    return [of[d] for d in mesh.devices.flat]


def _multi_slice_grid(sizes, axes, devices, slices: int, slice_axis: str) -> np.ndarray:
    """The device grid of a multi-slice mesh: one grid per slice (shaped by the TPU torus where there is one), the
    slices laid side by side along `slice_axis`; what `mesh_utils.create_hybrid_device_mesh` does, for any device."""
    of = device_slices(devices, slices)
    if sizes[slice_axis] % slices:
        others = ", ".join(f"mesh.{a}={sizes[a]}" for a in axes if a != slice_axis and sizes[a] > 1)
        raise ConfigError(f"config field mesh.slices: {slices} slices need mesh.{slice_axis} (here "
                          f"{sizes[slice_axis]}) to be a multiple of {slices}: only mesh.slice_axis ({slice_axis}) "
                          f"may cross slices, {others or 'the other axes'} stay inside one (over DCN they would be "
                          f"too slow)")
    groups = [[d for d, s in zip(devices, of) if s == i] for i in range(slices)]
    inner = tuple(sizes[a] // slices if a == slice_axis else sizes[a] for a in axes)
    grids = [mesh_utils.create_device_mesh(inner, g, allow_split_physical_axes=True) for g in groups]
    return np.concatenate(grids, axis=axes.index(slice_axis))


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
    return logical_rules(zero_stage, pipelined=num_stages(mesh) > 1, context=CONTEXT_AXIS in mesh.shape)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, zero_stage: int):
    """Make the model's `nn.with_logical_constraint` calls take effect while tracing a step (usable inside jit)."""
    with _use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(mesh_rules(mesh, zero_stage)):
        yield


def attention_spec(mesh, batch: int, heads: int, length: str | None = None) -> P:
    """q, k, v [B, T, n, d] inside a shard_map, split as the activations are: batch over data x fsdp, heads over
    tensor (where they divide), the sequence over `length` (the context axis) if given."""
    rows = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    rows = rows if rows and batch % math.prod(mesh.shape[a] for a in rows) == 0 else None
    tensor = "tensor" if "tensor" in mesh.axis_names and heads % mesh.shape["tensor"] == 0 else None
    return P(rows, length, tensor, None)


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


# ---- inference: generation and scoring ------------------------------------------------------------------

def batch_multiple(mesh: Mesh | None) -> int:
    """Rows an inference batch must be a multiple of: the mesh's `batch_split` (1 without a mesh)."""
    return 1 if mesh is None else batch_split(mesh)


def put_batch(tree, mesh: Mesh | None):
    """Arrays whose leading dim is the batch split over the data axes; the KV cache (batch on dim 1, heads on
    dim 3) too. Without a mesh, unchanged."""
    if mesh is None:
        return tree

    def spec(path, x):
        if x.ndim == 0:
            return NamedSharding(mesh, P())
        if {"k", "v"} & set(path_name(path).split("/")):  # cache entries [L or 1, B, S, n, d]
            return NamedSharding(mesh, P(None, BATCH_AXES, None, "tensor", None))
        return NamedSharding(mesh, P(BATCH_AXES))

    return jax.device_put(tree, jax.tree_util.tree_map_with_path(spec, tree))


def place_params(params, boxed_shapes, mesh: Mesh):
    """Params laid out by the logical rules without ZeRO (replicated over data, split over tensor), as inference
    holds them; `boxed_shapes` are the model's (`model.param_shapes`)."""
    return jax.device_put(params, to_shardings(param_specs(boxed_shapes, mesh, zero_stage=0), mesh))


# ---- parameter and optimizer-state placement -----------------------------------------------------------

def logical_axes(boxed_params):
    """Tree of logical-name tuples from a tree of `nn.LogicallyPartitioned` params (or their shapes)."""
    return jax.tree.map(lambda b: tuple(b.names), boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def axis_size(mesh: Mesh, axes) -> int:
    """Devices along `axes` (a mesh axis name, a tuple of them, or None)."""
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
            n = axis_size(mesh, axes)
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
    master: Any  # where the weights the optimizer updates live: like the moments (fp32 master, or the params' shard)
    opt_state: Any
    replicated_moments: tuple  # names of moments that no dim could split (ZeRO-1), kept replicated

    def on(self, mesh: Mesh) -> "Placement":
        """The same placement with NamedShardings on `mesh` for the PartitionSpecs."""
        return dataclasses.replace(self, **{f: to_shardings(getattr(self, f), mesh)
                                            for f in ("params", "grads", "master", "opt_state")})


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
    return Placement(params=params, grads=grads, master=moments, opt_state=opt_state,
                     replicated_moments=tuple(fallback))


def to_shardings(specs, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
