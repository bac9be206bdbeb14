#!/usr/bin/env bash
# The README's scaling-law study (Running on a cluster, 5. Sweeps, "Scaling laws"): an isoflop sweep of configs/tiny.py's architecture at
# 3 budgets x 8 sizes on the bundled Pile sample, on this machine's CPU, then Chinchilla's fits and their figure.
# Usage: scripts/scaling_study.sh [RUNS_DIR]   (default runs/scaling_study; ~30 minutes on 2 cores; a rerun resumes
# unfinished runs and refits)
set -eu
RUNS=${1:-runs/scaling_study}
PY=${PYTHON:-.venv/bin/python}
# two families (widths 16 x depth and 8 x depth) whose sizes interleave: 8 sizes per budget, 872 to 200k parameters
for family in depth:1-8,aspect:16,head_dim:16 depth:1-8,aspect:8,head_dim:8; do
  $PY scripts/sweep.py --isoflop 1e12,2e12,4e12 --config configs/tiny.py --family $family \
      --config.optimizer.warmup_steps=10 --emit local --runs_dir "$RUNS"
done
$PY scripts/sweep.py --fit "$RUNS/isoflop" --at 1e15
