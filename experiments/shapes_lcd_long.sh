#!/usr/bin/env bash
# The shapes LCD (lcm_jax/worlds/shapes/configs/shapes_lcd.py) for a wall-clock budget instead of its 1200 steps (the
# cosine schedule then spans 10M steps: the learning rate stays at its peak), then its
# quality over training: does the student keep converging to the teacher's ODE past the demo's
# CPU budget, and do its 1-8 step samples follow? Meant for one GPU.
#   bash experiments/shapes_lcd_long.sh WORKDIR SECONDS [--config.key=value ...]
# Keeps a checkpoint every CKPT_EVERY (1000) steps; the run stops by SIGTERM after SECONDS (the
# training loop saves the step it reached) and is resumable. Then lcm_jax.worlds.shapes.eval_checkpoints scores
# every checkpoint on NUM_PROMPTS (500) held-out prompts: WORKDIR/quality_by_step.{md,png,jsonl}.
set -euo pipefail
: "${1:?WORKDIR}" "${2:?SECONDS of training}"
workdir=$1; seconds=$2; shift 2
PYTHON=${PYTHON:-python}
status=0
timeout --signal=TERM --kill-after=120 "$seconds" "$PYTHON" -m lcm_jax.train \
  --config=lcm_jax/worlds/shapes/configs/shapes_lcd.py --workdir="$workdir" --config.total_steps=10000000 \
  --config.checkpoint_every="${CKPT_EVERY:-1000}" --config.keep_checkpoints=1000 \
  --config.log_every=500 --config.eval_every=500 --config.sample_every=0 "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then  # 124: stopped by the budget, as planned
  echo "training failed (exit $status)" >&2
  exit "$status"
fi
"$PYTHON" -m lcm_jax.worlds.shapes.eval_checkpoints "$workdir" --num_prompts "${NUM_PROMPTS:-500}"
