#!/usr/bin/env bash
# Data-parallel against tensor-parallel attention on the same memory: every rank gets
# the same latent-cache budget (--cache-blocks) in both modes. Under tp every rank holds
# the same rows, under dp each its own sequences', so dp should admit ranks times the
# sequences; this measures how many it admits at once and the tokens/s it serves.
#   bench/attention_bench.sh [--model DIR] [--np LIST] [--cache-blocks N] [--prompt-len N]
#                            [--output-len N] [--concurrency N]
# For each rank count and mode, starts launch/cluster.sh (built binaries, --no-build) and
# runs bench/serving_bench at one concurrency (more requests than either mode admits);
# prints each table, then per rank count dp's peak running requests and tok/s over tp's.
set -euo pipefail
source "$(dirname "$0")/../launch/common.sh"
root="$EPIC_ROOT"
build="$EPIC_BUILD_DIR"
model="$root/models/default" nps=2,4 blocks=72 prompt_len=256 output_len=32 concurrency=32
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --np) nps="$2"; shift 2 ;;
    --cache-blocks) blocks="$2"; shift 2 ;;
    --prompt-len) prompt_len="$2"; shift 2 ;;
    --output-len) output_len="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "attention_bench: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
work="$(mktemp -d)"
trap 'epic_stop_cluster; rm -rf "$work"' EXIT
per_request=$(( (prompt_len + output_len - 1 + 15) / 16 ))
echo "attention_bench: $(basename "$model"), prompt $prompt_len + output $output_len tokens ($per_request blocks of 16)," \
     "$blocks blocks per rank, concurrency $concurrency"
for np in ${nps//,/ }; do
  for mode in tp dp; do
    epic_start_cluster "$work" --model "$model" --np "$np" --attention "$mode" \
      -- --cache-blocks "$blocks" --block-size 16 --max-running 256 --max-step-tokens 512 --max-waiting 4096
    echo "== $np ranks, --attention $mode"
    "$build/bench/serving_bench" --server "127.0.0.1:$EPIC_CLUSTER_PORT" --concurrency "$concurrency" \
      --prompt-len "$prompt_len" --output-len "$output_len" | tee "$work/$np-$mode.txt"
    epic_stop_cluster
  done
done
echo "== dp against tp, the same cache budget per rank (peak running: requests admitted at once)"
for np in ${nps//,/ }; do
  tp=($(awk '$1 ~ /^[0-9]+$/ { print $3, $8 }' "$work/$np-tp.txt"))
  dp=($(awk '$1 ~ /^[0-9]+$/ { print $3, $8 }' "$work/$np-dp.txt"))
  awk -v np="$np" -v tt="${tp[0]}" -v tr="${tp[1]}" -v dt="${dp[0]}" -v dr="${dp[1]}" 'BEGIN {
    printf "%s ranks: peak running %d tp, %d dp (%.2fx); %.1f tok/s tp, %.1f dp (%.2fx)\n",
           np, tr, dr, dr / tr, tt, dt, dt / tt }'
done
