#!/usr/bin/env bash
# Launch an mtlx run on every host of a Cloud TPU pod slice (one process per host).
#
#   TPU_NAME=my-v4-32 ZONE=us-central2-b WORKDIR=gs://my-bucket/run1 \
#     bash scripts/launch_tpu_pod.sh --config configs/glue_shared_encoder.py \
#       --config.model.checkpoint=gs://my-bucket/bert-base-uncased --config.data.data_root=gs://my-bucket/data
#
# Every host runs the same command; JAX's TPU cluster detection (config.distributed='auto')
# assigns process ids, and each process feeds only its rows of every global batch.
# WORKDIR must be a place all hosts see (checkpoints are written by all processes): a bucket
# (gs://..., the usual choice on a pod: setup below installs the gcs extra, and the TPU VM's
# service account needs write access to it) or a shared filesystem. The model, tokenizer and
# data may be gs:// URLs too: each host copies them once into its cache (mtlx.paths.local_copy).
# The repository must already be on every host at $REPO (default ~/mtlx), e.g. via
#   gcloud compute tpus tpu-vm scp --recurse . $TPU_NAME:~/mtlx --zone $ZONE --worker=all
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
REPO=${REPO:-~/mtlx}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e; cd $REPO
  bash scripts/setup.sh
  .venv/bin/python -m pip install -q 'jax[tpu]' -e '.[gcs]'
  .venv/bin/python scripts/train.py --workdir $WORKDIR --config.distributed=auto --no-progress $ARGS
"
