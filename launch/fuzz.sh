#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ (clang, ASan and UBSan) and runs each for a bounded
# time from a copy of its checked-in corpus; fails naming the target and the crash file.
# See fuzz/README.md.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
usage: launch/fuzz.sh [OPTIONS] [SECONDS_PER_TARGET]

Builds fuzz/'s targets with clang (-DEPIC_FUZZ=ON: libFuzzer, AddressSanitizer and
UndefinedBehaviorSanitizer) and runs each for SECONDS_PER_TARGET seconds (default 20) from a
copy of fuzz/corpus/<target>/, with -rss_limit_mb=2048 -timeout=5. The checked-in corpus is
never written. Exits 1 naming the target and its crash file (crash-*, leak-*, timeout-*,
oom-*) when any target finds one, 2 on a usage error.

  SECONDS_PER_TARGET   fuzzing time of each target, in seconds (default 20)
  --targets A,B,...    run only these targets (names as in fuzz/corpus/, e.g. model_config)
  --list               print the targets and exit
  --build-only         configure and build, run nothing
  -h, --help           this text

Environment:
  EPIC_FUZZ_BUILD_DIR  build folder (default: build-fuzz/ under the repository root);
                       each target's run (corpus copy, log, crash files) goes to
                       \$EPIC_FUZZ_BUILD_DIR/runs/<target>/, emptied at its start
  EPIC_FUZZ_ARGS       more libFuzzer flags for every target (e.g. -timeout=1 -jobs=2)
  EPIC_CMAKE_ARGS      more CMake flags for the configure step

Reproduce a crash: \$EPIC_FUZZ_BUILD_DIR/fuzz/fuzz_<target> CRASH_FILE
EOF
}

seconds=20
only=""
build_only=0
list=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --targets) [ $# -ge 2 ] || { usage >&2; exit 2; }; only="$2"; shift 2 ;;
    --targets=*) only="${1#--targets=}"; shift ;;
    --list) list=1; shift ;;
    --build-only) build_only=1; shift ;;
    -*) epic_log "unknown option $1"; usage >&2; exit 2 ;;
    *)
      [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ] || { epic_log "SECONDS_PER_TARGET must be a positive integer, not '$1'"; exit 2; }
      seconds="$1"; shift ;;
  esac
done

corpus_root="$EPIC_ROOT/fuzz/corpus"
all_targets=()
for d in "$corpus_root"/*/; do all_targets+=("$(basename "$d")"); done
if [ "$list" = 1 ]; then
  printf '%s\n' "${all_targets[@]}"
  exit 0
fi
targets=("${all_targets[@]}")
if [ -n "$only" ]; then
  IFS=',' read -r -a targets <<<"$only"
  for t in "${targets[@]}"; do
    [ -d "$corpus_root/$t" ] || { epic_log "unknown target '$t' (known: ${all_targets[*]})"; exit 2; }
  done
fi

# clang and its libFuzzer/sanitizer runtimes, beside what the build needs anyway.
EPIC_PACKAGES+=(clang libclang-rt-dev)
epic_install_packages
build="${EPIC_FUZZ_BUILD_DIR:-$EPIC_ROOT/build-fuzz}"
jobs="$(nproc 2>/dev/null || echo 2)"
start=$(date +%s)
epic_log "fuzz: configuring and building in $build (clang, -j$jobs)"
mkdir -p "$build"
# shellcheck disable=SC2086
cmake -S "$EPIC_ROOT" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DEPIC_FUZZ=ON -DEPIC_WITH_CUDA=OFF -DEPIC_WITH_SERVING=ON -DEPIC_BUILD_TESTS=OFF -DEPIC_BUILD_BENCH=OFF \
  ${EPIC_CMAKE_ARGS:-} >"$build/configure.log" 2>&1 \
  || { cat "$build/configure.log" >&2; epic_log "fuzz: configure failed"; exit 1; }
cmake --build "$build" -j"$jobs" --target fuzz >"$build/build.log" 2>&1 \
  || { tail -n 60 "$build/build.log" >&2; epic_log "fuzz: build failed (log: $build/build.log)"; exit 1; }
epic_log "fuzz: built in $(( $(date +%s) - start )) s"
[ "$build_only" = 1 ] && exit 0

failed=()
for t in "${targets[@]}"; do
  bin="$build/fuzz/fuzz_$t"
  [ -x "$bin" ] || { epic_log "fuzz: $t: no binary $bin"; failed+=("$t: not built"); continue; }
  run="$build/runs/$t"
  rm -rf "$run"
  mkdir -p "$run/corpus"
  cp "$corpus_root/$t"/* "$run/corpus/"
  seeds=$(find "$run/corpus" -type f | wc -l)
  epic_log "fuzz: $t: ${seconds} s from $seeds seeds"
  rc=0
  # shellcheck disable=SC2086
  (cd "$run" && "$bin" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=5 -print_final_stats=1 \
    -artifact_prefix="$run/" ${EPIC_FUZZ_ARGS:-} corpus >"$run/log" 2>&1) || rc=$?
  artifacts=$(find "$run" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
    -o -name 'oom-*' \) | sort)
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$run/log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$run/log" | tail -n 1 | cut -d' ' -f2)
  found=$(find "$run/corpus" -type f | wc -l)
  if [ -n "$artifacts" ] || [ "$rc" -ne 0 ]; then
    # The report: from the first line of the sanitizer's, libFuzzer's or the check's.
    first=$(grep -n -m 1 -E '^==[0-9]+==|runtime error:|fuzz invariant failed|^ALARM:|out-of-memory|deadly signal' \
      "$run/log" | cut -d: -f1)
    tail -n +"${first:-1}" "$run/log" | head -n 60 >&2
    while IFS= read -r a; do
      [ -z "$a" ] || epic_log "fuzz: $t FOUND A BUG: $a (reproduce: $bin $a)"
    done <<<"$artifacts"

    [ -n "$artifacts" ] || epic_log "fuzz: $t exited $rc without a crash file (log: $run/log)"
    failed+=("$t: ${artifacts:-exit $rc}")
  else
    epic_log "fuzz: $t: ok, ${runs:-?} runs, coverage ${cov:-?}, corpus $seeds -> $found"
  fi
done

epic_log "fuzz: ${#targets[@]} target(s) in $(( $(date +%s) - start )) s"
if [ ${#failed[@]} -gt 0 ]; then
  for f in "${failed[@]}"; do epic_log "fuzz: FAILED $f"; done
  exit 1
fi
