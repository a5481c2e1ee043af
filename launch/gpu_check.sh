#!/usr/bin/env bash
# The CUDA backend's checks on a GPU machine that has CUDA, CMake and Python but no
# Debian packages (the lent device machines).
#
#   launch/gpu_check.sh --prepare
#       here, on a Debian machine: fetches GoogleTest, nlohmann-json, CLI11 and PCRE2 as .debs
#       and unpacks them into .gpu-deps/ (git ignores it; carry it to the GPU machine).
#   launch/gpu_check.sh [--arch 90a] [--layers N] [--quick]
#       on the GPU machine: builds with EPIC_WITH_SERVING=OFF into build-gpu/, runs the
#       CUDA tests, compares `epic-run --device cuda` logits with the CPU's, and runs the
#       GPU benchmarks. Logs go to $OUT (or build-gpu/logs); a summary is printed last.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
deps="$root/.gpu-deps"
arch=90a
layers=4
quick=0

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --arch SM (CUDA architecture, default $arch), --layers N (v2-lite-shape layers for"
  echo "         cuda_model_bench, default $layers; 0 skips it), --quick (fewer benchmark shapes)"
}

if [ "${1:-}" = "--prepare" ]; then
  set -e
  work="$(mktemp -d)"
  (cd "$work" && apt-get download libgtest-dev libgmock-dev nlohmann-json3-dev libcli11-dev libpcre2-dev)
  rm -rf "$deps" && mkdir -p "$deps"
  for deb in "$work"/*.deb; do dpkg -x "$deb" "$deps"; done
  rm -rf "$work"
  echo "gpu_check: unpacked into $deps ($(du -sh "$deps" | cut -f1)); carry .gpu-deps to the GPU machine"
  exit 0
fi
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
if [ ! -d "$deps/usr" ]; then
  echo "gpu_check: $deps is missing: run 'launch/gpu_check.sh --prepare' on a Debian machine and carry it" >&2
  exit 2
fi

logs="${OUT:-$root/build-gpu/logs}"
mkdir -p "$logs"
build="$root/build-gpu"
summary=()
step() {  # step NAME COMMAND...: runs it with its output in $logs/NAME.log
  local name="$1"; shift
  local start=$SECONDS
  if "$@" >"$logs/$name.log" 2>&1; then
    summary+=("ok    $name ($((SECONDS - start)) s)")
  else
    summary+=("FAIL  $name ($((SECONDS - start)) s): see $name.log")
    tail -n 30 "$logs/$name.log"
  fi
}

lib="$deps/usr/lib/x86_64-linux-gnu"
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
step configure cmake -S "$root" -B "$build" "${generator[@]}" -DEPIC_WITH_SERVING=OFF \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGTest_DIR="$lib/cmake/GTest" \
  -DCLI11_DIR="$deps/usr/share/cmake/CLI11" -Dnlohmann_json_DIR="$deps/usr/share/cmake/nlohmann_json" \
  -DEPIC_PCRE2_INCLUDE_DIR="$deps/usr/include" -DEPIC_PCRE2_LIBRARY="$lib/libpcre2-8.a"
step build cmake --build "$build" -j"$(nproc)"
nvidia-smi >"$logs/nvidia-smi.log" 2>&1

for test in cuda_ops_test cuda_moe_test cuda_gemm_test cuda_mla_test cuda_model_test; do
  [ -x "$build/tests/$test" ] || continue
  step "$test" "$build/tests/$test"
  # A binary whose cases all skipped also exits 0: say how many ran.
  summary+=("      $(grep -E '^\[ +(PASSED|SKIPPED|FAILED) +\] [0-9]+ test' "$logs/$test.log" | tr -s ' ' | paste -sd ';' -)")
done
step ctest_all ctest --test-dir "$build" -j"$(nproc)" --output-on-failure

# epic-run on the GPU against the CPU on a small random model: the prompt's logits.
model="$build/models/v2-160"
step mkmodel "$build/worker/epic-mkmodel" --preset v2-160 --seed 3 --out "$model"
prompt=5,17,300,2,9,44,100,7,8,1000,3,3,12
step run_cpu "$build/worker/epic-run" --model "$model" --tokens "$prompt" --max-new-tokens 8 \
  --dump-logits "$logs/cpu_logits.npy"
step run_cuda "$build/worker/epic-run" --model "$model" --tokens "$prompt" --max-new-tokens 8 \
  --device cuda --dump-logits "$logs/cuda_logits.npy"
step compare_logits python3 - "$logs/cpu_logits.npy" "$logs/cuda_logits.npy" <<'EOF'
import sys
import numpy as np
cpu, gpu = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
assert cpu.shape == gpu.shape, (cpu.shape, gpu.shape)
assert np.isfinite(gpu).all(), "non-finite logits on the GPU"
rel = np.abs(gpu - cpu).max(axis=1) / np.abs(cpu).max(axis=1)
print("per-position max |gpu - cpu| / max |cpu|:", " ".join(f"{r:.2e}" for r in rel))
print("argmax agreement:", float((gpu.argmax(axis=1) == cpu.argmax(axis=1)).mean()))
sys.exit(0 if rel.max() <= 5e-2 else 1)
EOF

bench_flags=()
[ "$quick" = 1 ] && bench_flags=(--quick)
[ -x "$build/bench/cuda_bench" ] && step cuda_bench "$build/bench/cuda_bench" "${bench_flags[@]}"
if [ "$layers" -gt 0 ]; then
  lite="$build/models/v2-lite-$layers"
  step mkmodel_lite "$build/worker/epic-mkmodel" --preset v2-lite-shape --layers "$layers" --out "$lite"
  step cuda_model_bench "$build/bench/cuda_model_bench" --model "$lite" --batch 1,8,64 --context 1024
fi

echo "gpu_check: logs in $logs"
for line in "${summary[@]}"; do echo "$line"; done
for f in cuda_bench cuda_model_bench compare_logits; do
  [ -f "$logs/$f.log" ] && { echo "--- $f"; tail -n 25 "$logs/$f.log"; }
done
printf '%s\n' "${summary[@]}" | grep -q '^FAIL' && exit 1
exit 0
