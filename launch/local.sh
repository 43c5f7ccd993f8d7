#!/usr/bin/env bash
# Run one llm-jax command as N processes on this machine, joined by jax.distributed over loopback, each with
# its own fake CPU devices: multi-host training rehearsed on a laptop (the same code paths as a pod: one
# coordinator, per-process data, collective checkpoints).
#
#   launch/local.sh [--devices_per_process=4] [--port=P] [--log_dir=DIR] [--dry-run] N -- llm-jax train --workdir=...
#
# Each process gets --coordinator_address=127.0.0.1:P --num_processes=N --process_id=i appended, and
# XLA_FLAGS=--xla_force_host_platform_device_count=D. Process 0's output is shown and kept in
# DIR/process_0.log; the others write DIR/process_<i>.log. If one process fails, the others are stopped and
# the script exits with its status. --dry-run prints every command instead of running it.
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "launch/local.sh: error: $*" >&2; exit 2; }

devices=4 port='' log_dir='' dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices_per_process=*) devices="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage ;;
    --) die 'give the number of processes before --' ;;
    -*) die "unknown flag $1" ;;
    *) break ;;
  esac
  shift
done
[[ $# -ge 1 ]] || usage
n="$1"; shift
[[ "$n" =~ ^[1-9][0-9]*$ ]] || die "the number of processes must be a positive integer, got '$n'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "--devices_per_process must be a positive integer, got '$devices'"
[[ $# -ge 1 && "$1" == "--" ]] || die "expected -- and the command after the number of processes"
shift
[[ $# -ge 1 ]] || die 'no command after --'
cmd=("$@")

if [[ -z "$port" ]]; then
  if [[ $dry_run == 1 ]]; then
    port=PORT
  else  # a port the kernel says is free now
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  fi
fi
log_dir="${log_dir:-${TMPDIR:-/tmp}/llm-jax-local-$$}"

command_of() {  # the full command of process $1, one word per line
  printf '%s\n' "${cmd[@]}" "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$1"
}

env_of=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")

if [[ $dry_run == 1 ]]; then
  echo "mkdir -p $(printf '%q' "$log_dir")"
  for ((i = 0; i < n; i++)); do
    mapfile -t words < <(command_of "$i")
    printf '%q ' "${env_of[@]}" "${words[@]}"
    printf '> %q 2>&1 &\n' "$log_dir/process_$i.log"
  done
  echo 'wait'
  exit 0
fi

mkdir -p "$log_dir"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM

for ((i = 0; i < n; i++)); do
  mapfile -t words < <(command_of "$i")
  if [[ $i == 0 ]]; then
    "${env_of[@]}" "${words[@]}" > >(tee "$log_dir/process_0.log") 2>&1 &
  else
    "${env_of[@]}" "${words[@]}" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
echo "launch/local.sh: $n processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir" >&2

# Poll rather than `wait -n`: it names the process that ended, and works in any bash.
status=0 running=$n
declare -a ended
while [[ $running -gt 0 ]]; do
  for ((i = 0; i < n; i++)); do
    [[ -n "${ended[$i]:-}" ]] && continue
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0; wait "${pids[$i]}" || rc=$?
      ended[$i]=1; running=$((running - 1))
      if [[ $rc != 0 && $status == 0 ]]; then
        status=$rc
        echo "launch/local.sh: process $i exited with status $rc; stopping the others (log: $log_dir/process_$i.log)" >&2
        if [[ $i != 0 ]]; then tail -n 5 "$log_dir/process_$i.log" >&2 || true; fi
        cleanup
      fi
    fi
  done
  [[ $running -gt 0 ]] && sleep 0.2
done
wait  # the tee of process 0
exit "$status"
