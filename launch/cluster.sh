#!/usr/bin/env bash
# Runs an epic cluster in the foreground: the coordinator, then the worker job under
# mpirun, relaunched with back-off whenever it dies. Ctrl-C or SIGTERM stops everything.
set -euo pipefail
source "$(dirname "$0")/common.sh"

usage() {
  cat <<USAGE
usage: launch/cluster.sh --model DIR [options] [-- EPIC_COORDINATOR_FLAGS...]

Starts build/coordinator/epic-coordinator on --port (gRPC) and --http-port (the
OpenAI-compatible HTTP API, tokenizing with the model's tokenizer.json), then
  mpirun -np N build/worker/epic-worker --model DIR --coordinator HOST:PORT
and relaunches that worker job (1 s, 2 s, 4 s ... up to 30 s apart) each time it exits,
logging why. A job the coordinator has dropped (a step ran past --step-timeout: a rank
stuck or stopped) is ended 2 s later, so that a hung rank cannot hold the cluster down. Prints "[epic] cluster ready" once the server reports SERVING. Call it with
  build/client/epic generate --server 127.0.0.1:PORT --prompt "Hello"
  curl http://127.0.0.1:HTTP_PORT/v1/completions -d '{"prompt": "Hello", "max_tokens": 16}'
Builds epic first unless --no-build (installing missing Debian packages as root).

  --model DIR            checkpoint directory (config.json + safetensors), on every host
  --np N                 worker ranks (default 4); may exceed the cores (oversubscribed)
  --port P               gRPC port of the coordinator (default 50051; 0: a free one)
  --http-port P          OpenAI-compatible HTTP port (default 8000; 0: a free one; off: none)
  --metrics-port P       Prometheus /metrics port (default 9400; 0: a free one)
  --listen-host H        address the coordinator binds (default 0.0.0.0)
  --coordinator-host H   address the workers dial (default 127.0.0.1; set it for multi-host)
  --hostfile FILE        worker hosts and slots (mpirun --hostfile), for several hosts
  --hosts LIST           or hosts inline: node1:8,node2:8 (mpirun -H)
  --host-check CMD       how a host is asked whether it answers before each launch:
                         'CMD HOST true' within 10 s (default: ssh -o BatchMode=yes
                         -o ConnectTimeout=5); hosts that do not answer are left out and
                         the job runs on the slots that remain (fewer ranks than --np if
                         need be); they rejoin when they answer again. This machine's own
                         names are never asked
  --threads T            OpenMP threads per rank (default: cores / ranks, at least 1)
  --device cpu|cuda      compute device of the workers (default cpu)
  --attention tp|dp      how the ranks share attention (default tp): tp splits each sequence's
                         heads (at most as many ranks as heads; every rank caches every
                         sequence); dp gives each sequence to one rank (any number of ranks;
                         each rank holds --cache-blocks of its own: ranks times the context)
  --precision exact|fast how the CPU workers compute their products (default exact): fast
                         quantizes the weights to int8 at load (AVX2 or wider; half the
                         memory, ~2x decode, 2-3x prefill; see epic-worker --help)
  --tcp-if IFACE         network interface(s) for MPI traffic (see launch/distributed.sh)
  --mpirun-arg ARG       pass ARG to mpirun as is (repeatable)
  --ready-file FILE      also write {"port": P, "metrics_port": M, "http_port": H} there once serving
  --max-restarts N       give up after N relaunches in a row that did not attach (default: never)
  --no-build             use the binaries in the build directory as they are
  -- FLAGS               more epic-coordinator flags (see its --help), e.g. -- --cache-blocks 4096
USAGE
}

model="" np=4 port=50051 http_port=8000 metrics_port=9400 listen_host=0.0.0.0 coord_host=127.0.0.1
hostfile="" hosts="" host_check="ssh -o BatchMode=yes -o ConnectTimeout=5" threads="" device=cpu attention=tp precision=exact tcp_if="" ready_file="" max_restarts=-1 build=1
mpirun_extra=() coord_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --np) np="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --metrics-port) metrics_port="$2"; shift 2 ;;
    --http-port) http_port="$2"; shift 2 ;;
    --listen-host) listen_host="$2"; shift 2 ;;
    --coordinator-host) coord_host="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --hosts) hosts="$2"; shift 2 ;;
    --host-check) host_check="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --attention) attention="$2"; shift 2 ;;
    --precision) precision="$2"; shift 2 ;;
    --tcp-if) tcp_if="$2"; shift 2 ;;
    --mpirun-arg) mpirun_extra+=("$2"); shift 2 ;;
    --ready-file) ready_file="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; coord_args=("$@"); break ;;
    *) epic_log "unknown flag $1 (see --help)"; exit 2 ;;
  esac
done
[ -n "$model" ] || { usage >&2; exit 2; }
[ "$np" -ge 1 ] 2>/dev/null || { epic_log "--np must be a positive integer, not '$np'"; exit 2; }
case "$attention" in tp|dp) ;; *) epic_log "--attention must be tp or dp, not '$attention'"; exit 2 ;; esac
case "$precision" in exact|fast) ;; *) epic_log "--precision must be exact or fast, not '$precision'"; exit 2 ;; esac
[ -f "$model/config.json" ] || { epic_log "--model $model: no config.json there"; exit 2; }
[ "$build" -eq 0 ] || epic_build epic-coordinator epic-worker epic

bin="$EPIC_BUILD_DIR"
state="$(mktemp -d "${TMPDIR:-/tmp}/epic-cluster.XXXXXX")"
coord_pid="" worker_pid="" watcher_pid=""
# PID's process, given up to SECONDS to exit after SIGTERM, then killed.
stop_process() {
  local pid="$1" seconds="$2"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 $((seconds * 10))); do
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  epic_log "process $pid did not stop within $seconds s; killing it"
  kill_job "$pid"
  wait "$pid" 2>/dev/null || true
}
stop() {
  trap - INT TERM EXIT
  epic_log "stopping the cluster"
  # The coordinator first: it drains what runs (--drain-timeout), then the job follows.
  kill "$watcher_pid" 2>/dev/null || true
  stop_process "$coord_pid" 60
  stop_process "$worker_pid" 10
  rm -rf "$state"
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

# A fresh secret per cluster: only worker jobs started here can attach.
(umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$state/secret")

# Text in and out when the checkpoint carries its tokenizer; token ids only otherwise.
text_args=()
if [ -f "$model/tokenizer.json" ]; then
  text_args=(--tokenizer "$model")
else
  epic_log "--model $model has no tokenizer.json: the cluster takes token ids only"
fi
http_listen="$listen_host:$http_port"
[ "$http_port" = "off" ] && http_listen=off
"$bin/coordinator/epic-coordinator" --listen "$listen_host:$port" --http-listen "$http_listen" \
  --metrics-listen "$listen_host:$metrics_port" --worker-secret-file "$state/secret" \
  --ready-file "$state/ready.json" ${text_args[@]+"${text_args[@]}"} ${coord_args[@]+"${coord_args[@]}"} &
coord_pid=$!
port="$(epic_wait_ready "$state/ready.json" "$coord_pid" 10 "the coordinator")" || exit 1

if [ -z "$threads" ]; then
  threads=$(( $(nproc) / np )); [ "$threads" -ge 1 ] || threads=1
fi
mpirun_cmd=(mpirun --bind-to none -x "OMP_NUM_THREADS=$threads")
[ "$(id -u)" -eq 0 ] && mpirun_cmd+=(--allow-run-as-root)
[ "$np" -gt "$(nproc)" ] && mpirun_cmd+=(--oversubscribe)
[ -n "$tcp_if" ] && mpirun_cmd+=(--mca btl_tcp_if_include "$tcp_if" --mca oob_tcp_if_include "$tcp_if")
mpirun_cmd+=(${mpirun_extra[@]+"${mpirun_extra[@]}"})
worker_cmd=("$bin/worker/epic-worker" --model "$model" --coordinator "$coord_host:$port"
  --secret-file "$state/secret" --device "$device" --attention "$attention" --precision "$precision")

# Announces readiness once the server says SERVING (a background watcher, once).
(
  for _ in $(seq 1 6000); do
    kill -0 "$coord_pid" 2>/dev/null || exit 0
    if "$bin/client/epic" health --server "127.0.0.1:$port" >/dev/null 2>&1; then
      # Whole or not at all: readers poll for the file and read it as soon as it exists.
      [ -n "$ready_file" ] && cp "$state/ready.json" "$ready_file.tmp" && mv -f "$ready_file.tmp" "$ready_file"
      http="$(sed -E 's/.*"http_port": ([0-9]+).*/\1/' "$state/ready.json")"
      epic_log "cluster ready: gRPC on port $port, HTTP on port $http ($np worker rank(s)); try: $bin/client/epic generate --server 127.0.0.1:$port --prompt Hello"
      exit 0
    fi
    sleep 0.2
  done
) &
watcher_pid=$!

# What the coordinator says of the worker job: "ATTACHED ATTACHMENTS" (1 or 0, and how
# many jobs have attached so far), or "" when it cannot be asked.
job_state() {
  local info
  info="$("$bin/client/epic" info --server "127.0.0.1:$port" --timeout 2 2>/dev/null)" || return 0
  local n
  n="$(printf '%s' "$info" | tr -d '\n' | sed -nE 's/.*"worker_attachments": "?([0-9]+)"?.*/\1/p')"
  if printf '%s' "$info" | grep -q '"worker_attached": true'; then echo "1 ${n:-0}"; else echo "0 ${n:-0}"; fi
}
attachments() { job_state | cut -d' ' -f2; }

# Ends the worker job at once: its local processes first (a stopped rank ignores
# SIGTERM, and mpirun waits for it), then mpirun, whose daemons end the remote ranks.
kill_job() {
  pkill -KILL -P "$1" 2>/dev/null || true
  kill -KILL "$1" 2>/dev/null || true
}

# Waits for the job PID; ends it when the coordinator has dropped it (a step timed out:
# a rank stuck or stopped) and it is still there 2 s later. Sets CODE.
wait_job() {
  local pid="$1" attached=0 dropped=0 answer tick=0
  while kill -0 "$pid" 2>/dev/null; do
    sleep 0.1
    # The coordinator is asked once a second; a job that exits is seen within 0.1 s.
    tick=$((tick + 1))
    [ $((tick % 10)) -eq 0 ] || continue
    answer="$(job_state)"  # not "state": stop(), run from a trap in here, removes $state
    if [ "${answer%% *}" = "1" ]; then
      attached=1 dropped=0
    elif [ "$attached" -eq 1 ] && [ "${answer%% *}" = "0" ]; then
      dropped=$((dropped + 1))
      if [ "$dropped" -ge 2 ]; then
        epic_log "the coordinator dropped the worker job (a step timed out) and it is still running: ending it"
        kill_job "$pid"
      fi
    fi
  done
  set +e
  wait "$pid"
  code=$?
  set -e
}

# The worker hosts as "HOST SLOTS" lines, from --hostfile or --hosts (a host without a
# slot count has one slot).
host_list() {
  if [ -n "$hostfile" ]; then
    sed -e 's/#.*//' "$hostfile" | awk 'NF { slots = 1; for (i = 2; i <= NF; i++) if ($i ~ /^(max_)?slots=/) { split($i, kv, "="); slots = kv[2] } print $1, slots }'
  else
    tr ',' '\n' <<<"$hosts" | awk -F: 'NF { print $1, ($2 == "" ? 1 : $2) }'
  fi
}
is_local_host() {
  case "$1" in localhost|127.*|::1|"$(hostname)"|"$(hostname -f 2>/dev/null)") return 0 ;; esac
  return 1
}
# Chooses this launch's hosts: those that answer (this machine always does), written to
# $state/hosts; sets RANKS to --np or the slots that remain, whichever is fewer (0: none).
choose_hosts() {
  : >"$state/hosts"
  local host slots total=0
  while read -r host slots; do
    if ! is_local_host "$host" && ! timeout 10 $host_check "$host" true </dev/null >/dev/null 2>&1; then
      epic_log "host $host does not answer ($host_check $host true): leaving it out of this launch"
      continue
    fi
    echo "$host slots=$slots" >>"$state/hosts"
    total=$((total + slots))
  done < <(host_list)
  ranks=$np
  if [ "$total" -lt "$np" ]; then
    ranks=$total
    [ "$ranks" -gt 0 ] && epic_log "launching $ranks rank(s), not $np: only $total slot(s) on the hosts that answer"
  fi
}

backoff=1 failures=0
while kill -0 "$coord_pid" 2>/dev/null; do
  ranks=$np
  host_args=()
  if [ -n "$hostfile$hosts" ]; then
    choose_hosts
    host_args=(--hostfile "$state/hosts")
  fi
  if [ "$ranks" -lt 1 ]; then
    epic_log "no worker host answers; asking again in ${backoff} s"
    sleep "$backoff"
    backoff=$(( backoff * 2 > 30 ? 30 : backoff * 2 ))
    continue
  fi
  launch=("${mpirun_cmd[@]}" -np "$ranks" ${host_args[@]+"${host_args[@]}"})
  epic_log "starting the worker job: ${launch[*]} ${worker_cmd[*]}"
  started=$(date +%s)
  attached_before="$(attachments)"
  "${launch[@]}" "${worker_cmd[@]}" &
  worker_pid=$!
  wait_job "$worker_pid"
  worker_pid=""
  kill -0 "$coord_pid" 2>/dev/null || break
  if [ "$code" -eq 4 ]; then
    epic_log "the coordinator refused the worker job (wrong secret, or a model it cannot serve): not relaunching"
    exit 1
  fi
  # A job that attached (it served), or ran a while, was healthy: relaunch at once, and
  # start the back-off afresh; only jobs that fail before serving wait longer and longer.
  healthy=0
  attached_after="$(attachments)"
  if [ $(( $(date +%s) - started )) -ge 10 ] ||
     { [ -n "$attached_after" ] && [ "$attached_after" -gt "${attached_before:-0}" ]; }; then
    backoff=1 failures=0 healthy=1
  fi
  failures=$((failures + 1))
  if [ "$max_restarts" -ge 0 ] && [ "$failures" -gt "$max_restarts" ]; then
    epic_log "the worker job failed $failures time(s) in a row; giving up"
    exit 1
  fi
  if [ "$healthy" -eq 1 ]; then
    epic_log "the worker job exited with code $code; relaunching now"
    continue
  fi
  epic_log "the worker job exited with code $code; relaunching in ${backoff} s"
  sleep "$backoff"
  backoff=$(( backoff * 2 > 30 ? 30 : backoff * 2 ))
done
epic_log "the coordinator exited"
wait "$coord_pid" 2>/dev/null || true
