#!/usr/bin/env bash
# `epic report` offline as a user runs it: a loads file in, the report out as JSON, text
# and HTML; a saved report rendered again; bad input gets a clear error and a non-zero exit.
set -euo pipefail
epic="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
python3 - "$dir/loads.json" <<'PY' 2>/dev/null || printf '{"layers": [1], "loads": [[%s]]}\n' "$(seq -s, 1 64)" > "$dir/loads.json"
import json, sys
loads = [[1000.0 / (1 + (e * 7 + l) % 64) ** 1.1 for e in range(64)] for l in range(3)]
json.dump({"layers": [1, 2, 3], "loads": loads}, open(sys.argv[1], "w"))
PY
fail() { echo "FAIL: $*"; exit 1; }

"$epic" report --input "$dir/loads.json" --ranks 4 --redundant-slots 2 --format json --out "$dir/report.json"
grep -q '"schema": "epic.load_report/1"' "$dir/report.json" || fail "no schema in the JSON report"
grep -q '"ranks": 4' "$dir/report.json" || fail "wrong ranks in the JSON report"
grep -q '"planned": 18' "$dir/report.json" || fail "16 + 2 planned slots per rank expected"

"$epic" report --input "$dir/loads.json" --ranks 4 > "$dir/report.txt"
grep -q "^epic load report: .*4 ranks, 64 experts" "$dir/report.txt" || fail "no header:"$'\n'"$(cat "$dir/report.txt")"
grep -Eq "^imbalance \(max/mean\) +[0-9]+\.[0-9]{3} +[0-9]+\.[0-9]{3}$" "$dir/report.txt" || fail "no overall imbalance"
[ "$(grep -Ec '^ +[123] +[0-9]+\.[0-9]{3} +[0-9]+\.[0-9]{3} ' "$dir/report.txt")" = 3 ] || fail "not one row per layer"

# A saved report renders again, to the same text.
"$epic" report --input "$dir/report.json" --format text > "$dir/again.txt"
grep -q "18 planned" "$dir/again.txt" || fail "the saved report was not rendered as saved"

"$epic" report --input "$dir/loads.json" --ranks 4 --format html --out "$dir/report.html"
head -c 15 "$dir/report.html" | grep -q "<!DOCTYPE html>" || fail "not an HTML document"
[ "$(grep -o "<svg" "$dir/report.html" | wc -l)" = 2 ] || fail "expected the heatmap and the rank bars"
grep -q "No imbalance history" "$dir/report.html" || fail "no word on the missing history"
! grep -q "http" "$dir/report.html" || fail "the page links elsewhere"

expect_error() {  # expect_error MESSAGE ARGS...: fails, says MESSAGE on stderr, prints nothing
  local message="$1"
  shift
  if "$epic" report "$@" > "$dir/out" 2> "$dir/err"; then fail "accepted: $*"; fi
  grep -q -- "$message" "$dir/err" || fail "unclear error for $*: $(cat "$dir/err")"
  [ ! -s "$dir/out" ] || fail "printed something for $*"
}
expect_error "give --ranks" --input "$dir/loads.json"
echo '{"loads": "x"}' > "$dir/bad.json"
expect_error 'expected {"loads"' --input "$dir/bad.json" --ranks 4
echo '{"schema": "epic.load_report/1", "model_type": "m"}' > "$dir/bad.json"
expect_error "load report: ranks: missing" --input "$dir/bad.json"
echo '{"loads": [[1, 2' > "$dir/bad.json"
expect_error "not valid JSON" --input "$dir/bad.json" --ranks 1
expect_error "cannot read" --input "$dir/missing.json"
expect_error "more than the 64 experts" --input "$dir/loads.json" --ranks 65
expect_error "groups (3) must divide" --input "$dir/loads.json" --ranks 4 --groups 3
expect_error "exactly one of --server" --format text
expect_error "excludes" --input "$dir/loads.json" --server 127.0.0.1:1 --ranks 4
expect_error "format" --input "$dir/loads.json" --ranks 4 --format pdf
expect_error "requires --input" --ranks 4
echo "5 passed, 0 failed"
