#!/usr/bin/env bash
# `epic plan` as a user runs it: a loads file in, a plan file out with the placement and
# the imbalance before and after; bad input gets a clear error and a non-zero exit.
set -euo pipefail
epic="$1"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
python3 - "$dir/loads.json" <<'PY' 2>/dev/null || printf '{"loads": [[%s]]}\n' "$(seq -s, 1 64)" > "$dir/loads.json"
import json, sys
loads = [[1000.0 / (1 + (e * 7 + l) % 64) ** 1.1 for e in range(64)] for l in range(3)]
json.dump({"loads": loads}, open(sys.argv[1], "w"))
PY
"$epic" plan --loads "$dir/loads.json" --ranks 4 --slots-per-rank 18 --out "$dir/plan.json" 2>"$dir/err"
grep -q '"placement"' "$dir/plan.json" || { echo "FAIL: no placement in the plan"; exit 1; }
grep -q '"imbalance_after"' "$dir/plan.json" || { echo "FAIL: no imbalance in the plan"; exit 1; }
grep -q "imbalance .* -> " "$dir/err" || { echo "FAIL: no summary line"; cat "$dir/err"; exit 1; }
# Re-planned from itself, nothing moves.
"$epic" plan --loads "$dir/loads.json" --ranks 4 --slots-per-rank 18 --current "$dir/plan.json" \
  --out "$dir/again.json" 2>/dev/null
grep -q '"experts_moved": 0' "$dir/again.json" || { echo "FAIL: re-planning moved experts"; exit 1; }
echo '{"loads": "x"}' > "$dir/bad.json"
if "$epic" plan --loads "$dir/bad.json" --ranks 4 --slots-per-rank 18 --out "$dir/x.json" 2>"$dir/err"; then
  echo "FAIL: bad loads accepted"; exit 1
fi
grep -q "expected {\"loads\"" "$dir/err" || { echo "FAIL: unclear error:"; cat "$dir/err"; exit 1; }
if "$epic" plan --loads "$dir/loads.json" --ranks 4 --slots-per-rank 10 --out "$dir/x.json" 2>"$dir/err"; then
  echo "FAIL: too few slots accepted"; exit 1
fi
grep -q "cannot hold 64 experts" "$dir/err" || { echo "FAIL: unclear error:"; cat "$dir/err"; exit 1; }
echo "3 passed, 0 failed"
