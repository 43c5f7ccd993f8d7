#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), ship this checkout (or a wheel) to every worker, set
# up a venv there, run the same llm-jax command on all workers at once, fetch each worker's log, and
# optionally delete the slice.
#
#   launch/tpu_pod.sh --name=NAME --zone=ZONE [--project=P]
#       [--create --accelerator=v5litepod-16 --version=v2-alpha-tpuv5-lite [--spot]]
#       [--wheel=dist/llm_jax-*.whl] [--log_dir=logs/NAME] [--delete] [--dry-run]
#       -- llm-jax train --config=llama_1b --workdir=/mnt/shared/run
#
# Every worker runs the command; llm-jax finds the other workers by itself (jax.distributed from the TPU
# metadata). The workdir must be a filesystem every worker sees (a Filestore/NFS or gcsfuse mount): orbax
# writes one checkpoint from all of them. Without --wheel, `git archive HEAD` is shipped: commit first.
# Each worker tees its output to ~/llm-jax/logs/<hostname>.log; they are copied to --log_dir at the end,
# even when the run failed. --dry-run prints every command instead of running it.
set -euo pipefail

die() { echo "launch/tpu_pod.sh: error: $*" >&2; exit 2; }
quote() {  # words as a shell would need them, readably: plain words bare, the rest in single quotes
  local out='' w
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then out+="$w "; else out+="'${w//\'/\'\\\'\'}' "; fi
  done
  printf '%s' "${out% }"
}

name='' zone='' project='' create=0 accelerator='' version='' spot=0 wheel='' log_dir='' delete=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --create) create=1 ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --wheel=*) wheel="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --delete) delete=1 ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown flag $1 (the command goes after --)" ;;
  esac
  shift
done
[[ -n "$name" ]] || die '--name is required'
[[ -n "$zone" ]] || die '--zone is required'
[[ $# -ge 1 ]] || die 'no command after --'
if [[ $create == 1 ]]; then
  [[ -n "$accelerator" && -n "$version" ]] || die '--create needs --accelerator and --version'
fi
if [[ -n "$wheel" && $dry_run == 0 && ! -f "$wheel" ]]; then die "--wheel=$wheel: no such file"; fi
log_dir="${log_dir:-logs/$name}"

# `llm-jax ...` runs from the workers' venv.
cmd=("$@")
if [[ "${cmd[0]}" == llm-jax ]]; then cmd[0]='.venv/bin/llm-jax'; fi
remote_cmd="$(quote "${cmd[@]}")"

tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
if [[ -n "$project" ]]; then where+=("--project=$project"); fi

run() {  # print the command (dry run) or run it
  if [[ $dry_run == 1 ]]; then
    quote "$@"; echo
  else
    "$@"
  fi
}

# 1. The slice: reuse it when it exists, else create it (with --create).
create_cmd=("${tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator" "--version=$version")
if [[ $spot == 1 ]]; then create_cmd+=(--spot); fi
if [[ $dry_run == 1 ]]; then
  run "${tpu[@]}" describe "$name" "${where[@]}"
  if [[ $create == 1 ]]; then
    echo '# only if describe failed:'
    run "${create_cmd[@]}"
  fi
elif ! "${tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  [[ $create == 1 ]] || die "TPU VM $name does not exist in $zone (add --create --accelerator=... --version=...)"
  run "${create_cmd[@]}"
fi

# 2. The code on every worker, and a venv with the TPU extra.
if [[ -n "$wheel" ]]; then
  whl="$(basename "$wheel")"
  run "${tpu[@]}" scp "$wheel" "$name:~/$whl" "${where[@]}" --worker=all
  setup="mkdir -p ~/llm-jax && cd ~/llm-jax && python3 -m venv .venv && .venv/bin/pip install -q \"\$HOME/$whl[tpu]\""
else
  archive="${TMPDIR:-/tmp}/llm-jax-$name.tar.gz"
  run git -C "$(cd "$(dirname "$0")/.." && pwd)" archive --format=tar.gz -o "$archive" HEAD
  run "${tpu[@]}" scp "$archive" "$name:~/llm-jax.tar.gz" "${where[@]}" --worker=all
  setup="rm -rf ~/llm-jax && mkdir -p ~/llm-jax && tar -xzf ~/llm-jax.tar.gz -C ~/llm-jax && cd ~/llm-jax && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'"
fi
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$setup"

# 3. The same command on all workers at once, each keeping its own log; fetch the logs whatever happened.
train="cd ~/llm-jax && mkdir -p logs && $remote_cmd 2>&1 | tee logs/\$(hostname).log; exit \${PIPESTATUS[0]}"
status=0
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$train" || status=$?
run mkdir -p "$log_dir"
run "${tpu[@]}" scp "$name:~/llm-jax/logs/*" "$log_dir/" "${where[@]}" --worker=all || true

# 4. Stop paying: a slice cannot be stopped, only deleted.
if [[ $delete == 1 ]]; then
  run "${tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
if [[ $status != 0 ]]; then echo "launch/tpu_pod.sh: the run failed (status $status); logs in $log_dir" >&2; fi
exit "$status"
