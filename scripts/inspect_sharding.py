"""Show how a config lays out on a mesh: per-parameter sharding and per-device memory, without weights.

    python scripts/inspect_sharding.py --config configs/neox_20b.py --mesh stage=4,tensor=2,data=12 --plot m.png
    python scripts/inspect_sharding.py --config configs/pythia.py:410m --mesh data=4,tensor=2 --zero_stage 1 \\
        --compare fsdp=8,zero_stage=3 --format json
    python scripts/inspect_sharding.py --config configs/neox_20b.py --mesh stage=4,tensor=2,data=12 \\
        --compare precision=fp32_params --target gpu:a100-40gb:96
    python scripts/inspect_sharding.py --config configs/neox_20b.py --mesh data=8,tensor=8 --target tpu:v5p:4x4x4

The train step is compiled ahead of time from shapes only, for `--target` (default: simulated CPU devices, one
per mesh position; `tpu:VERSION:TOPOLOGY` and `gpu:KIND:COUNT` compile with the TPU or CUDA compiler on a host
without either, see neox_jax/targets.py). The report gives every parameter's logical axes, spec and per-device
bytes, the state per device, XLA's memory analysis, the compiled temp split into named parts (what is live at the
step's memory peak, from XLA's own buffer assignment), the analytic model's figures, and the step's collectives
(inside a slice or across slices, `--slices N`) with the compiler's cost analysis. `--compare` (repeatable) adds
layouts: mesh axes, zero_stage, precision (fp32_params / master_weights) and attention (model.attention_impl).
`--plot FILE.png` draws the per-device breakdown of every layout as stacked bars with the device's memory as a
line. The logic lives in neox_jax/layout.py.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import errors  # noqa: E402  (these two import no JAX: flags are set below first)
from neox_jax.config import ATTENTION_IMPLS, MESH_AXES, PRECISION_MODES  # noqa: E402


def parse_layout(spec: str) -> dict:
    """"stage=4,data=12,tensor=2[,zero_stage=1][,precision=master_weights][,attention=splash]" -> a dict of those
    fields."""
    out = {}
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if (key, value) in [("precision", p) for p in PRECISION_MODES] + [("attention", a) for a in ATTENTION_IMPLS]:
            out[key] = value
            continue
        if key not in (*MESH_AXES, "zero_stage") or not value.isdigit() or int(value) < (key != "zero_stage"):
            errors.fatal(f"inspect_sharding: bad layout {spec!r}: expected comma-separated {'/'.join(MESH_AXES)}"
                         f"/zero_stage=N with positive sizes, precision={'|'.join(PRECISION_MODES)} and "
                         f"attention={'|'.join(ATTENTION_IMPLS)}, e.g. data=12,tensor=2")
        out[key] = int(value)
    return out


def _flag_values(argv, name):
    out = []
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif arg.startswith(f"--{name}="):
            out.append(arg.split("=", 1)[1])
    return out


def _devices_needed(argv) -> int:
    if _flag_values(argv, "presets"):
        return 256  # the largest family member's device count (pythia-12b)
    sizes = [parse_layout(v) for f in ("mesh", "compare") for v in _flag_values(argv, f)] or [{}]
    return max(math.prod(s.get(a, 1) for a in MESH_AXES) for s in sizes)


if __name__ == "__main__":
    from neox_jax import targets

    try:
        _SPEC = (_flag_values(sys.argv, "target") or ["cpu"])[-1]
        if _flag_values(sys.argv, "presets") and _SPEC.count(":") == 1:
            _SPEC += ":8"  # the GPU kind alone: each preset brings its count
        _TARGET = targets.parse(_SPEC)
    except targets.TargetError as e:
        errors.fatal(f"inspect_sharding: {e}")
    # Simulated devices and plugin settings must be in place before jax is imported.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_devices_needed(sys.argv)}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    targets.prepare_environment(_TARGET)

import json  # noqa: E402

from neox_jax import cli  # noqa: E402
from neox_jax import config as cfg  # noqa: E402

DEFAULT_CONFIG = "configs/tiny.py"


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("--config", default=DEFAULT_CONFIG, help=cli.CONFIG_HELP)
    p.add_argument("--mesh", help="layout, e.g. data=12,tensor=2 (axes stage/data/fsdp/context/tensor, default 1)")
    p.add_argument("--zero_stage", type=int, help="ZeRO stage 0/1/3 (default: the config's)")
    p.add_argument("--remat", help="model.remat_policy (none/full/dots/...)")
    p.add_argument("--batch_size", type=int, help="train.batch_size (global)")
    p.add_argument("--micro_batches", type=int, help="train.micro_batches")
    p.add_argument("--compare", action="append", default=[], help="another layout to compare (repeatable), e.g. "
                   "data=48,tensor=2,zero_stage=1, precision=fp32_params or attention=xla; unnamed fields carry over from "
                   "--mesh")
    p.add_argument("--target", default="cpu", help="compile for: cpu | tpu:VERSION:TOPOLOGY | gpu:KIND:COUNT")
    p.add_argument("--slices", type=int, help="TPU slices the mesh spans (config mesh.slices; mesh.slice_axis, data "
                   "by default, crosses them over DCN); --target names one slice's topology")
    p.add_argument("--format", default="text", choices=["text", "json"], help="output format")
    p.add_argument("--plot", help="write the per-device memory of every layout as stacked bars (PNG)")
    cli.add_overwrite(p, "--plot")
    p.add_argument("--device_memory", type=float, help="device memory line on the plot, GB (default: the target's)")
    p.add_argument("--compile", action=cli.Switch, default=True,
                   help="AOT-compile the train step for the activation/temp estimate")
    p.add_argument("--compile_layers", type=int, default=0,
                   help="0: compile all layers; N: compile N and 2N layers and extrapolate linearly")
    p.add_argument("--presets", help="a config file whose every preset (e.g. configs/pythia.py: each size) is "
                   "compiled on the device count it was trained on (the file's devices(arg)); one table row each; "
                   "--target's GPU kind is kept, its count replaced")
    p.add_argument("--cpu_hoisting", action=cli.Switch, default=False, help="on CPU, keep XLA:CPU's hoisting of "
                   "fp32 copies of 16-bit loop operands (off by default: GPU/TPU compilers do not make them)")
    return cli.parse_args_with_config(p, argv)


def layout_config(base, layout: dict):
    c = base.copy_and_resolve_references()
    for axis in MESH_AXES:
        c.mesh[axis] = layout.get(axis, 1)
    if "zero_stage" in layout:
        c.zero_stage = layout["zero_stage"]
    if "precision" in layout:
        c.precision.mode = layout["precision"]
    if "attention" in layout:
        c.model.attention_impl = layout["attention"]
    return c


def compared(first: dict, spec: str) -> dict:
    """A --compare layout: its mesh axes, if it names any, replace --mesh's whole; zero_stage, precision and
    attention carry over from --mesh unless it names them."""
    other = parse_layout(spec)
    base = {k: v for k, v in first.items() if k not in MESH_AXES} if any(a in other for a in MESH_AXES) else first
    return {**base, **other}


@errors.guarded
def main(argv=None):
    args = parse(argv)
    cli.check_writable(args.plot, "--plot", args.overwrite)  # before the compiles
    config = cfg.from_spec(args.config, args.overrides, "--config")
    from neox_jax import layout, targets

    if args.presets:
        return presets_table(args)
    if not args.mesh:
        raise errors.InputError("--mesh is required, e.g. --mesh data=12,tensor=2")

    config = config.copy_and_resolve_references()
    for field, value in (("model.remat_policy", args.remat), ("train.batch_size", args.batch_size),
                         ("train.micro_batches", args.micro_batches)):
        if value is not None:
            section, name = field.split(".")
            config[section][name] = value
    if args.slices is not None:
        config.mesh.slices = args.slices
    first = parse_layout(args.mesh)
    if args.zero_stage is not None:
        first.setdefault("zero_stage", args.zero_stage)
    layouts = [first] + [compared(first, spec) for spec in args.compare]
    target = targets.parse(args.target)
    reports = []
    for spec in layouts:
        c = layout_config(config, spec)
        count = math.prod(c.mesh[a] for a in MESH_AXES)
        devices = _devices(target, count, "config field mesh: the layout uses", c.mesh.slices)
        print(f"compiling the train step of layout {len(reports) + 1}/{len(layouts)} for {target.spec} "
              f"({count} devices)...", file=sys.stderr, flush=True)
        reports.append(layout.inspect(c, devices, target.platform, args.compile, args.compile_layers,
                                      args.cpu_hoisting))
    if args.plot:
        device = args.device_memory * 1e9 if args.device_memory else target.device_bytes
        print(f"plot: {layout.plot_memory(reports, args.plot, device)}", file=sys.stderr)
    if args.format == "json":
        out = {"layout": reports[0]}
        if len(reports) > 1:
            out["compare"] = [{"layout": r, "diff": layout.compare_reports(reports[0], r)} for r in reports[1:]]
        print(json.dumps(out, indent=1))
        return
    print(layout.format_report(reports[0]))
    for other in reports[1:]:
        print()
        print(layout.format_comparison(layout.compare_reports(reports[0], other)))


def _devices(target, count: int, needs: str, slices: int = 1):
    """`count` devices of --target (`slices` slices of it); one ConfigError when it has fewer (simulated CPUs are set
    before JAX starts, so a caller in a running process may have fewer) or, sized, another number. `needs` says what
    asks for them."""
    from neox_jax import targets

    devices = targets.devices(target, slices)
    if len(devices) < count or (target.device_count and len(devices) != count):
        where = f"{slices} slices of " if slices > 1 else ""
        raise cfg.ConfigError(f"{needs} {count} devices but {where}--target {target.spec} has {len(devices)}")
    return devices[:count]


def presets_table(args) -> None:
    """Every preset of the config file --presets compiled for --target on the device count it was trained on."""
    from neox_jax import layout, targets

    path = args.presets
    module = cfg.import_file(path, "_neox_presets_")
    if not hasattr(module, "devices"):
        raise errors.InputError(f"--presets {path}: defines no devices(arg) (the device count each preset was "
                                "trained on), as configs/pythia.py and configs/neox_20b.py do")
    kind = ":".join(args.target.split(":")[:2]) if args.target.startswith("gpu:") else args.target
    rows, reports = [], []
    for arg in getattr(module, "SIZES", [None]):
        spec = f"{path}:{arg}" if arg else path
        count = module.devices(arg)
        target = targets.parse(f"{kind}:{count}" if kind.startswith("gpu:") else kind)
        doing = "compiling" if args.compile else "laying out"
        print(f"{doing} {spec} for {target.spec} ({count} devices)...", file=sys.stderr, flush=True)
        devices = _devices(target, count, f"--presets {spec}: trained on")
        report = layout.inspect(cfg.from_spec(spec, args.overrides, "--config"), devices,
                                target.platform, args.compile, args.compile_layers, args.cpu_hoisting)
        device = args.device_memory * 1e9 if args.device_memory else target.device_bytes
        rows.append(layout.preset_row(os.path.basename(spec), report, device))
        reports.append(report)
    if args.format == "json":
        print(json.dumps(rows, indent=1))
    else:
        print(layout.format_preset_rows(rows, args.target))
    if args.plot:
        print(f"plot: {layout.plot_memory(reports, args.plot, rows[0]['device_bytes'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
