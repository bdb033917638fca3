#!/usr/bin/env bash
# Throughput on one CUDA machine, end to end in under 10 minutes: the scfoundation_100m train step
# at its config's global batch, cell embedding at batch 1/64/256 and scMulan (368M) annotation at
# batch 1/64; cells/s, MFU against the card's published bf16 peak, memory. The table goes to one
# markdown file (default bench_gpu.md) and to stdout.
#
#   bash benchmarks/bench_gpu.sh [OUTPUT.md]         # on the GPU host, from the repository root
#   bash benchmarks/bench_gpu.sh --cpu [OUTPUT.md]   # tiny configs on the CPU: checks the script
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [ "${1:-}" = "--cpu" ]; then mode=cpu; shift; fi
output="${1:-bench_gpu.md}"

if [ "$mode" = gpu ]; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench_gpu.sh: no CUDA GPU visible (nvidia-smi -L failed); --cpu runs the CPU check" >&2
    exit 1
  fi
  # jax's CUDA plugin at the installed jax's version (never a different jax)
  if ! python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    version=$(python -c "import jax; print(jax.__version__)")
    pip install -q "jax[cuda12]==$version"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 540 python benchmarks/bench_gpu.py --output "$output"
else
  # no time bound here: a loaded CPU compiles the tiny steps slowly, and the figures mean nothing
  JAX_PLATFORMS=cpu python benchmarks/bench_gpu.py --tiny --output "$output" \
    --expressed 200 --steps 2 --annotate-cells 16
fi
echo "table written to $output"
