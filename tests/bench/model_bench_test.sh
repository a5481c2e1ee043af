#!/usr/bin/env bash
# model_bench as a user runs it, on a small checkpoint and both precisions: prefill,
# decode and batched decode print their figures and ratios, the experts' read rate
# against a plain read of the same bytes after decode and after each batch size; a
# checkpoint that is not there is a clear error, before any probe runs.
set -euo pipefail
bench="$1"
mkmodel="$2"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; cat "$dir/out" "$dir/err" 2>/dev/null || true; exit 1; }
"$mkmodel" --preset v2-160 --out "$dir/model" >/dev/null 2>&1
passed=0
number='[0-9]+(\.[0-9]+)?'
for precision in exact fast; do
  "$bench" --model "$dir/model" --threads 2 --prompt 16 --decode 4 --repeats 2 --buffer-gib 0.03 \
    --batch 1,3 --batch-steps 2 --precision "$precision" >"$dir/out" 2>"$dir/err" ||
    fail "$precision: exit $?"
  grep -Eq "^prefill: 16 tokens in $number s \(median of 2\)" "$dir/out" || fail "$precision: no prefill line"
  grep -Eq "^decode: $number tok/s .* ratio $number" "$dir/out" || fail "$precision: no decode line"
  for b in 1 3; do
    grep -Eq "^ +$b +$number +$number +$number +$number/s +$number +(read|compute) +$number$" "$dir/out" ||
      fail "$precision: no row for batch $b"
  done
  # One after decode, one after each batch size: a rate in the steps, a plain read's, their ratio.
  experts="^  experts: $number GB/s in the steps; a plain read of the last step's [0-9]+ \($number MB\), a layer at a time, whole experts a thread: $number GB/s; $number of it$"
  [ "$(grep -Ec "$experts" "$dir/out")" = 3 ] || fail "$precision: expected 3 experts lines"
  passed=$((passed + 1))
done
start=$(date +%s)
if "$bench" --model "$dir/missing" >"$dir/out" 2>"$dir/err"; then fail "a missing checkpoint ran"; fi
grep -q "model_bench: .*$dir/missing/config.json" "$dir/err" || fail "unclear error for a missing checkpoint"
grep -q "^machine:" "$dir/out" && fail "probed the machine before finding the checkpoint missing"
passed=$((passed + 1))
echo "$passed passed, 0 failed ($(( $(date +%s) - start )) s for the missing checkpoint)"
