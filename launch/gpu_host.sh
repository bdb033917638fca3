#!/usr/bin/env bash
# Train on every GPU of one host: one process sees all local GPUs; the mesh in the config spans
# them (e.g. --config.mesh.fsdp=-1 for FSDP over 8 GPUs).
#
#   launch/gpu_host.sh configs/scfoundation_100m.py runs/100m --config.data.store=/data/store
set -euo pipefail
if [ $# -lt 2 ]; then echo "usage: $0 CONFIG WORKDIR [--config.x=y ...]" >&2; exit 2; fi
config=$1; workdir=$2; shift 2
pip install -q -e "$(dirname "$0")/.." 'jax[cuda12]'
# Let XLA take most of the GPU memory up front and overlap collectives with compute.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
exec scfm-jax train --config "$config" --workdir "$workdir" "$@"
