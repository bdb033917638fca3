#!/usr/bin/env bash
# Train on a TPU VM slice: create it (or reuse it), install scfm-jax on every worker, then run the
# same command on all workers. jax.distributed.initialize() discovers the pod by itself. The
# workdir must be visible to every worker (a bucket mounted with gcsfuse, or a shared filesystem).
#
#   TPU_NAME=scfm ZONE=us-central2-b ACCELERATOR=v4-64 \
#     launch/tpu_pod.sh configs/scfoundation_1b.py /mnt/gcs/runs/1b \
#       --config.data.store=gs://bucket/store
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2; fi
config=$1; workdir=$2; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
accelerator=${ACCELERATOR:-v4-32}
version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
repo=${REPO:-https://github.com/scfm-jax/scfm-jax.git}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$accelerator" --version "$version" ${SPOT:+--spot}
fi
on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}
on_all_workers "[ -d scfm-jax ] || git clone -q $repo scfm-jax; cd scfm-jax && git pull -q && \
  pip install -q -e . 'jax[tpu]'"
# Quote the user's overrides for the remote shell.
overrides=$(printf ' %q' "$@")
on_all_workers "cd scfm-jax && scfm-jax train --config $config --workdir $workdir \
  --auto_distributed$overrides"
