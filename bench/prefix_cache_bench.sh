#!/usr/bin/env bash
# Time to first token and throughput on requests that share a long system prompt, with
# the coordinator's prefix cache on against off, measured in one run.
#   bench/prefix_cache_bench.sh [--model DIR] [--np N] [--shared N] [--prompt-len N]
#                               [--output-len N] [--concurrency LIST]
# Starts launch/cluster.sh (built binaries, --no-build) once per mode and runs
# bench/serving_bench --shared-prefix against it; prints both tables, then per
# concurrency the ratios off/on of the median time to first token and on/off of tok/s.
set -euo pipefail
source "$(dirname "$0")/../launch/common.sh"
root="$EPIC_ROOT"
build="$EPIC_BUILD_DIR"
model="$root/models/default" np=2 shared=1024 prompt_len=32 output_len=16 levels=1,4,16
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --np) np="$2"; shift 2 ;;
    --shared) shared="$2"; shift 2 ;;
    --prompt-len) prompt_len="$2"; shift 2 ;;
    --output-len) output_len="$2"; shift 2 ;;
    --concurrency) levels="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prefix_cache_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
work="$(mktemp -d)"
trap 'epic_stop_cluster; rm -rf "$work"' EXIT
for mode in on off; do
  epic_start_cluster "$work" --model "$model" --np "$np" \
    -- --prefix-cache "$mode" --cache-blocks 4096 --max-step-tokens 512
  echo "== prefix cache $mode"
  "$build/bench/serving_bench" --server "127.0.0.1:$EPIC_CLUSTER_PORT" --concurrency "$levels" \
    --shared-prefix "$shared" --prompt-len "$prompt_len" --output-len "$output_len" | tee "$work/$mode.txt"
  epic_stop_cluster
done
echo "== cache on against off (ttft: off/on, higher is better; tok/s: on/off)"
join <(awk '$1 ~ /^[0-9]+$/ { print $1, $3, $4 }' "$work/on.txt" | sort) \
     <(awk '$1 ~ /^[0-9]+$/ { print $1, $3, $4 }' "$work/off.txt" | sort) |
  sort -n | awk '{ sub("ms", "", $3); sub("ms", "", $5);
                   printf "concurrency %s: ttft p50 %.1f ms on, %.1f ms off (%.2fx); %.1f tok/s on, %.1f off (%.2fx)\n",
                          $1, $3, $5, $5 / $3, $2, $4, $2 / $4 }'
