#!/usr/bin/env bash
# epic-run under real mpirun jobs, as a user runs it:
#  1. `mpirun -np N epic-run` prints the same greedy tokens as one process, N = 2, 3, 4, 8;
#  2. `mpirun -np 3 epic-run --prompt TEXT` prints the same text as one process;
#  3. several prompts of mixed lengths with --attention dp, on more ranks than heads,
#     print what one process prints (with --phase-times, a line of phase times from
#     every rank), and tp refuses more ranks than heads naming dp;
#  4. a rank that cannot load its checkpoint ends the whole job quickly, non-zero, with
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

batch=(--model "$dir/model" --tokens "5,17,300,42;9;100,200,300,400,500,600,700,800,900,11,12;77,78" \
  --max-new-tokens 6 --ignore-eos)
want_batch="$("$run" "${batch[@]}" 2>/dev/null)"
[ "$(echo "$want_batch" | wc -l)" -eq 4 ] || { echo "FAIL: one process printed '$want_batch' for 4 prompts"; exit 1; }
for n in 3 12; do
  got_batch="$(OMP_NUM_THREADS=1 "${mpi[@]}" -np "$n" "$run" "${batch[@]}" --attention dp --phase-times \
    2>"$dir/err.dp$n")" || { echo "FAIL: mpirun -np $n --attention dp exited non-zero"; cat "$dir/err.dp$n"; exit 1; }
  [ "$got_batch" = "$want_batch" ] || { echo "FAIL: -np $n dp printed '$got_batch', one process '$want_batch'"; exit 1; }
  for ((r = 0; r < n; ++r)); do
    grep -q "rank $r phase times (ms): attention .*lm_head" "$dir/err.dp$n" \
      || { echo "FAIL: -np $n dp --phase-times: no line from rank $r"; cat "$dir/err.dp$n"; exit 1; }
  done
  echo "ok: mpirun -np $n --attention dp: 4 prompts as one process prints them"
done
set +e
OMP_NUM_THREADS=1 "${mpi[@]}" -np 12 "$run" "${batch[@]}" >/dev/null 2>"$dir/err.tp12"
code=$?
set -e
[ "$code" -ne 0 ] && grep -q "cannot split 8 attention heads.*--attention dp" "$dir/err.tp12" \
  || { echo "FAIL: tp on 12 ranks of 8 heads was not refused naming dp"; cat "$dir/err.tp12"; exit 1; }
echo "ok: tp on 12 ranks of 8 heads refused, naming --attention dp"

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
echo "4 passed, 0 failed"
