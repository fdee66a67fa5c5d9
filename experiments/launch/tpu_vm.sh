#!/usr/bin/env bash
# A Cloud TPU VM (single host or pod slice): copy this checkout to every worker, install gembed with
# jax[tpu], and start `gembed train` on all workers at once. jax.distributed finds the coordinator,
# process count and index from the TPU metadata. WORKDIR must be a path every worker sees (a
# Filestore / NFS mount, or a gcsfuse mount of a bucket): checkpoints are written cooperatively.
# Usage: TPU_NAME=my-v4-32 ZONE=us-central2-b experiments/launch/tpu_vm.sh /mnt/shared/pft \
#          --gin_file=model/base.gin --gin_file=prefinetune.gin --gin_file=sharding/fsdp.gin
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
workdir=$1; shift
gcloud compute tpus tpu-vm scp --recurse --zone="$ZONE" --worker=all . "$TPU_NAME":~/gembed
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="cd ~/gembed && \
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]' && \
  .venv/bin/gembed train --workdir=$workdir $*"
