#!/usr/bin/env bash
# LCD of SD 1.5 on a TPU pod slice (e.g. v4-32): the same command runs on every host; JAX finds
# the topology through --jax_distributed. Teacher, data and workdir may all be gs:// paths: the
# teacher is copied to each host's disk once (lcm_jax.fs.local_copy), shards are read in place,
# checkpoints / metrics / samples land in the bucket, and rerunning the command resumes. Usage:
#   TPU=my-tpu ZONE=us-central2-b TEACHER=gs://bucket/sd15 DATA='gs://bucket/shards/{00000..01023}.tar' \
#     WORKDIR=gs://bucket/runs/sd15 bash experiments/tpu_pod_lcd.sh
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?zone}" "${TEACHER:?diffusers SD 1.5 folder (gs:// or on every host)}"
: "${DATA:?img2dataset tar shards (gs:// or on every host)}" "${WORKDIR:?run directory, e.g. gs://bucket/runs/x}"
FSDP=${FSDP:-4}   # devices per host that share one copy of params / Adam state / EMA target
SOURCE=${SOURCE:-webdataset}   # or folder (metadata.jsonl), parquet, array_record
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/lcm-jax && pip install -q -e . 'jax[tpu]' &&
  python -m lcm_jax.train --jax_distributed \
    --config=configs/sd15_lcd.py:$TEACHER --workdir=$WORKDIR \
    --config.data.source=$SOURCE --config.data.path='$DATA' --config.data.num_workers=${WORKERS:-8} \
    --config.mesh.fsdp=$FSDP"
