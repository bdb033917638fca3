#!/usr/bin/env bash
# Train (or run any scfm-jax subcommand) on every GPU of one host: one process sees all local GPUs;
# the mesh in the config spans them (e.g. --config.mesh.fsdp=-1 for FSDP over 8 GPUs). Runs in the
# Python environment it is started from, where this checkout is installed with CUDA JAX:
#
#   pip install -e . 'jax[cuda12]'
#   launch/gpu_host.sh configs/scfoundation_100m.py runs/100m --config.data.store=/data/store
#   launch/gpu_host.sh embed --checkpoint runs/100m --store /data/store --output /data/embeddings
#
# Without a GPU it says so and runs on the CPU; with GPUs that this JAX cannot use it stops.
set -euo pipefail
usage="usage: $0 CONFIG WORKDIR [--config.x=y ...] | SUBCOMMAND [FLAGS ...]"
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
case $1 in
  *[./]*)  # a config file: train it
    if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
    command=(train --config "$1" --workdir "$2" "${@:3}") ;;
  *) command=("$@") ;;
esac
python=${PYTHON:-python3}
if ! "$python" -c 'import scfm_jax' 2>/dev/null; then
  echo "gpu_host.sh: scfm-jax is not installed in $python; in this checkout run:" \
    "pip install -e . 'jax[cuda12]'" >&2
  exit 2
fi
backend=$("$python" -c 'import jax; print(jax.default_backend())')
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [ "$backend" != gpu ]; then
  if [ "$gpus" -gt 0 ]; then
    echo "gpu_host.sh: nvidia-smi lists $gpus GPUs but JAX runs on '$backend': install CUDA JAX" \
      "(pip install -U 'jax[cuda12]') and check that it matches the driver" >&2
    exit 1
  fi
  echo "gpu_host.sh: no GPU found (no NVIDIA GPU listed by nvidia-smi); running on the CPU" >&2
else
  # Let XLA take most of the GPU memory up front and overlap collectives with compute.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
fi
exec "$python" -m scfm_jax.main "${command[@]}"
