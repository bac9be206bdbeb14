#!/usr/bin/env bash
# The README's TPU table ("TPU pods"), compiled by libtpu's compiler on this host (no TPU): pythia-1.4b and 6.9b at
# seq 2,048 / 8,192 / 32,768 with splash attention, XLA attention and splash with a context axis on a v5p slice of 8
# chips, and GPT-NeoX-20B on a v5p slice of 64 chips and on 2 x v5e-256 over DCN. Needs .venv-tpu (`make venv-tpu`);
# 16 minutes on 2 cores.
# Usage: scripts/tpu_figures.sh OUT_DIR   (one .json per command, then the markdown table on stdout and in table.md)
set -eu
OUT=${1:-tpu_results}
mkdir -p "$OUT"
PY=${PYTHON:-.venv-tpu/bin/python}
INSPECT="$PY scripts/inspect_sharding.py --format json"

for size in 1.4b 6.9b; do
  for seq in 2048 8192 32768; do
    # 8 sequences, one per chip; ZeRO-3 over the slice; the context rows split each sequence over 2 chips
    [ -s "$OUT/pythia-$size-$seq.json" ] || $INSPECT --config configs/pythia.py:$size --target tpu:v5p:2x2x2 \
      --mesh fsdp=8,tensor=1,zero_stage=3,attention=splash --compare attention=xla --compare fsdp=4,context=2 \
      --batch_size 8 --micro_batches 1 --config.train.seq_len=$seq --config.model.max_position_embeddings=$seq \
      > "$OUT/pythia-$size-$seq.json"
  done
done
# GPT-NeoX-20B on a v5p slice of 64 chips: splash against XLA attention at ZeRO-3, and ZeRO-1 with splash
[ -s "$OUT/neox-20b-v5p.json" ] || $INSPECT --config configs/neox_20b.py --target tpu:v5p:4x4x4 \
  --mesh fsdp=32,tensor=2,zero_stage=3,attention=splash --micro_batches 16 --compare attention=xla \
  --compare data=32,tensor=2,zero_stage=1 > "$OUT/neox-20b-v5p.json"
for micro in 6 1; do
  [ -s "$OUT/neox-20b-2xv5e-M$micro.json" ] || $INSPECT --config configs/neox_20b.py --target tpu:v5e:16x16 \
    --slices 2 --mesh data=2,fsdp=128,tensor=2,zero_stage=3 --micro_batches $micro > "$OUT/neox-20b-2xv5e-M$micro.json"
done

$PY - "$OUT" <<'EOF' | tee "$OUT/table.md"
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
print("| model, seq | layout (8 x v5p, 95 GiB) | attention | state | compiled temp | compiled peak | fits? "
      "| compiler TFLOP / GB accessed | model TFLOP |")
print("|---|---|---|---|---|---|---|---|---|")
for size in ("1.4b", "6.9b"):
    for seq in (2048, 8192, 32768):
        result = json.loads((out / f"pythia-{size}-{seq}.json").read_text())
        rows = [result["layout"]] + [c["layout"] for c in result["compare"]]
        # the model's FLOPs per chip are the layout's own; a refused compile has no cost analysis to carry them
        model = next(r["collectives"]["cost"]["model_flops"] for r in rows if "collectives" in r)
        for r in rows:
            b, mesh = r["per_device_bytes"], r["mesh"]
            layout = " x ".join(f"{a} {n}" for a, n in mesh.items() if n > 1)
            cost = r.get("collectives", {}).get("cost")
            flops = f"{cost['flops'] / 1e12:.1f} / {cost['bytes_accessed'] / 1e9:.0f}" if cost else "-"
            fits = "**no**: compiler refused" if "refused" in r else "yes"
            print(f"| pythia-{size}, {seq:,} | {layout} | {r['attention']} | {gib(b['params'] + b['optimizer'])} "
                  f"| {gib(b['temp: activations + grads + workspace (compiled)'])} "
                  f"| **{gib(b['total: compiled peak estimate'])}** | {fits} | {flops} | {model / 1e12:.0f} |")
print()
print("| GPT-NeoX-20B on v5p:4x4x4, 64 chips (95 GiB), M = 16 | attention | state | compiled temp | compiled peak "
      "| fits? |")
print("|---|---|---|---|---|---|")
result = json.loads((out / "neox-20b-v5p.json").read_text())
for r in [result["layout"]] + [c["layout"] for c in result["compare"]]:
    b = r["per_device_bytes"]
    layout = " x ".join(f"{a} {n}" for a, n in r["mesh"].items() if n > 1) + f", ZeRO-{r['zero_stage']}"
    fits = "**no**: compiler refused" if "refused" in r else "yes"
    print(f"| {layout} | {r['attention']} | {gib(b['params'] + b['optimizer'])} "
          f"| {gib(b['temp: activations + grads + workspace (compiled)'])} "
          f"| **{gib(b['total: compiled peak estimate'])}** | {fits} |")
print()
print("| GPT-NeoX-20B on 2 x v5e-256 (16 GiB) | state | compiled peak | fits? | DCN GB per step (measured) "
      "| DCN GB (analytic) | ICI GB |")
print("|---|---|---|---|---|---|---|")
for micro in (6, 1):
    r = json.loads((out / f"neox-20b-2xv5e-M{micro}.json").read_text())["layout"]
    b, c = r["per_device_bytes"], r["collectives"]
    fits = "**no**" if b["total: compiled peak estimate"] > 16 * 2**30 or "refused" in r else "yes"
    print(f"| data 2 (across slices) x fsdp 128 x tensor 2, ZeRO-3, M = {micro} | {gib(b['params'] + b['optimizer'])} "
          f"| **{gib(b['total: compiled peak estimate'])}** | {fits} | {c['dcn'] / 1e9:.3f} "
          f"| {c['dcn_analytic'] / 1e9:.3f} ({(c['dcn_analytic'] / c['dcn'] - 1) * 100:+.0f}%) | {c['ici'] / 1e9:.0f} |")
EOF
