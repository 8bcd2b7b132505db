#!/usr/bin/env bash
# The shapes world's methods table (lcm_jax/worlds/shapes/methods.py) at a training budget of your
# choice: every recipe and method for STEPS steps on the shipped teacher, scored at 1, 2 and 4
# steps on NUM_PROMPTS (500) held-out prompts. The demo's budget is 1200 steps (about 10 minutes a
# method on 2 CPU cores); the long run is 10000 (about an hour a method alone on 2 CPU cores).
#   bash experiments/shapes_methods.sh WORKDIR STEPS [--methods lcd,lcd_x0,...]
# Resumable: methods already in WORKDIR/methods.jsonl are read back, a method's unfinished
# training resumes from its checkpoints. Writes WORKDIR/methods.{md,png,jsonl}.
set -euo pipefail
: "${1:?WORKDIR}" "${2:?STEPS of training per method}"
workdir=$1; steps=$2; shift 2
exec "${PYTHON:-python}" -m lcm_jax.worlds.shapes.methods --workdir="$workdir" --steps="$steps" \
  --num_prompts="${NUM_PROMPTS:-500}" "$@"
