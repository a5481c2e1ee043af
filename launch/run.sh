#!/usr/bin/env bash
# The main job: install, build, make the bundled default model, start a local cluster
# (coordinator + an mpirun job of workers) and send it a real generation over gRPC.
set -euo pipefail
source "$(dirname "$0")/common.sh"

prompt="The capital of France is"
tokens="5,17,300,42,7"
ids=0
max_tokens=16
np=4
port=50051
http_port=8000
serve=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt) prompt="$2"; ids=0; shift 2 ;;
    --tokens) tokens="$2"; ids=1; shift 2 ;;
    --ids) ids=1; shift ;;
    --max-tokens|--max-new-tokens) max_tokens="$2"; shift 2 ;;
    --np) np="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --http-port) http_port="$2"; shift 2 ;;
    --serve) serve=1; shift ;;
    -h|--help)
      cat <<USAGE
usage: launch/run.sh [--prompt TEXT | --tokens IDS | --ids] [--max-tokens N] [--np N] [--port P] [--http-port P] [--serve]
Installs missing Debian packages (apt-get, as root), builds epic into build/, writes
the bundled default model (preset v2-160: DeepSeek-V2 routing at small size, seed 0)
to models/default if absent, starts a local cluster on it with launch/cluster.sh
(the coordinator and N CPU worker ranks under mpirun), sends one generation with
\`epic generate\` and prints the text it gets back (the ids with --ids or --tokens).
Then stops the cluster, or with --serve keeps it serving in the foreground until Ctrl-C
(gRPC on --port, the OpenAI-compatible HTTP API on --http-port).
The default model's weights are random: its text is fluent only in bytes.
  --prompt TEXT     the prompt as text (default "$prompt")
  --tokens IDS      the prompt as token ids, comma-separated (default $tokens); prints ids
  --ids             send the default token ids instead of text
  --max-tokens N    tokens to generate (default $max_tokens)
  --np N            worker ranks (default $np)
  --port P          gRPC port (default $port; 0: a free one)
  --http-port P     OpenAI-compatible HTTP port (default $http_port; 0: a free one)
  --serve           keep the cluster running after the generation
USAGE
      exit 0 ;;
    *) epic_log "unknown flag $1 (see --help)"; exit 2 ;;
  esac
done

# Only what the main job runs: no tests, no benchmarks.
epic_build epic-coordinator epic-worker epic epic-mkmodel
model="$EPIC_ROOT/models/default"
# A model written before checkpoints carried their tokenizer is written again.
if [ ! -f "$model/config.json" ] || [ ! -f "$model/tokenizer.json" ]; then
  "$EPIC_BUILD_DIR/worker/epic-mkmodel" --preset v2-160 --seed 0 --out "$model"
fi
device=cpu
if epic_have_gpu; then
  epic_log "a GPU is visible, but the CUDA backend has not been validated on a GPU yet (docs/cuda.md):" \
    "the workers run on the CPU; try 'build/worker/epic-run --device cuda' or launch/gpu_check.sh"
fi

ready="$(mktemp -u "${TMPDIR:-/tmp}/epic-run-ready.XXXXXX")"
"$EPIC_ROOT/launch/cluster.sh" --model "$model" --np "$np" --port "$port" --http-port "$http_port" --metrics-port 0 \
  --listen-host 127.0.0.1 --device "$device" --ready-file "$ready" --max-restarts 3 --no-build &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null || true; rm -f "$ready"' EXIT
port="$(epic_wait_ready "$ready" "$cluster" 120 "the cluster")" || exit 1

if [ "$ids" -eq 1 ]; then
  epic_log "generating: epic generate --server 127.0.0.1:$port --tokens $tokens --max-tokens $max_tokens"
  "$EPIC_BUILD_DIR/client/epic" generate --server "127.0.0.1:$port" --tokens "$tokens" --max-tokens "$max_tokens"
else
  epic_log "generating: epic generate --server 127.0.0.1:$port --prompt \"$prompt\" --max-tokens $max_tokens"
  "$EPIC_BUILD_DIR/client/epic" generate --server "127.0.0.1:$port" --prompt "$prompt" --max-tokens "$max_tokens"
fi
if [ "$serve" -eq 1 ]; then
  epic_log "serving on 127.0.0.1:$port until Ctrl-C"
  wait "$cluster"
fi
