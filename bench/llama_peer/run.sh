#!/usr/bin/env bash
# epic against llama.cpp's CPU backend on the same checkpoint, taking turns on the same
# cores: model_bench and peer.mjs (node-llama-cpp's prebuilt llama.cpp libraries from
# npm) run the same prompt, decode and batch shapes, A B B A ..., and the medians and
# epic / llama.cpp ratios are printed, after a check that both give the same greedy
# tokens (see below). --work holds node-llama-cpp, the GGUF files and the logs
# (default build/llama_peer). --llama-threads gives llama.cpp its own thread count
# (default --threads): on a small host its spinning pool may decode faster on fewer.
#
#   bench/llama_peer/run.sh --model DIR [--precision exact|fast] [--rounds 2] [--threads 2]
#                           [--prompt 512] [--decode 32] [--batch 1,4,16] [--work DIR]
#                           [--llama-threads N]
#
# exact is compared with the checkpoint's BF16 matrices in llama.cpp (which rounds
# activations to BF16; epic keeps them F32), fast with Q8_0 (blocks of 32 int8 weights
# with a scale; epic's fast precision: a scale a weight row, one per 256 activation
# values). Needs Node.js >= 20 and npm (npm's registry once, for node-llama-cpp), and
# Debian's python3-numpy. Not part of CI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../launch/common.sh
source "$here/../../launch/common.sh"

model="" precision="exact" rounds=2 threads=2 prompt=512 decode=32 batch="1,4,16" llama_threads=""
work="$EPIC_BUILD_DIR/llama_peer"
node_llama_version="3.22.1"
# The comment block above, whatever its length.
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --llama-threads) llama_threads="$2"; shift 2 ;;
    --prompt) prompt="$2"; shift 2 ;;
    --decode) decode="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) epic_log "unknown argument: $1"; usage >&2; exit 2 ;;
  esac
done
[ -n "$model" ] || { epic_log "--model DIR is required"; usage >&2; exit 2; }
llama_threads="${llama_threads:-$threads}"
[ -f "$model/config.json" ] || { epic_log "$model: no config.json (not a checkpoint directory)"; exit 2; }
case "$precision" in exact) gguf_type=bf16 ;; fast) gguf_type=q8_0 ;;
  *) epic_log "--precision must be exact or fast, not '$precision'"; exit 2 ;; esac
command -v node >/dev/null && command -v npm >/dev/null || { epic_log "needs Node.js >= 20 and npm"; exit 1; }
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || { epic_log "needs Node.js >= 20 (node-llama-cpp), found $(node --version)"; exit 1; }
/usr/bin/python3 -c 'import numpy' 2>/dev/null || (EPIC_PACKAGES=(python3-numpy); epic_install_packages)

mkdir -p "$work"
if [ ! -d "$work/node_modules/node-llama-cpp" ]; then
  epic_log "installing node-llama-cpp $node_llama_version (prebuilt llama.cpp libraries) into $work"
  [ -f "$work/package.json" ] || echo '{"private": true}' > "$work/package.json"
  # No install scripts: the prebuilt CPU libraries ship in the package, nothing is built.
  (cd "$work" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --ignore-scripts --no-audit --no-fund \
     "node-llama-cpp@$node_llama_version" >&2)
fi
cp "$here/peer.mjs" "$work/peer.mjs"

gguf="$work/$(basename "$(cd "$model" && pwd)")-$gguf_type.gguf"
if [ ! -f "$gguf" ] || [ -n "$(find "$model" -name '*.safetensors' -newer "$gguf")" ]; then
  epic_log "writing $gguf"
  /usr/bin/python3 "$here/to_gguf.py" "$model" "$gguf" --type "$gguf_type"
fi
[ -x "$EPIC_BUILD_DIR/bench/model_bench" ] && [ -x "$EPIC_BUILD_DIR/worker/epic-run" ] || epic_build model_bench epic-run

# The same greedy tokens from both first, so the two run the same model: 64 prompt
# tokens, 8 generated. llama.cpp scores expert groups as DeepSeek-V3 does (the sum of a
# group's two best), V2's group_limited_greedy by the best alone: with n_group > 1 the
# routes, and so the tokens, may differ while the work per token is the same.
logs="$work/logs.$$"
mkdir -p "$logs"
/usr/bin/python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))["vocab_size"]
print(",".join(str((i * 7919 + 13) % v) for i in range(64)))' "$model/config.json" > "$logs/check_tokens"
epic_greedy="$("$EPIC_BUILD_DIR/worker/epic-run" --model "$model" --precision "$precision" --threads "$threads" \
  --tokens "$(cat "$logs/check_tokens")" --max-new-tokens 8 2>/dev/null)"
llama_greedy="$(node "$work/peer.mjs" "$gguf" --prompts "$logs/check_tokens" --greedy 8 --threads "$llama_threads" \
  2>/dev/null)"
read -r -a a <<< "$epic_greedy"; read -r -a b <<< "$llama_greedy"; agree=0
for i in "${!a[@]}"; do [ "${a[$i]}" = "${b[$i]:-}" ] || break; agree=$((agree + 1)); done
echo "greedy tokens after a 64-token prompt: epic [$epic_greedy], llama.cpp [$llama_greedy]: the first $agree of 8 agree"

run_epic() {
  "$EPIC_BUILD_DIR/bench/model_bench" --model "$model" --precision "$precision" --threads "$threads" \
    --prompt "$prompt" --decode "$decode" --repeats 2 --batch "$batch" --batch-steps 16
}
run_llama() {
  node "$work/peer.mjs" "$gguf" --prompt "$prompt" --decode "$decode" --repeats 2 --threads "$llama_threads" \
    --batch "$batch" --batch-steps 16
}
for r in $(seq 1 "$rounds"); do
  # A B B A: each side runs first in half of the rounds.
  if [ $((r % 2)) -eq 1 ]; then order="epic llama"; else order="llama epic"; fi
  for side in $order; do
    epic_log "round $r/$rounds: $side"
    "run_$side" > "$logs/$side.$r" 2>&1 || { cat "$logs/$side.$r" >&2; epic_log "$side failed"; exit 1; }
  done
done

/usr/bin/python3 - "$logs" "$rounds" "$batch" "$precision" "$gguf_type" <<'EOF'
import re, statistics, sys
logs, rounds, batches, precision, gguf_type = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4], sys.argv[5]
def figures(side, r):
    text = open(f"{logs}/{side}.{r}").read()
    out = {"prefill": float(re.search(r"prefill: .*?= ([0-9.]+) tok/s", text).group(1)),
           "decode": float(re.search(r"decode: ([0-9.]+) tok/s", text).group(1))}
    for b in batches:
        m = (re.search(rf"^ +{b} +([0-9.]+) ", text, re.M) if side == "epic"
             else re.search(rf"^batch {b}: ([0-9.]+) tok/s", text, re.M))
        out[f"B={b}"] = float(m.group(1))
    return out
runs = {s: [figures(s, r) for r in range(1, rounds + 1)] for s in ("epic", "llama")}
print(f"epic ({precision}) against llama.cpp ({gguf_type}), medians of {rounds} alternating runs; tok/s")
print(f"{'':10} {'epic':>10} {'llama.cpp':>10} {'ratio':>7}   per round")
for key in runs["epic"][0]:
    e = statistics.median(x[key] for x in runs["epic"])
    l = statistics.median(x[key] for x in runs["llama"])
    per = " ".join(f"{a[key] / b[key]:.2f}" for a, b in zip(runs["epic"], runs["llama"]))
    print(f"{key:10} {e:10.1f} {l:10.1f} {e / l:7.2f}   {per}")
EOF
epic_log "logs in $logs"
