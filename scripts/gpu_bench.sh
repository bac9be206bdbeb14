#!/usr/bin/env bash
# Every GPU check in one run (device time is scarce): versions, device ceilings, cuDNN-vs-XLA attention parity,
# the train step against HF torch (eager and torch.compile) on the pythia-410m / 1.4b anchor shapes, and
# generation against HF generate and the bandwidth roofline. Usage: scripts/gpu_bench.sh OUT_DIR
set -u
OUT=${1:-gpu_results}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1   # JAX and torch share the GPU in one process
PY=${PYTHON:-python3}
$PY - <<'PYEOF' 2>&1 | tee "$OUT/parity.txt"
import jax, jax.numpy as jnp, numpy as np, torch, transformers
from neox_jax import config as cfg, model
print("jax", jax.__version__, "torch", torch.__version__, "transformers", transformers.__version__, jax.devices())
m = cfg.model_defaults()
m.update(dict(vocab_size=1024, padded_vocab_size=1024, hidden_size=512, num_layers=2, num_heads=8, dtype="bfloat16"))
p = model.init_params(m, jax.random.PRNGKey(0))
ids = jax.random.randint(jax.random.PRNGKey(1), (4, 2048), 0, 1024)
out = {}
for impl in ("cudnn", "xla"):
    m.attention_impl = impl
    f = jax.jit(lambda p, i: model.GPTNeoX(m).apply({"params": p}, i))
    out[impl] = np.asarray(f(p, ids), np.float32)
print("cudnn vs xla attention, bf16 logits: max abs diff %.4f (logit scale %.2f)"
      % (np.abs(out["cudnn"] - out["xla"]).max(), np.abs(out["xla"]).max()))
from neox_jax.bench import device
print("bf16 matmul TFLOP/s %.0f, copy bandwidth GB/s %.0f" % (device.matmul_tflops(), device.memory_bandwidth_gbs()))
PYEOF
timeout 420 $PY scripts/benchmark.py train --preset gpu-anchor --compare-hf --torch-compile --json "$OUT/train.json" \
  2>&1 | grep -v Warning | tee "$OUT/train.txt"
timeout 150 $PY scripts/benchmark.py generate --config configs/pythia.py:1.4b --batches 1,32 --compare-hf \
  --json "$OUT/generate.json" 2>&1 | grep -v Warning | tee "$OUT/generate.txt"
