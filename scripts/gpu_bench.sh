#!/usr/bin/env bash
# Every GPU check in one run (device time is scarce): versions, device ceilings, cuDNN-vs-XLA attention parity,
# generation against HF generate and the bandwidth roofline, and the train step against HF torch (eager and
# torch.compile, each in its own process) on the pythia-1.4b / 410m anchor shapes.
# Usage: scripts/gpu_bench.sh OUT_DIR [PARTS]   PARTS: comma-separated of parity,decode,1.4b,410m,energy,precision
#   (default decode,1.4b,410m: about 11 minutes on an H200; "decode,1.4b" then "410m" keeps each call under 6)
#   energy: tracking overhead and NVML joules per token on the 410m and 1.4b shapes (needs codecarbon)
set -u
OUT=${1:-gpu_results}
PARTS=",${2:-decode,1.4b,410m},"
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1   # JAX and torch processes share the GPU
PY=${PYTHON:-python3}
if [[ $PARTS == *,parity,* ]]; then
$PY - <<'PYEOF' 2>&1 | tee "$OUT/parity.txt"
import jax, numpy as np, torch, transformers
from neox_jax import config as cfg, model
print("jax", jax.__version__, "torch", torch.__version__, "transformers", transformers.__version__, jax.devices())
m = cfg.model_defaults()
m.update(dict(vocab_size=1024, padded_vocab_size=1024, hidden_size=512, num_layers=2, num_heads=8, dtype="bfloat16"))
p = model.init_params(m, jax.random.PRNGKey(0))
ids = jax.random.randint(jax.random.PRNGKey(1), (4, 2048), 0, 1024)
out = {}
for impl in ("cudnn", "xla"):
    m.attention_impl = impl
    out[impl] = np.asarray(jax.jit(lambda p, i: model.GPTNeoX(m).apply({"params": p}, i))(p, ids), np.float32)
print("cudnn vs xla attention, bf16 logits: max abs diff %.4f (logit scale %.2f)"
      % (np.abs(out["cudnn"] - out["xla"]).max(), np.abs(out["xla"]).max()))
PYEOF
fi
# decode: the layer scan vs per-layer weight buffers (the Generator's default), batch 1 and 32, vs HF generate
if [[ $PARTS == *,decode,* ]]; then
timeout 150 $PY scripts/benchmark.py generate --config configs/pythia.py:1.4b --batches 1,32 \
  --layer-loops scan,unstacked --compare-hf --overwrite --json "$OUT/generate.json" 2>&1 | grep -v -i warn | tee "$OUT/generate.txt"
fi
# train: HF eager and torch.compile, then neox_jax as configured and with the sliced head + loss
for size in 1.4b 410m; do
  [[ $PARTS == *,$size,* ]] || continue
  timeout 240 $PY scripts/benchmark.py train --preset gpu-$size --steps 8 --compare-hf --torch-compile \
    --variant train.loss_chunks=8 --profile /tmp/neox_trace --top 30 --overwrite --json "$OUT/train-gpu-$size.json" 2>&1 \
    | grep -v -i warn | tee "$OUT/train-gpu-$size.txt"   # the kernel table is in the .txt; raw traces stay behind
done
# precision: pythia-1.4b batch 8 with fp32 params and with master weights, each in its own process (peak memory is
# per process), for the README's mixed-precision table
if [[ $PARTS == *,precision,* ]]; then
  for mode in fp32_params master_weights; do
    timeout 150 $PY scripts/benchmark.py train --preset gpu-1.4b --steps 8 --config.precision.mode=$mode \
      --overwrite --json "$OUT/precision-$mode.json" 2>&1 | grep -v -i warn | tee "$OUT/precision-$mode.txt"
  done
fi
# energy: tracking on/off interleaved and NVML joules per token (log line every 10 steps, as a real run's would be)
if [[ $PARTS == *,energy,* ]]; then
for size in 410m 1.4b; do
  timeout 200 $PY scripts/benchmark.py energy --preset gpu-$size --config.train.log_every=10 --steps 20 --pairs 3 \
    --overwrite --json "$OUT/energy-gpu-$size.json" 2>&1 | grep -v -i warn | tee "$OUT/energy-gpu-$size.txt"
done
fi
