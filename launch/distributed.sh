#!/usr/bin/env bash
# Runs epic-run as an mpirun job over one host or many: attention heads, vocabulary and
# experts are split across the ranks; rank 0 prints the outputs.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: launch/distributed.sh --model DIR --np N [options] [-- EPIC_RUN_FLAGS...]

Builds epic if needed (installing missing Debian packages as root), then starts
  mpirun -np N build/worker/epic-run --model DIR EPIC_RUN_FLAGS...
One host by default; for several, every host needs the same build and model paths (a
shared file system, or the same checkout and model copied to each) and password-less ssh.

  --model DIR          checkpoint directory (on every host)
  --np N               ranks (processes); N may exceed the cores (oversubscribed)
  --hostfile FILE      hosts and slots, one per line: "node1 slots=8" (mpirun --hostfile)
  --hosts LIST         or hosts inline: node1:8,node2:8 (mpirun -H)
  --threads T          OpenMP threads per rank (default: cores / ranks on one host, at least 1)
  --tcp-if IFACE       network interface(s) for MPI's TCP traffic, e.g. eth0 or 10.0.0.0/24
                       (btl_tcp_if_include and oob_tcp_if_include), for hosts with several
  --mpirun-arg ARG     pass ARG to mpirun as is (repeatable), e.g. --mpirun-arg --map-by=node
  --dry-run            print the mpirun command instead of running it
  -- FLAGS             epic-run flags (see build/worker/epic-run --help), e.g.
                       -- --tokens 5,17,300 --max-new-tokens 16
USAGE
}

model="" np="" hostfile="" hosts="" threads="" tcp_if="" dry_run=0
mpirun_extra=() run_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --np) np="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --tcp-if) tcp_if="$2"; shift 2 ;;
    --mpirun-arg) mpirun_extra+=("$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; run_args=("$@"); break ;;
    *) epic_log "unknown flag $1 (see --help)"; exit 2 ;;
  esac
done
[ -n "$model" ] && [ -n "$np" ] || { usage >&2; exit 2; }
[ "$np" -ge 1 ] 2>/dev/null || { epic_log "--np must be a positive integer, not '$np'"; exit 2; }

[ "$dry_run" -eq 1 ] || epic_build
cores="$(nproc 2>/dev/null || echo 1)"
if [ -z "$threads" ]; then
  threads=$(( cores / np )); [ "$threads" -ge 1 ] || threads=1
fi
# --bind-to none: Open MPI binds each rank to one core by default (np <= 2), which
# would put all of a rank's OpenMP threads on that core.
cmd=(mpirun -np "$np" --oversubscribe --bind-to none -x "OMP_NUM_THREADS=$threads")
[ "$(id -u)" -ne 0 ] || cmd+=(--allow-run-as-root)
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$hosts" ] || cmd+=(-H "$hosts")
[ -z "$tcp_if" ] || cmd+=(--mca btl_tcp_if_include "$tcp_if" --mca oob_tcp_if_include "$tcp_if")
cmd+=(${mpirun_extra[@]+"${mpirun_extra[@]}"} "$EPIC_BUILD_DIR/worker/epic-run" --model "$model"
      --threads "$threads" ${run_args[@]+"${run_args[@]}"})
if [ "$dry_run" -eq 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
epic_log "running: ${cmd[*]}"
exec "${cmd[@]}"
