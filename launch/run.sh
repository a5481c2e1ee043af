#!/usr/bin/env bash
# The main job: install, build, make the bundled default model and generate from it.
#   launch/run.sh [--tokens 5,17,300] [--max-new-tokens 16] [-- more epic-run flags]
set -euo pipefail
source "$(dirname "$0")/common.sh"

tokens="5,17,300,42,7"
max_new=16
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens="$2"; shift 2 ;;
    --max-new-tokens) max_new="$2"; shift 2 ;;
    -h|--help)
      cat <<USAGE
usage: launch/run.sh [--tokens IDS] [--max-new-tokens N] [-- EPIC_RUN_FLAGS...]
Installs missing Debian packages (apt-get, as root), builds epic into build/, writes
the bundled default model (preset v2-160: DeepSeek-V2 routing at small size, seed 0)
to models/default if absent, and generates from it with epic-run.
  --tokens IDS          prompt token ids, comma-separated (default $tokens)
  --max-new-tokens N    tokens to generate (default $max_new)
  -- FLAGS              passed to epic-run (see build/worker/epic-run --help)
USAGE
      exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) epic_log "unknown flag $1 (see --help)"; exit 2 ;;
  esac
done

epic_build
model="$EPIC_ROOT/models/default"
if [ ! -f "$model/config.json" ]; then
  "$EPIC_BUILD_DIR/worker/epic-mkmodel" --preset v2-160 --seed 0 --out "$model"
fi
device=cpu
if epic_have_gpu; then
  epic_log "a GPU is visible, but this build has no CUDA backend yet: running on the CPU"
fi
epic_log "generating: epic-run --model $model --tokens $tokens --max-new-tokens $max_new"
exec "$EPIC_BUILD_DIR/worker/epic-run" --model "$model" --tokens "$tokens" \
  --max-new-tokens "$max_new" --device "$device" ${extra[@]+"${extra[@]}"}
