#!/usr/bin/env bash
# epic-run under real mpirun jobs, as a user runs it:
#  1. `mpirun -np N epic-run` prints the same greedy tokens as one process, N = 2, 3, 4, 8;
#  2. `mpirun -np 3 epic-run --prompt TEXT` prints the same text as one process;
#  3. a rank that cannot load its checkpoint ends the whole job quickly, non-zero, with
#     that rank's error.
# Usage: mpirun_cli_test.sh EPIC_RUN EPIC_MKMODEL MPIRUN
set -euo pipefail
run="$1"; mkmodel="$2"; mpirun="$3"
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
mpi=("$mpirun" --allow-run-as-root --oversubscribe)

"$mkmodel" --preset v2-160 --seed 3 --set num_attention_heads=8 --out "$dir/model" 2>/dev/null
args=(--model "$dir/model" --tokens 5,17,300,42 --max-new-tokens 10 --ignore-eos)
want="$("$run" "${args[@]}" 2>/dev/null)"
[ -n "$want" ] || { echo "FAIL: one process printed no tokens"; exit 1; }
for n in 2 3 4 8; do
  got="$(OMP_NUM_THREADS=1 "${mpi[@]}" -np "$n" "$run" "${args[@]}" 2>"$dir/err.$n")" \
    || { echo "FAIL: mpirun -np $n exited non-zero"; cat "$dir/err.$n"; exit 1; }
  [ "$got" = "$want" ] || { echo "FAIL: -np $n printed '$got', one process '$want'"; exit 1; }
  grep -q "rank $((n - 1)) of $n holds" "$dir/err.$n" || { echo "FAIL: -np $n: no per-rank weight report"; exit 1; }
  echo "ok: mpirun -np $n: $got"
done

text_args=(--model "$dir/model" --prompt "Hello, 世界!" --max-new-tokens 10 --ignore-eos)
want_text="$("$run" "${text_args[@]}" 2>/dev/null)"
got_text="$(OMP_NUM_THREADS=1 "${mpi[@]}" -np 3 "$run" "${text_args[@]}" 2>"$dir/err.text")" \
  || { echo "FAIL: mpirun -np 3 --prompt exited non-zero"; cat "$dir/err.text"; exit 1; }
[ "$got_text" = "$want_text" ] || { echo "FAIL: -np 3 --prompt printed '$got_text', one process '$want_text'"; exit 1; }
echo "ok: mpirun -np 3 --prompt: the same text as one process"

start=$(date +%s)
set +e
OMP_NUM_THREADS=1 "${mpi[@]}" -np 1 "$run" "${args[@]}" : -np 1 "$run" --model "$dir/missing" \
  --tokens 5,17,300,42 --max-new-tokens 10 >/dev/null 2>"$dir/fail.err"
code=$?
set -e
took=$(( $(date +%s) - start ))
[ "$code" -ne 0 ] || { echo "FAIL: a job with a failing rank exited 0"; exit 1; }
grep -q "rank 1: NOT_FOUND: .*missing/config.json" "$dir/fail.err" \
  || { echo "FAIL: the failing rank's error is missing:"; cat "$dir/fail.err"; exit 1; }
[ "$took" -lt 30 ] || { echo "FAIL: the failing job took ${took}s to end"; exit 1; }
echo "ok: a failing rank ended the job in ${took}s with exit code $code"
echo "3 passed, 0 failed"
