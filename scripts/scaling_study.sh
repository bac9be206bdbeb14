#!/usr/bin/env bash
# The README's scaling-law study (Training, "Scaling laws"): an isoflop sweep of configs/tiny.py's architecture at
# 3 budgets x 4 sizes on the bundled Pile sample, on this machine's CPU, then Chinchilla's fits and their figure.
# Usage: scripts/scaling_study.sh [RUNS_DIR]   (default runs/scaling_study; ~15 minutes on 2 cores; a rerun resumes
# unfinished runs and refits)
set -eu
RUNS=${1:-runs/scaling_study}
PY=${PYTHON:-.venv/bin/python}
$PY scripts/sweep.py --isoflop 1e12,2e12,4e12 --config configs/tiny.py --family depth:1-8,aspect:16,head_dim:16 \
    --config.optimizer.warmup_steps=10 --emit local --runs_dir "$RUNS"
$PY scripts/sweep.py --fit "$RUNS/isoflop" --at 1e15
