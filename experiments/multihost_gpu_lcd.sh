#!/usr/bin/env bash
# LCD on several GPU hosts without a scheduler: run this once per host with its own PROCESS_ID.
#   COORD=host0:12345 NUM_PROCESSES=2 PROCESS_ID=0 TEACHER=gs://bucket/sd15 \
#     DATA='gs://bucket/shards/{00000..01023}.tar' WORKDIR=gs://bucket/runs/sd15 \
#     bash experiments/multihost_gpu_lcd.sh
# TEACHER, DATA and WORKDIR may be gs:// paths or folders every host sees.
# Under SLURM, drop --coordinator/--num_processes/--process_id and pass --jax_distributed.
set -euo pipefail
: "${COORD:?host:port of process 0}" "${NUM_PROCESSES:?}" "${PROCESS_ID:?}"
: "${TEACHER:?}" "${DATA:?}" "${WORKDIR:?gs:// or a folder every host can write}"
python -m lcm_jax.train \
  --coordinator="$COORD" --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID" \
  --config=configs/sd15_lcd.py:"$TEACHER" --workdir="$WORKDIR" \
  --config.data.source="${SOURCE:-webdataset}" --config.data.path="$DATA" \
  --config.data.num_workers="${WORKERS:-8}" --config.mesh.fsdp="${FSDP:-8}"
