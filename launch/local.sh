#!/usr/bin/env bash
# N training processes on this machine, on JAX's own distributed runtime (jax.distributed, gloo CPU
# collectives), each with its own fake CPU devices. What the tests exercise; also the quickest way
# to try a multi-process change before a pod or a cluster.
#
#   launch/local.sh [options] N [python -m owl_jax.train args...]
#   launch/local.sh --devices-per-process=4 2 --config=configs/tiny.py --workdir=/tmp/owl --config.mesh.data=2
#
# Options (before N):
#   --devices-per-process=K  fake CPU devices per process (XLA --xla_force_host_platform_device_count; default 1)
#   --port=P                 coordinator port on 127.0.0.1 (default: a free one)
#   --log-dir=DIR            every process's output to DIR/process_<i>.log (default: process 0 to this
#                            terminal, the others to a temporary directory, kept only on failure)
#   --dry-run                print the commands and exit
# Environment: PYTHON (default python).
#
# Every process gets --coordinator_address=127.0.0.1:P --num_processes=N --process_id=i. The script
# waits for all of them; when one fails it stops the others (they would wait in a collective for
# ever) and exits with that process's status. Ctrl-C / SIGTERM is passed on to every process, which
# saves a checkpoint and exits with status 75 (train.py's preemption path); rerunning the command
# resumes. Exit status: 0 done, 75 stopped and saved, anything else the first failure's.
set -euo pipefail

devices=1
port=""
log_dir=""
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices-per-process=*) devices="${1#*=}"; shift ;;
    --port=*) port="${1#*=}"; shift ;;
    --log-dir=*) log_dir="${1#*=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    --*) echo "local.sh: unknown option $1 (options go before N)" >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: launch/local.sh [--devices-per-process=K] [--port=P] [--log-dir=DIR] [--dry-run] N [train args...]" >&2
  exit 2
fi
if [[ ! "$devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: --devices-per-process must be a positive integer, got '$devices'" >&2
  exit 2
fi
n="$1"; shift
python="${PYTHON:-python}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# XLA_FLAGS without any previous device count, plus ours.
xla_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
xla_flags="$(echo "$xla_flags --xla_force_host_platform_device_count=$devices" | xargs)"

cmd_for() {  # the command of process $1
  printf '%q ' env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags" "$python" -m owl_jax.train "$@" \
    "--coordinator_address=127.0.0.1:$port" "--num_processes=$n"
}

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < n; i++)); do
    echo "$(cmd_for "$@")--process_id=$i"
  done
  exit 0
fi

if [[ -z "$log_dir" ]]; then
  log_dir="$(mktemp -d -t owl_local.XXXXXX)"
  to_terminal=1
else
  mkdir -p "$log_dir"
  to_terminal=0
fi

pids=()
stop_all() {  # signal every process we started that is still running
  local sig="$1"
  for pid in "${pids[@]}"; do
    kill -"$sig" "$pid" 2>/dev/null || true
  done
}
trap 'stop_all TERM' INT TERM

for ((i = 0; i < n; i++)); do
  log="$log_dir/process_$i.log"
  if [[ "$i" == 0 && "$to_terminal" == 1 ]]; then
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m owl_jax.train "$@" \
      "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i" &
  else
    JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$python" -m owl_jax.train "$@" \
      "--coordinator_address=127.0.0.1:$port" "--num_processes=$n" "--process_id=$i" >"$log" 2>&1 &
  fi
  pids+=("$!")
done
echo "local.sh: $n processes x $devices CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir (pids ${pids[*]})" >&2

status=0
live=("${pids[@]}")
while [[ ${#live[@]} -gt 0 ]]; do
  finished=""
  rc=0
  wait -n -p finished "${live[@]}" || rc=$?
  if [[ -z "$finished" ]]; then  # interrupted by a trapped signal: keep waiting for the children
    continue
  fi
  still=()
  for pid in "${live[@]}"; do
    [[ "$pid" != "$finished" ]] && still+=("$pid")
  done
  live=("${still[@]}")
  if [[ $rc -eq 75 ]]; then  # stopped by SIGTERM after its checkpoint (owl_jax/cli.py): not a failure
    [[ $status -eq 0 ]] && status=75
  elif [[ $rc -ne 0 && ( $status -eq 0 || $status -eq 75 ) ]]; then
    status=$rc
    failed=""
    for ((i = 0; i < n; i++)); do
      [[ "${pids[$i]}" == "$finished" ]] && failed=$i
    done
    echo "local.sh: process $failed (pid $finished) exited with status $rc; stopping the others" >&2
    if [[ -f "$log_dir/process_$failed.log" ]]; then
      echo "---- last lines of $log_dir/process_$failed.log" >&2
      tail -n 40 "$log_dir/process_$failed.log" >&2
    fi
    stop_all TERM
    # A process blocked in a collective never reaches its SIGTERM handler's clean exit.
    ( sleep 20; stop_all KILL ) >/dev/null 2>&1 &
    killer=$!
  fi
done
if [[ -n "${killer:-}" ]]; then
  kill "$killer" 2>/dev/null || true
fi
if [[ "$to_terminal" == 1 && $status -eq 0 ]]; then
  rm -rf "$log_dir"  # our temporary logs of processes 1..N-1; kept (and named above) on failure
fi
exit $status
