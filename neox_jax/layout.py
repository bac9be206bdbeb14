"""The layout report: where every array of a run lands on the mesh and what a train step needs per device.

Three views of per-device memory, side by side:

- **state** (exact, from shapes and placements): params (in the train state's dtype), optimizer state (Adam
  moments and, with master weights, the fp32 master), the fp32 gradients at their placement.
- **compiled** (XLA's memory analysis of the AOT-compiled step): arguments, temp and the peak estimate, and the
  temp split into named parts (`temp_breakdown`): what is live at the compiled program's memory peak, read from
  XLA's own buffer assignment and live ranges (dumped for that compile), each buffer classified by its shape and
  the op that made it.
- **model** (`analytic_memory`): the same parts from a formula in the config's sizes, to check the compiled
  figure and to read off what a change would save.

Nothing here allocates a weight; `scripts/inspect_sharding.py` drives it.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import math
import os
import re
import tempfile
import types

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from neox_jax import config as cfg
from neox_jax import model as model_lib
from neox_jax import collectives, fit, memory, metrics, setup, sharding, table, targets, train
from neox_jax.memory import (ACTIVATIONS, ATTENTION, COLLECTIVES, GRADIENTS, HEAD, HEAD_INPUTS, OTHER, PARTS,
                             SHARDS, STAGE_INPUTS, STORED, UNATTRIBUTED)
from neox_jax.pytree import path_name
from neox_jax.setup import RunSetup

# ---- state: placements and exact bytes ------------------------------------------------------------------

def _entry(name, shape, dtype, spec, mesh, logical=None) -> dict:
    local = NamedSharding(mesh, spec).shard_shape(tuple(shape))
    itemsize = np.dtype(dtype).itemsize
    entry = {"name": name, "spec": str(tuple(spec)), "shape": list(shape), "local_shape": list(local),
             "dtype": str(np.dtype(dtype)), "bytes": math.prod(shape) * itemsize,
             "local_bytes": math.prod(local) * itemsize}
    if logical is not None:
        entry = {"name": name, "logical": [str(a) for a in logical], **{k: v for k, v in entry.items() if k != "name"}}
    return entry


def layout_report(run: RunSetup) -> dict:
    """Per-array placement and per-device bytes of params (in the train state's dtype), optimizer state (the optax
    state plus, with master weights, the fp32 master placed like the moments) and fp32 gradients; with a stage
    axis also the pipeline: layers per stage and the bubble fraction."""
    config, mesh, place, boxed_params = run.config, run.mesh, run.placement, run.param_shapes
    zero_stage, micro_batches = config.zero_stage, config.train.micro_batches
    param_dtype = np.dtype(cfg.state_param_dtype(config))
    master_weights = config.precision.mode == "master_weights"
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    flat = jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_boxed)[0]
    specs = jax.tree.leaves(place.params, is_leaf=is_spec)
    params = [_entry(path_name(p), b.value.shape, param_dtype, s, mesh, b.names)
              for (p, b), s in zip(flat, specs)]
    shapes = jax.tree.map(lambda b: b.value, boxed_params, is_leaf=is_boxed)
    opt_flat = jax.tree_util.tree_flatten_with_path(jax.eval_shape(run.optimizer.init, shapes))[0]
    opt_specs = jax.tree.leaves(place.opt_state, is_leaf=is_spec)
    opt = [_entry(path_name(p), x.shape, x.dtype, s, mesh) for (p, x), s in zip(opt_flat, opt_specs)]
    if master_weights:
        master_specs = jax.tree.leaves(place.master, is_leaf=is_spec)
        opt += [_entry("master/" + path_name(p), b.value.shape, np.float32, s, mesh)
                for (p, b), s in zip(flat, master_specs)]
    totals = memory.state_bytes(run)
    totals["total: params + optimizer + grads (no activations)"] = sum(totals.values())
    notes = [f"ZeRO-1: no dim of {n} divisible by data x fsdp = {sharding.batch_split(mesh)}; its moments stay "
             "replicated" for n in place.replicated_moments]
    report = {"mesh": {a: int(mesh.shape[a]) for a in mesh.axis_names}, "zero_stage": zero_stage,
              "remat": config.model.remat_policy,
              "rows_per_device": config.train.batch_size // micro_batches // sharding.batch_split(mesh),
              "precision": "master_weights" if master_weights else "fp32_params",
              "param_count": sum(math.prod(e["shape"]) for e in params),
              "params": params, "optimizer": opt, "per_device_bytes": totals, "notes": notes}
    stages = sharding.num_stages(mesh)
    if stages > 1:
        layers = next(e["shape"][0] for e in params if e["logical"][0] == "layers")
        report["pipeline"] = {"schedule": "gpipe", "stages": stages, "layers_per_stage": layers // stages,
                              "micro_batches": micro_batches,
                              "bubble_fraction": sharding.bubble_fraction(stages, micro_batches)}
    return report


def add_compiled_memory(report: dict, stats, note: str | None = None, breakdown: dict | None = None) -> dict:
    """Fold XLA's per-device memory analysis of the compiled step (and the temp's breakdown) into the report.

    The compiled temp holds activations, gradients and workspace; the peak estimate is the standard
    arguments + temp + outputs - aliased (the donated state aliases its outputs)."""
    temp = stats.temp_size_in_bytes
    compiled = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                "aliased": stats.alias_size_in_bytes, "temp": temp}
    peak = fit.compiled_peak(stats)
    report["compiled"] = compiled
    report["per_device_bytes"]["temp: activations + grads + workspace (compiled)"] = temp
    report["per_device_bytes"]["total: compiled peak estimate"] = peak
    if breakdown is not None:
        report["temp_breakdown"] = breakdown
    if note:
        report["notes"].append(note)
    return report


# ---- compiled: what is live at the peak ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StepShapes:
    """Per-device sizes that name a buffer by its shape (see `step_shapes`)."""

    rows: int  # sequences per device per micro-batch
    seq_len: int
    hidden: int
    stages: int
    ticks: int  # pipeline ticks (micro-batches + stages - 1); 0 without a pipeline
    layers: int  # layers per stage (all layers without a pipeline)
    heads: int  # attention heads per device
    query_block: int  # queries whose scores exist at once (the chunk of chunked attention, else seq_len)
    vocab: int  # padded vocabulary per device (the head's logits)
    head_rows: int  # tokens whose logits exist at once: rows x seq_len / train.loss_chunks
    param_shapes: frozenset  # per-device param shapes, size-1 dims dropped
    shard_shapes: frozenset  # per-device master / moment shapes


def _squeeze(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def step_shapes(run: RunSetup) -> StepShapes:
    """The sizes `temp_breakdown` uses to recognise buffers, for this run's config and mesh."""
    c, m, mesh, place = run.config, run.config.model, run.mesh, run.placement
    is_boxed = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    boxed = jax.tree.leaves(run.param_shapes, is_leaf=is_boxed)

    def local(specs):
        return frozenset(_squeeze(NamedSharding(mesh, s).shard_shape(b.value.shape))
                         for b, s in zip(boxed, jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))))

    stages = sharding.num_stages(mesh)
    chunk = min(m.attention_chunk, c.train.seq_len) if m.attention_impl == "chunked" else c.train.seq_len
    return StepShapes(rows=c.train.batch_size // c.train.micro_batches // sharding.batch_split(mesh),
                      seq_len=c.train.seq_len, hidden=m.hidden_size, stages=stages,
                      ticks=c.train.micro_batches + stages - 1 if stages > 1 else 0,
                      layers=m.num_layers // stages, heads=m.num_heads // int(mesh.shape["tensor"]),
                      query_block=chunk, vocab=cfg.padded_vocab(m, int(mesh.shape["tensor"])) // int(mesh.shape["tensor"]),
                      head_rows=c.train.batch_size // c.train.micro_batches // sharding.batch_split(mesh)
                      * c.train.seq_len // c.train.loss_chunks,
                      param_shapes=local(place.params), shard_shapes=local(place.master))


_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _dims(text: str) -> tuple[str, tuple]:
    m = _SHAPE.match(text)
    return (m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) if m else ("", ())


def classify(dtype_dims: tuple[str, tuple], opcode: str, s: StepShapes) -> str:
    """The named part a temp buffer of this shape, made by this op, belongs to."""
    _, dims = dtype_dims
    shape = _squeeze(dims)
    tokens = s.rows * s.seq_len
    if any(opcode.startswith(c) for c in _COLLECTIVES):
        return COLLECTIVES
    if s.ticks and shape == _squeeze((s.ticks, s.rows, s.seq_len, s.hidden)):
        return STAGE_INPUTS
    if s.ticks and shape == _squeeze((s.ticks, s.rows, s.seq_len // s.stages, s.hidden)):
        return HEAD_INPUTS
    lead = _squeeze((s.layers, s.rows, s.seq_len))
    if s.layers > 1 and (shape[:len(lead)] == lead or shape[:2] == (s.layers, tokens)):
        return STORED  # one slice per layer: what the remat policy keeps for the backward
    if s.vocab in dims and math.prod(shape) % (s.head_rows * s.vocab) == 0:
        return HEAD
    if len(dims) >= 2 and dims[-1] == s.seq_len and dims[-2] in (s.query_block, s.seq_len) and s.heads in dims:
        return ATTENTION
    if len(dims) >= 2 and dims[-2:] == (s.seq_len, s.query_block) and s.heads in dims:
        return ATTENTION
    if shape in s.param_shapes or tuple(sorted(shape)) in {tuple(sorted(p)) for p in s.param_shapes}:
        return GRADIENTS
    if shape in s.shard_shapes:
        return SHARDS
    if shape and math.prod(shape) % tokens == 0 and math.prod(shape) >= tokens:
        return ACTIVATIONS
    return OTHER


def _read(dump_dir: str, suffix: str) -> str:
    found = sorted(glob.glob(os.path.join(dump_dir, f"*train_step*after_optimizations{suffix}")))
    if not found:
        raise FileNotFoundError(f"no XLA dump '*train_step*after_optimizations{suffix}' in {dump_dir}")
    with open(found[0]) as f:
        return f.read()


def _buffers(assignment: str) -> dict[str, tuple]:
    """value name -> (allocation, offset, size, shape, is_temp) from a buffer-assignment dump."""
    out, alloc, temp = {}, None, False
    for line in assignment.splitlines():
        head = re.match(r"allocation (\d+): size \d+, (.*)", line)
        if head:
            alloc = int(head.group(1))
            temp = not re.match(r"(parameter|output|constant|thread-local)", head.group(2))
            continue
        value = re.match(r"\s*value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)", line)
        if value and alloc is not None:
            out[value.group(1)] = (alloc, int(value.group(3)), int(value.group(2)), value.group(4), temp)
    return out


def temp_breakdown(dump_dir: str, shapes: StepShapes, temp_bytes: int) -> dict | None:
    """Bytes per named part of the temp buffers live at the compiled program's memory peak.

    Reads XLA's dumps of one compile (`compiler_options={"xla_dump_to": dump_dir, "xla_dump_hlo_as_text":
    True}`): the live-range dump names the values live at the peak, the buffer assignment where each lives (values
    sharing a buffer count once; arguments and outputs are not temp) and the HLO which op made it. What the temp
    allocation holds beyond those buffers (alignment, buffers reused at other times) is `UNATTRIBUTED`. None when
    the buffers found live at the dump's peak cover less than half the temp: the TPU compiler assigns memory after
    that dump, so there its peak is elsewhere."""
    live = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)\n\s*Stack trace", _read(dump_dir, "-live-range.txt"), re.S)
    if live is None:
        raise ValueError(f"{dump_dir}: the live-range dump has no peak section")
    buffers = _buffers(_read(dump_dir, "-buffer-assignment.txt"))
    opcodes = dict(re.findall(r"^\s+(?:ROOT )?%(\S+) = \S+ ([\w-]+)\(", _read(dump_dir, ".txt"), re.M))
    parts = collections.Counter()
    seen = set()
    for name in re.findall(r"^\s+(\S+?): \d+ bytes", live.group(1), re.M):
        key = name[:-2] if name.endswith("{}") else name
        if key not in buffers:
            continue
        alloc, offset, size, shape, is_temp = buffers[key]
        if not is_temp or (alloc, offset) in seen:
            continue
        seen.add((alloc, offset))
        parts[classify(_dims(shape), opcodes.get(key.split("{")[0], ""), shapes)] += size
    if sum(parts.values()) < temp_bytes / 2:
        return None  # this compiler's live ranges are not its final memory assignment (seen on TPU)
    parts[UNATTRIBUTED] = temp_bytes - sum(parts.values())
    return {p: int(parts[p]) for p in PARTS if parts[p]}


# ---- one call: report, compile, breakdown, model -------------------------------------------------------------

def inspect(config, devices, platform: str = "cpu", compile: bool = True, compile_layers: int = 0,
            cpu_hoisting: bool = False) -> dict:
    """The layout report of `config` on `devices` (len = the mesh size), with the train step compiled for
    `platform`: XLA's memory analysis, the temp's breakdown and the analytic model. `compile_layers` N compiles
    N and 2N layers (per stage) and extrapolates linearly in the layer count (no breakdown then)."""
    mesh = sharding.make_mesh(cfg.validate(config), devices)
    run = setup.build(config, mesh)
    config = run.config
    report = layout_report(run)
    compiled_config, notes = targets.stand_in(config, platform)
    compiled = run if compiled_config is config else setup.build(compiled_config, mesh)
    if not compile:  # the analytic model needs no compile
        report["model"] = memory.analytic_memory(compiled, platform)
        return report
    options = targets.CPU_AS_ACCELERATOR if platform == "cpu" and not cpu_hoisting else {}
    stages = sharding.num_stages(mesh)
    n = compile_layers
    with targets.compiling_for(platform), tempfile.TemporaryDirectory() as dump:
        if n and 2 * n * stages < config.model.num_layers:
            # Every compiled size is a + b * layers for a scanned stack: fit a, b from two compiles.
            small, double = (train.compile_train_step(setup.build(_with_layers(compiled_config, k * stages), mesh),
                                                      options).memory_analysis() for k in (n, 2 * n))
            extra = config.model.num_layers // stages - n
            fields = _STATS
            stats = types.SimpleNamespace(refused=False, **{
                f: int(getattr(small, f) + (getattr(double, f) - getattr(small, f)) / n * extra) for f in fields})
            notes.append(f"compiled sizes extrapolated linearly from {n}- and {2 * n}-layer(-per-stage) compiles "
                         f"(temp {small.temp_size_in_bytes / 1e9:.3f} / {double.temp_size_in_bytes / 1e9:.3f} GB)")
            breakdown = None
        else:
            options = {**options, "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
                       "xla_dump_hlo_module_re": ".*train_step.*"}
            try:
                executable = train.compile_train_step(compiled, options)
                stats = executable.memory_analysis()
                report["collectives"] = collective_report(executable, compiled, devices, platform)
            except jax.errors.JaxRuntimeError as e:
                stats = _refused(e, report)  # a compiler that checks the device's memory refuses a step too big
            shapes = step_shapes(compiled)
            refused = getattr(stats, "refused", False)
            breakdown = None if refused else temp_breakdown(dump, shapes, stats.temp_size_in_bytes)
            if breakdown is None and not refused:
                notes.append(f"no breakdown of the temp: the {platform.upper()} compiler's live-range dump does not "
                             "show its final memory assignment")
    report = add_compiled_memory(report, stats, breakdown=breakdown)
    report["target"] = platform
    report["attention"] = model_lib.attention_impl_for(compiled_config.model, platform,
                                                       seq_len=compiled_config.train.seq_len)
    report["model"] = memory.analytic_memory(compiled, platform)
    report["notes"] += notes
    if platform == "cpu":
        report["notes"].append("compiled by XLA:CPU" + ("" if cpu_hoisting else " with loop-invariant code motion "
                               "off (see targets.CPU_AS_ACCELERATOR)") + ": an upper bound for a GPU or TPU compile")
    return report


def collective_report(executable, run, devices, platform: str) -> dict:
    """The compiled step's collectives per device per step (`neox_jax.collectives`): bytes inside a slice (ICI)
    and across slices (DCN), by op; the DCN bytes the analytic model expects; the compiler's cost analysis next to
    the model's FLOPs."""
    slices = run.config.mesh.slices
    found = collectives.collectives(executable.as_text(), sharding.mesh_device_slices(run.mesh, devices, slices))
    out = collectives.summary(found)
    out["each"] = [dataclasses.asdict(c) for c in sorted(found, key=lambda c: -c.step_bytes)]
    out["slices"] = slices
    out["dcn_analytic"] = memory.dcn_bytes(run, platform) if slices > 1 else 0
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
    tokens = run.config.train.batch_size * run.config.train.seq_len
    out["cost"] = {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
                   "model_flops": metrics.flops_per_token(run.config.model, run.config.train.seq_len) * tokens
                   / run.mesh.size}
    return out


_STATS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")


def _refused(error, report: dict):
    """Memory stats for a compile the compiler refused for lack of device memory (the TPU compiler does): the
    state as arguments and the temp it asked for, with the compiler's message in the report's notes."""
    message = str(error).splitlines()[0]
    if "RESOURCE_EXHAUSTED" not in message:
        raise error
    asked = re.search(r"HLO temporaries \(([\d.]+)G\)", message)
    state = report["per_device_bytes"]["params"] + report["per_device_bytes"]["optimizer"]
    report["notes"].append(f"the compiler refused this step: {message}")
    report["refused"] = message
    temp = int(float(asked.group(1)) * 2**30) if asked else 0
    return types.SimpleNamespace(refused=True, argument_size_in_bytes=state, output_size_in_bytes=state,
                                 alias_size_in_bytes=state, temp_size_in_bytes=temp)


def _with_layers(config, layers):
    c = config.copy_and_resolve_references()
    c.model.num_layers = layers
    return c


# ---- one row per config: a family's presets on the device counts they were trained on ------------------------

def preset_row(name: str, report: dict, device_bytes: int | None) -> dict:
    """One row of a presets table: the layout, the compiled peak, the model's figure and its error, and whether
    the step fits `device_bytes` per device. Without a compile (--nocompile) only the model's figure is there."""
    pdb, mesh = report["per_device_bytes"], report["mesh"]
    peak, model = pdb.get("total: compiled peak estimate"), report["model"]["peak"]
    return {"config": name, "devices": math.prod(mesh.values()),
            "mesh": " x ".join(f"{a} {n}" for a, n in mesh.items() if n > 1) or "1 device",
            "rows": report["rows_per_device"], "remat": report["remat"], "zero_stage": report["zero_stage"],
            "params": pdb["params"], "optimizer": pdb["optimizer"], "peak": peak, "model": model,
            "error": None if peak is None else model / peak - 1,
            "fits": None if not device_bytes or peak is None else peak <= device_bytes,
            "device_bytes": device_bytes}


def format_preset_rows(rows: list[dict], target: str) -> str:
    columns = (table.Column("config", "config", align="<", width=24), table.Column("devices", "devices"),
               table.Column("mesh", "mesh", align="<", width=18), table.Column("seqs/dev", "rows"),
               table.Column("remat", "remat", align="<", width=13), table.Column("zero", "zero_stage"),
               table.Column("params", "params", gb, width=9), table.Column("optimizer", "optimizer", gb),
               table.Column("compiled peak", "peak", gb),
               table.Column("model (error)", lambda r: gb(r["model"]) + ("" if r["error"] is None else f" ({r['error']:+.0%})"),
                            width=16),
               table.Column("fits?", lambda r: None if r["fits"] is None else ("yes" if r["fits"] else "NO"), width=6))
    return f"per-device memory compiled for {target}\n" + table.render(columns, rows)


# ---- text -------------------------------------------------------------------------------------------------

def _layout_name(r: dict) -> str:
    return ",".join(f"{a}={n}" for a, n in r["mesh"].items()) + f" zero{r['zero_stage']} {r['precision']}"


def gb(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.2f} MB"


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


_PARAM_COLUMNS = (
    table.Column("parameter", "name", align="<", width=44),
    table.Column("logical axes", "logical", ",".join, align="<", width=34),
    table.Column("spec", "spec", align="<", width=36),
    table.Column("global shape", lambda e: str(tuple(e["shape"])), align="<", width=22),
    table.Column("per-device shape", lambda e: str(tuple(e["local_shape"])), align="<", width=22),
    table.Column("global", "bytes", gb, width=12), table.Column("per device", "local_bytes", gb, width=12))
_ARROW = table.Column("", lambda e: "->", align="<")
_CHANGED_COLUMNS = (  # what a parameter's spec and per-device bytes were -> are
    table.Column("parameter", "name", align="<", width=44),
    table.Column("spec", lambda e: e["spec"][0], align="<", width=34), _ARROW,
    table.Column("", lambda e: e["spec"][1], align="<", width=34),
    table.Column("per device", lambda e: e["local_bytes"][0], gb, width=12), _ARROW,
    table.Column("", lambda e: e["local_bytes"][1], gb, width=12))


def _memory_sections(report: dict) -> list[tuple[str, list]]:
    """The report's memory tables: (title, [(label, bytes), ...]) each."""
    part = lambda k: "  " + memory.label(k, report["remat"])  # noqa: E731
    sections = [("per-device memory", list(report["per_device_bytes"].items()))]
    if "temp_breakdown" in report:
        sections.append(("compiled temp at its peak, by part",
                         [(part(k), v) for k, v in report["temp_breakdown"].items()]))
    if "model" in report:
        sections.append(("analytic model (neox_jax.memory.analytic_memory)",
                         [*((part(k), v) for k, v in report["model"]["parts"].items()),
                          ("model peak (state + the parts above)", report["model"]["peak"])]))
    return sections


def format_report(report: dict) -> str:
    """Human-readable tables: params (logical axes, spec, global / per-device shape and bytes), memory."""
    lines = [f"layout {_layout_name(report)}  ({report['param_count']:,} params, {report['precision']})", "",
             table.render(_PARAM_COLUMNS, report["params"])]
    opt_sharded = sum(1 for e in report["optimizer"] if e["local_bytes"] < e["bytes"])
    lines += ["", f"optimizer state: {len(report['optimizer'])} arrays, {opt_sharded} split across devices"]
    sections = _memory_sections(report)
    width = max(50, *(len(text) for title, rows in sections for text in [title, *(label for label, _ in rows)]))
    for title, rows in sections:  # one width for all, so that they line up
        lines += ["", table.render([table.Column(title, 0, align="<", width=width), table.Column("", 1, gb, width=12)],
                                   rows)]
    if "pipeline" in report:
        p = report["pipeline"]
        lines += ["", f"pipeline ({p['schedule']}): {p['stages']} stages x {p['layers_per_stage']} layers"
                  + (f", {p['micro_batches']} micro-batches, bubble {p['bubble_fraction']:.1%} of the step"
                     if "micro_batches" in p else "")]
    if "collectives" in report:
        lines += ["", *format_collectives(report["collectives"])]
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


TOP_COLLECTIVES = 10


def format_collectives(c: dict) -> list[str]:
    """The collectives section: bytes per device per step inside a slice (ICI) and across slices (DCN), by op."""
    lines = [f"collectives per device per step: ICI {c['ici'] / 1e9:.3f} GB, DCN {c['dcn'] / 1e9:.3f} GB"
             + (f" (analytic, the gradient reduction across {c['slices']} slices: {c['dcn_analytic'] / 1e9:.3f} GB)"
                if c["slices"] > 1 else "")]
    rows = [(op, v["calls"], v["bytes"]) for op, v in c["by_op"].items()]
    lines.append(table.render([table.Column("op", 0, align="<", width=26), table.Column("calls", 1, width=8),
                               table.Column("GB", 2, lambda b: f"{b / 1e9:.3f}", width=10)], rows))
    largest = c["each"][:TOP_COLLECTIVES]
    if largest:
        lines.append(f"the {len(largest)} largest of {len(c['each'])} (--format json lists every one):")
        rows = [(e["name"], e["op"], "dcn" if e["dcn"] else "ici", e["group"] or "-", e["count"],
                 e["bytes"] * e["count"]) for e in largest]
        lines.append(table.render([table.Column("collective", 0, align="<", width=30),
                                   table.Column("op", 1, align="<", width=20), table.Column("link", 2, width=6),
                                   table.Column("group", 3, width=7), table.Column("calls", 4, width=7),
                                   table.Column("MB", 5, lambda b: f"{b / 1e6:,.3f}", width=12)], rows))
    cost = c["cost"]
    lines.append(f"compiler cost analysis per device: {cost['flops'] / 1e12:.3f} TFLOP, "
                 f"{cost['bytes_accessed'] / 1e9:.3f} GB accessed; model FLOPs (6N + 12LHS per token): "
                 f"{cost['model_flops'] / 1e12:.3f} TFLOP")
    return lines


def format_comparison(cmp: dict) -> str:
    a, b = cmp["layouts"]
    lines = [f"{a}  ->  {b}", ""]
    if cmp["params_changed"]:
        lines.append(table.render(_CHANGED_COLUMNS, cmp["params_changed"]))
    lines.append(f"optimizer arrays with a different spec: {cmp['optimizer_arrays_changed']}")
    columns = [table.Column("per device", 0, align="<", width=50), table.Column(a, lambda r: r[1][0], gb, width=30),
               table.Column(b, lambda r: r[1][1], gb, width=30)]
    lines += ["", table.render(columns, cmp["per_device_bytes"].items())]
    return "\n".join(lines)


# ---- picture ------------------------------------------------------------------------------------------------

def plot_memory(reports: list[dict], path: str, device_bytes: float | None = None) -> str:
    """Stacked bars of per-device memory, one per layout: state (params, optimizer) then the compiled temp by
    part; a dashed line at the device's memory. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [" ".join(f"{a}{n}" for a, n in r["mesh"].items() if n > 1) + f"\nzero{r['zero_stage']}\n{r['precision']}"
             for r in reports]
    segments = [("params", lambda r: r["per_device_bytes"]["params"]),
                ("optimizer state", lambda r: r["per_device_bytes"]["optimizer"])]
    parts = [p for p in PARTS if any(p in r.get("temp_breakdown", {}) for r in reports)]
    segments += [(p, lambda r, p=p: r.get("temp_breakdown", {}).get(p, 0)) for p in parts]
    if not parts:
        segments.append(("compiled temp", lambda r: r["per_device_bytes"].get(
            "temp: activations + grads + workspace (compiled)", 0)))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(reports) + 3), 5.5))
    bottom = np.zeros(len(reports))
    colors = plt.get_cmap("tab20").colors
    for i, (label, value) in enumerate(segments):
        heights = np.array([max(value(r), 0) / 1e9 for r in reports])
        ax.bar(names, heights, bottom=bottom, label=label, color=colors[i % len(colors)], width=0.6)
        bottom += heights
    for x, r in enumerate(reports):
        peak = r["per_device_bytes"].get("total: compiled peak estimate")
        if peak:
            ax.annotate(f"{peak / 1e9:.1f} GB", (x, bottom[x]), ha="center", va="bottom", fontsize=9)
    if device_bytes:
        ax.axhline(device_bytes / 1e9, color="black", linestyle="--", linewidth=1)
        ax.annotate(f"device memory {device_bytes / 1e9:.0f} GB", (-0.45, device_bytes / 1e9), ha="left",
                    va="bottom", fontsize=9)
    ax.set_ylabel("GB per device")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
