#!/usr/bin/env bash
# Builds epic (with OpenBLAS as the F32 matrix-multiply peer), writes a v2-lite-shape
# checkpoint and runs the single-process benchmarks. Figures: docs/performance.md.
#   launch/bench.sh [--layers N] [--models DIR]
set -euo pipefail
source "$(dirname "$0")/common.sh"

layers=4
models="$EPIC_ROOT/models"
while [ $# -gt 0 ]; do
  case "$1" in
    --layers) layers="$2"; shift 2 ;;
    --models) models="$2"; shift 2 ;;
    -h|--help)
      echo "usage: launch/bench.sh [--layers N (default 4)] [--models DIR (default models/)]"
      echo "Writes DIR/v2-lite-N (V2-Lite's real dimensions, N layers, BF16: ~1.1 GiB a layer"
      echo "plus 0.8 GiB of embeddings) and runs bench/matmul_bench, bench/model_bench,"
      echo "bench/dispatch_bench at 2 and 4 ranks, epic-run at 1, 2 and 4 ranks, and bench/serving_bench"
      echo "against a local cluster on the bundled default model."
      exit 0 ;;
    *) epic_log "unknown flag $1 (see --help)"; exit 2 ;;
  esac
done

EPIC_PACKAGES+=(libopenblas-dev)
epic_build
model="$models/v2-lite-$layers"
if [ ! -f "$model/config.json" ]; then
  "$EPIC_BUILD_DIR/worker/epic-mkmodel" --preset v2-lite-shape --layers "$layers" --out "$model"
fi
"$EPIC_BUILD_DIR/bench/matmul_bench"
for prompt in 128 512; do
  "$EPIC_BUILD_DIR/bench/model_bench" --model "$model" --prompt "$prompt" --decode 32
done
mpi=(mpirun --oversubscribe --bind-to none)
[ "$(id -u)" -ne 0 ] || mpi+=(--allow-run-as-root)
for n in 2 4; do
  "${mpi[@]}" -np "$n" -x OMP_NUM_THREADS=1 "$EPIC_BUILD_DIR/bench/dispatch_bench" --repeats 30
done
prompt="$(seq -s, 1 64)"
cores="$(nproc)"
for n in 1 2 4; do
  threads=$(( cores / n )); [ "$threads" -ge 1 ] || threads=1
  echo "decode with $n rank(s) x $threads thread(s):"
  "${mpi[@]}" -np "$n" -x OMP_NUM_THREADS="$threads" "$EPIC_BUILD_DIR/worker/epic-run" --model "$model" \
    --tokens "$prompt" --max-new-tokens 33 --ignore-eos --threads "$threads" 2>&1 | grep -E "prefill|holds"
done

# Serving: a local cluster on the bundled default model, loaded by bench/serving_bench,
# against the same batches offline in one process (one worker rank, all cores each side).
small="$EPIC_ROOT/models/default"
[ -f "$small/config.json" ] || "$EPIC_BUILD_DIR/worker/epic-mkmodel" --preset v2-160 --seed 0 --out "$small"
ready="$(mktemp -u)"
"$EPIC_ROOT/launch/cluster.sh" --model "$small" --np 1 --threads "$cores" --port 0 --metrics-port 0 \
  --listen-host 127.0.0.1 --ready-file "$ready" --no-build >/dev/null 2>&1 &
cluster=$!
port="$(epic_wait_ready "$ready" "$cluster" 120 "the cluster")" || exit 1
OMP_NUM_THREADS="$cores" "$EPIC_BUILD_DIR/bench/serving_bench" --server "127.0.0.1:$port" --model "$small" \
  --concurrency 1,4,16 --prompt-len 32 --output-len 32
kill -TERM "$cluster"; wait "$cluster" || true; rm -f "$ready"
