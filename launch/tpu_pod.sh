#!/usr/bin/env bash
# Train (or run any scfm-jax subcommand) on a TPU VM slice from this checkout: create the slice (or
# reuse it), build a wheel of this working tree, copy it (and a config) to every worker, install it
# there with jax[tpu], and run on all workers (launch/tpu_worker.py joins them, worker 0
# coordinating). When the slice is preempted (spot) it is deleted, created again, and the same
# command runs again: training resumes from its last checkpoint, a store embedding from its
# finished chunks. The workdir must be one folder every worker sees (a bucket mounted with gcsfuse,
# or a shared filesystem); another subcommand's paths likewise (gs:// URLs, or such a folder).
#
#   TPU_NAME=scfm ZONE=us-central2-b ACCELERATOR=v4-64 SPOT=1 \
#     launch/tpu_pod.sh configs/scfoundation_1b.py /mnt/gcs/runs/1b \
#       --config.data.store=gs://bucket/store
#   TPU_NAME=scfm ZONE=us-central2-b launch/tpu_pod.sh embed --checkpoint /mnt/gcs/runs/1b \
#       --store gs://bucket/store --output gs://bucket/embeddings
#
# TPU_NAME, ZONE          the slice (required)
# ACCELERATOR             accelerator type (v4-32); RUNTIME_VERSION (tpu-ubuntu2204-base); SPOT=1
# REPO=GIT_URL@REV        install that revision (pip's git+ form) instead of this working tree
# JAX_PACKAGE             the JAX installed beside it ('jax[tpu]'; pin it as 'jax[tpu]==X.Y.Z')
# MAX_RESTARTS            how many preemptions to survive (20)
set -euo pipefail
usage="usage: $0 CONFIG[:ARG] WORKDIR [--config.x=y ...] | SUBCOMMAND [FLAGS ...]"
if [ $# -lt 1 ]; then echo "$usage" >&2; exit 2; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
remote=scfm-jax-run  # folder in each worker's home: the wheel, the config, tpu_worker.py
copies=()            # what goes to every worker besides the wheel and tpu_worker.py
case $1 in
  *[./]*)  # a config file: train it, from a copy on every worker
    if [ $# -lt 2 ]; then echo "$usage" >&2; exit 2; fi
    config_file=${1%%:*}
    [ -f "$config_file" ] || { echo "$0: no config file $config_file" >&2; exit 2; }
    copies=("$config_file")
    command=(train --config "$remote/$(basename "$config_file")${1#"$config_file"}"
             --workdir "$2" "${@:3}") ;;
  *) command=("$@") ;;
esac
accelerator=${ACCELERATOR:-v4-32}
version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
jax_package=${JAX_PACKAGE:-jax[tpu]}
max_restarts=${MAX_RESTARTS:-20}
root=$(cd "$(dirname "$0")/.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$1" "$TPU_NAME" --zone="$ZONE" "${@:2}"; }
on_all_workers() { tpu ssh --worker=all --command="$1"; }
slice_state() { tpu describe --format='value(state)' 2>/dev/null || echo MISSING; }

local_dir=$(mktemp -d)
trap 'rm -rf "$local_dir"' EXIT
if [ -n "${REPO:-}" ]; then
  package="git+${REPO#git+}"
else
  # The files git sees in the working tree (tracked and new, not ignored, uncommitted edits
  # included) are copied first, so stale build outputs of the checkout never reach the wheel.
  mkdir "$local_dir/source"
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$root" && git ls-files -z --cached --others --exclude-standard |
       while IFS= read -r -d '' file; do if [ -e "$file" ]; then printf '%s\0' "$file"; fi; done |
       tar --null -T - -cf -) | tar -xf - -C "$local_dir/source"
  else
    cp -a "$root/." "$local_dir/source"
  fi
  echo "tpu_pod.sh: building a wheel of $root" >&2
  python3 -m pip wheel -q --no-deps --wheel-dir "$local_dir" "$local_dir/source"
  wheel=$(echo "$local_dir"/*.whl)
  package="$remote/$(basename "$wheel")"
fi

create_slice() {
  echo "tpu_pod.sh: creating $accelerator slice $TPU_NAME in $ZONE" >&2
  local spot=()
  if [ "${SPOT:-0}" = 1 ]; then spot=(--spot); fi
  tpu create --accelerator-type="$accelerator" --version="$version" "${spot[@]}"
}

ready_slice() {
  local state
  while true; do
    state=$(slice_state)
    case $state in
      READY) return ;;
      MISSING) create_slice ;;
      PREEMPTED | TERMINATED)
        echo "tpu_pod.sh: slice $TPU_NAME is $state; deleting and creating it again" >&2
        tpu delete --quiet
        create_slice ;;
      CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | DELETING) sleep 30 ;;
      *) echo "tpu_pod.sh: slice $TPU_NAME is $state; start it or delete it" >&2; exit 1 ;;
    esac
  done
}

install_on_workers() {
  on_all_workers "mkdir -p $remote"
  gcloud compute tpus tpu-vm scp ${wheel:+"$wheel"} "${copies[@]}" "$root/launch/tpu_worker.py" \
    "$TPU_NAME:$remote/" --zone="$ZONE" --worker=all
  # The first install replaces an older build of the same version; the second adds what it needs.
  on_all_workers "python3 -m pip install -q --no-deps --force-reinstall $(printf '%q' "$package") && \
    python3 -m pip install -q $(printf '%q ' "$package" "$jax_package")"
}

run="python3 $remote/tpu_worker.py$(printf ' %q' "${command[@]}")"  # quoted for the workers' shell
for ((restarts = 0; ; restarts++)); do
  ready_slice
  install_on_workers
  status=0
  on_all_workers "$run" || status=$?
  state=$(slice_state)
  # On a healthy slice the run's own status stands (finished, or a real failure), except 75:
  # the run was stopped by SIGTERM (a maintenance event) after saving a checkpoint; resume it.
  [ "$state" = READY ] && [ "$status" -ne 75 ] && exit "$status"
  if [ "$restarts" -ge "$max_restarts" ]; then
    echo "tpu_pod.sh: slice $TPU_NAME is $state after $restarts restarts; giving up" >&2
    exit 1
  fi
  echo "tpu_pod.sh: slice $TPU_NAME was $state during the run; running it again, which resumes" \
    "from what it saved" >&2
done
