#!/usr/bin/env bash
# Every CPU figure the README's tables quote, in one run on one machine, with the machine and its load beside them.
# Usage: scripts/cpu_figures.sh OUT_DIR [PARTS]
#   PARTS: comma-separated of train,decode,pipeline,data,eval (default: all five, ~35 minutes on 2 idle cores;
#   data's index build needs ~4 GB of RAM and disk), plus the optional trainrun (scripts/train.py on its defaults:
#   the train section's wall time and loss curve) and energy (the energy section's A/B, ~15 minutes).
#   train:    benchmark.py train --compare-hf, presets cpu-small (+ the train.loss_chunks=4 row) and cpu-tiny, twice
#   decode:   benchmark.py generate, pythia-160m fp32, batch 1 and 8, layer scan vs per-layer weights vs HF, twice
#   pipeline: benchmark.py train on 2 simulated devices, stage 1 (data 2) and stage 2, cpu-small and tiny
#   data:     benchmark.py data (loader, preprocessing of the bundled sample, gpt_neox index), and preprocessing of
#             the sample x 4
#   eval:     benchmark.py eval (neox_jax vs lm-eval's hf backend, pythia-70m shape, the tasks and limits)
# OUT_DIR gets one .txt (the printed table) and one .json per command (replaced on a rerun), machine.txt and load.txt
# (uptime every 30 s).
set -u
OUT=${1:-cpu_results}
PARTS=",${2:-train,decode,pipeline,data,eval},"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-.venv/bin/python}
BENCH="$PY scripts/benchmark.py"

{
  lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket)"
  free -g | head -2
  $PY -c "import jax, jaxlib, torch, transformers, lm_eval; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__)"
  git log -1 --format="commit %H %s" 2>/dev/null
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
(while true; do echo "$(date +%T) $(uptime)"; sleep 30; done) >> "$OUT/load.txt" &
LOAD_PID=$!
trap 'kill $LOAD_PID 2>/dev/null' EXIT

run() {  # run NAME COMMAND...: the command's output to NAME.txt (warnings dropped), its load before and after
  local name=$1
  shift
  echo "== $name: $* (load before: $(cut -d' ' -f1-3 /proc/loadavg))" | tee "$OUT/$name.txt"
  "$@" 2>&1 | grep --line-buffered -v -i -E "warn|^row |it/s\]|Running |metadata|Custom kwargs" | tee -a "$OUT/$name.txt"
  echo "== load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$name.txt"
}

if [[ $PARTS == *,train,* ]]; then
  for i in 1 2; do
    run "train-cpu-small-$i" $BENCH train --preset cpu-small --compare-hf --steps 5 --variant train.loss_chunks=4 \
      --overwrite --json "$OUT/train-cpu-small-$i.json"
    run "train-cpu-tiny-$i" $BENCH train --preset cpu-tiny --compare-hf --steps 5 --overwrite --json "$OUT/train-cpu-tiny-$i.json"
  done
fi
if [[ $PARTS == *,decode,* ]]; then
  for i in 1 2; do
    run "decode-160m-$i" $BENCH generate --config configs/pythia.py:160m --dtype float32 --batches 1,8 \
      --prompt-len 64 --new-tokens 64 --layer-loops scan,unstacked --compare-hf --overwrite --json "$OUT/decode-160m-$i.json"
  done
fi
if [[ $PARTS == *,pipeline,* ]]; then
  for stage in 1 2; do
    run "pipeline-cpu-small-stage$stage" env XLA_FLAGS=--xla_force_host_platform_device_count=2 $BENCH train \
      --preset cpu-small --config.mesh.stage=$stage --config.train.micro_batches=4 --steps 5 \
      --overwrite --json "$OUT/pipeline-cpu-small-stage$stage.json"
    run "pipeline-tiny-stage$stage" env XLA_FLAGS=--xla_force_host_platform_device_count=2 $BENCH train \
      --config configs/tiny.py --config.mesh.stage=$stage --config.train.micro_batches=4 --steps 10 \
      --overwrite --json "$OUT/pipeline-tiny-stage$stage.json"
  done
fi
if [[ $PARTS == *,data,* ]]; then
  run data $BENCH data --overwrite --json "$OUT/data.json"
  sample=neox_jax/assets/train.jsonl.zst
  run data-sample-x4 $BENCH data --skip-index --input "$sample,$sample,$sample,$sample" --overwrite --json "$OUT/data-sample-x4.json"
fi
if [[ $PARTS == *,eval,* ]]; then
  run eval $BENCH eval --config configs/pythia.py:70m --tasks lambada_openai=300,piqa=200,hellaswag=200 \
    --batch-size 16 --passes 2 --overwrite --json "$OUT/eval.json"
fi
if [[ $PARTS == *,trainrun,* ]]; then
  run trainrun bash -c "time $PY scripts/train.py --workdir $OUT/trainrun"
fi
if [[ $PARTS == *,energy,* ]]; then
  run energy $BENCH energy --steps 50 --pairs 8 --overwrite --json "$OUT/energy.json"
fi
echo "done: $OUT (load during the run in $OUT/load.txt)"
