#!/usr/bin/env bash
# Simulate a multi-host run on this machine: N processes, each with its own CPU devices, joined by
# jax.distributed.initialize over localhost (CPU collectives use gloo).
#
#   launch/local_processes.sh N [DEVICES_PER_PROCESS] -- scfm-jax train --config ... --workdir ...
#   launch/local_processes.sh 2 4 -- scfm-jax embed --checkpoint ... --store ... --output ...
#
# Any scfm-jax subcommand that joins a multi-process run (train, embed, annotate) works.
# Every process runs the same command with --coordinator-address/--num-processes/--process-id
# appended; process 0's output goes to the terminal, the others' to <workdir-less> logs in $LOG_DIR.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 N [DEVICES_PER_PROCESS] -- COMMAND..." >&2; exit 2
fi
num_processes=$1; shift
devices=1
if [ "$1" != "--" ]; then devices=$1; shift; fi
[ "$1" = "--" ] || { echo "$0: expected -- before the command" >&2; exit 2; }
shift
port=${PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-$(mktemp -d)}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT INT TERM
for ((i = 0; i < num_processes; i++)); do
  args=("$@" --coordinator-address="127.0.0.1:$port" --num-processes="$num_processes"
        --process-id="$i" --num-cpu-devices="$devices")
  if [ "$i" -eq 0 ]; then
    JAX_PLATFORMS=cpu "${args[@]}" &
  else
    JAX_PLATFORMS=cpu "${args[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
[ "$status" -eq 0 ] || echo "a process failed; logs of processes 1.. are in $log_dir" >&2
exit "$status"
