#!/usr/bin/env python
"""What a run costs before it runs: tokens/step, steps, FLOPs, wall time, device-hours, energy and CO2e
(the model is in neox_jax/plan.py).

    python scripts/plan_run.py --config configs/neox_20b.py --device A100 --devices 96 --tflops 117
    python scripts/plan_run.py --config configs/pythia.py:410m --device H100 --devices 8 --mfu 0.45
    python scripts/plan_run.py --sweep configs/sweeps/lr.py --device H100 --devices 64 --benchmark bench.json
    python scripts/plan_run.py --config configs/pythia.py:1b --config.train.steps=10000 --device H200 --devices 8 \\
        --mfu 0.5 --utilisation 0.8 --pue 1.2 --carbon_intensity 200 --json plan.json

Exit status: 0 ok, 2 bad flag, config or sweep file.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from neox_jax import cli, errors  # noqa: E402
from neox_jax import config as cfg  # noqa: E402
from neox_jax import plan as P  # noqa: E402


def parse(argv):
    p = cli.Parser(description=__doc__)
    p.add_argument("--config", help="config spec, e.g. configs/pythia.py:410m; --config.FIELD=VALUE overrides a "
                   "field (of every run with --sweep), repeatable")
    p.add_argument("--sweep", help="sweep file: one row per run")
    p.add_argument("--device", required=True, help="device kind, e.g. A100, H100, H200, 'TPU v5p'")
    p.add_argument("--devices", type=int, required=True, help="number of devices")
    rate = p.add_mutually_exclusive_group(required=True)
    rate.add_argument("--mfu", type=float, help="model FLOPs utilisation in (0, 1]")
    rate.add_argument("--tflops", type=float, help="achieved model TFLOP/s per device (MFU = this / peak)")
    rate.add_argument("--benchmark", metavar="JSON", help="MFU of the first neox_jax row of benchmark.py train --json")
    p.add_argument("--steps", type=int, help="train.steps (default: the config's)")
    p.add_argument("--peak_tflops", type=float, help="peak TFLOP/s per device (default: the datasheet table)")
    p.add_argument("--watts", type=float, help="rated power per device (default: the table in neox_jax/energy.py)")
    p.add_argument("--utilisation", type=float, default=1.0, help="share of rated power drawn on average")
    p.add_argument("--pue", type=float, help="data-centre PUE (default: the config's energy.pue)")
    p.add_argument("--carbon_intensity", type=float, help="g CO2e/kWh (default: from the config's energy.* fields)")
    p.add_argument("--json", help="also write the rows here")
    cli.add_overwrite(p, "--json")
    args = cli.parse_args_with_config(p, sys.argv[1:] if argv is None else argv)
    if args.sweep and args.config:
        p.error("give --config or --sweep, not both (--config.FIELD=VALUE overrides apply to every run of a sweep)")
    if not args.sweep and not args.config:
        p.error("give --config SPEC or --sweep FILE")
    return args


@errors.guarded
def main(argv=None) -> int:
    args = parse(argv)
    cli.check_writable(args.json, "--json", args.overwrite)
    mfu, source = (P.mfu_from_benchmark(args.benchmark) if args.benchmark else (args.mfu, None))
    kwargs = dict(mfu=mfu, tflops=args.tflops, peak_tflops=args.peak_tflops, watts=args.watts,
                  utilisation=args.utilisation, pue=args.pue, carbon_intensity=args.carbon_intensity,
                  steps=args.steps)
    overrides = args.overrides
    if args.sweep:
        plans = P.estimate_sweep(args.sweep, args.device, args.devices, overrides, **kwargs)
    else:
        config = cfg.from_spec(args.config, overrides, "--config")
        plans = [P.estimate(config, args.device, args.devices, name=args.config, **kwargs)]
    if source:
        print(f"MFU {mfu:.1%} from {args.benchmark} ({source})")
    print(P.format_table(plans))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(P.as_dicts(plans), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
