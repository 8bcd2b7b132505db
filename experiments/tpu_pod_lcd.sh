#!/usr/bin/env bash
# LCD of SD 1.5 on a TPU pod slice (e.g. v4-32): the same command runs on every host; JAX finds
# the topology through --jax_distributed. Usage:
#   TPU=my-tpu ZONE=us-central2-b TEACHER=/mnt/sd15 DATA=/mnt/images WORKDIR=gs://bucket/runs/sd15 \
#     bash experiments/tpu_pod_lcd.sh
set -euo pipefail
: "${TPU:?name of the TPU VM}" "${ZONE:?zone}" "${TEACHER:?diffusers SD 1.5 folder on every host}"
: "${DATA:?image folder with metadata.jsonl on every host}" "${WORKDIR:?run directory}"
FSDP=${FSDP:-4}   # devices per host that share one copy of params / Adam state / EMA target
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/lcm-jax && pip install -q -e . 'jax[tpu]' &&
  python -m lcm_jax.train --jax_distributed \
    --config=configs/sd15_lcd.py:$TEACHER --workdir=$WORKDIR \
    --config.data.path=$DATA --config.mesh.fsdp=$FSDP"
