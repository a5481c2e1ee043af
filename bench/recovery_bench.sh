#!/usr/bin/env bash
# Recovery time of a cluster: kill -9 of a worker rank → the first token served again.
#   bench/recovery_bench.sh --model DIR [--np N] [--rounds R] [--signal KILL|STOP]
# Starts launch/cluster.sh (built binaries, --no-build), then R times: waits until the
# job serves, kills rank 1 (its pid from `epic info`; rank 0 with --signal STOP), and
# times a one-token request from the kill until it succeeds (it waits for the next job).
# Prints each round and the median. STOP rounds run with --step-timeout 3.
set -euo pipefail
source "$(dirname "$0")/../launch/common.sh"
root="$EPIC_ROOT"
build="$EPIC_BUILD_DIR"
model="" np=2 rounds=3 signal=KILL
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --np) np="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --signal) signal="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "recovery_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$model" ] || { echo "recovery_bench: --model DIR is required" >&2; exit 2; }
work="$(mktemp -d)"
trap 'epic_stop_cluster; rm -rf "$work"' EXIT
timeout_args=()
[ "$signal" = STOP ] && timeout_args=(--step-timeout 3)
epic_start_cluster "$work" --model "$model" --np "$np" ${timeout_args[@]+-- "${timeout_args[@]}"}
port="$EPIC_CLUSTER_PORT"
epic=("$build/client/epic")
victim_rank=1
[ "$signal" = STOP ] && victim_rank=0
times=()
for round in $(seq 1 "$rounds"); do
  until "${epic[@]}" generate --server "127.0.0.1:$port" --tokens 5,17 --max-tokens 1 >/dev/null 2>&1; do sleep 0.2; done
  sleep 2
  pid="$("${epic[@]}" info --server "127.0.0.1:$port" | grep -o '"pid": "[0-9]*"' |
         sed -n "$((victim_rank + 1))p" | tr -dc '0-9')"
  start=$(date +%s.%N)
  kill -"$signal" "$pid"
  until "${epic[@]}" generate --server "127.0.0.1:$port" --tokens 5,17 --max-tokens 1 --timeout 120 >/dev/null 2>&1; do
    sleep 0.05
  done
  t=$(echo "$(date +%s.%N) - $start" | bc)
  times+=("$t")
  printf 'round %d: SIG%s of rank %d (pid %s) -> first token again after %.2f s\n' "$round" "$signal" "$victim_rank" "$pid" "$t"
done
printf '%s\n' "${times[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "median %.2f s over %d rounds\n", v[int((NR + 1) / 2)], NR }'
