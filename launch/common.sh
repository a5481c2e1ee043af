# Shared by the launch scripts: install what is missing, configure and build.
# Sourced, not run. EPIC_BUILD_DIR (default build/) and EPIC_CMAKE_ARGS may be set.

EPIC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EPIC_BUILD_DIR="${EPIC_BUILD_DIR:-$EPIC_ROOT/build}"

# Debian packages the build needs (the model core needs only a compiler, CMake and
# two header-only libraries; serving needs MPI, gRPC, Protobuf and prometheus-cpp;
# text needs PCRE2 and, for serving, cpp-httplib; the tests need GoogleTest, openssl for a
# TLS certificate, curl, and Debian's python3 with jinja2 and regex as independent peers).
EPIC_PACKAGES=(build-essential cmake pkg-config nlohmann-json3-dev libcli11-dev libpcre2-dev libgtest-dev python3-jinja2 python3-regex
  libopenmpi-dev openmpi-bin libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libcpp-httplib-dev openssl curl)

epic_log() { printf '[epic] %s\n' "$*" >&2; }

epic_install_packages() {
  local missing=()
  for pkg in "${EPIC_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  epic_log "installing: ${missing[*]}"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { epic_log "need root (or sudo) to install: ${missing[*]}"; return 1; }
    sudo="sudo"
  fi
  $sudo apt-get update -qq || return 1
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    || { epic_log "apt-get install failed for: ${missing[*]}"; return 1; }
}

# epic_build [TARGET...]: configure, then build the targets named (everything without any).
epic_build() {
  epic_install_packages || return 1
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  local jobs
  jobs="$(nproc 2>/dev/null || echo 2)"
  epic_log "configuring and building in $EPIC_BUILD_DIR (-j$jobs)"
  # shellcheck disable=SC2086
  cmake -S "$EPIC_ROOT" -B "$EPIC_BUILD_DIR" -DCMAKE_BUILD_TYPE=Release \
    ${EPIC_CMAKE_ARGS:-} >"$EPIC_BUILD_DIR.configure.log" 2>&1 \
    || { cat "$EPIC_BUILD_DIR.configure.log" >&2; epic_log "configure failed"; return 1; }
  # Build output goes to stderr: stdout is for what the scripts produce (generated text).
  cmake --build "$EPIC_BUILD_DIR" -j"$jobs" ${targets[@]+"${targets[@]}"} >&2 || { epic_log "build failed"; return 1; }
}

# Whether an NVIDIA GPU is visible.
epic_have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# Waits up to SECONDS for FILE, the --ready-file of the process PID, and prints the gRPC
# port written there. Fails (with WHAT named in the log) when PID exits first or time runs out.
epic_wait_ready() {
  local file="$1" pid="$2" seconds="$3" what="$4"
  local tries=$((seconds * 10))
  for _ in $(seq 1 "$tries"); do
    if [ -f "$file" ]; then
      sed -E 's/.*"port": ([0-9]+).*/\1/' "$file"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { epic_log "$what failed to start"; return 1; }
    sleep 0.1
  done
  epic_log "$what was not ready within $seconds s"
  return 1
}

# epic_start_cluster WORK [launch/cluster.sh flags...] [-- coordinator flags...]: a local
# cluster of the built binaries (loopback, free ports, no HTTP), its log in WORK/cluster.log.
# Sets EPIC_CLUSTER_PID, and EPIC_CLUSTER_PORT once it serves; fails, showing the log, if
# it does not within 300 s. epic_stop_cluster ends it (safe to call twice, or from a trap).
epic_start_cluster() {
  local work="$1"
  shift
  rm -f "$work/ready.json"
  EPIC_BUILD_DIR="$EPIC_BUILD_DIR" "$EPIC_ROOT/launch/cluster.sh" --port 0 --http-port off --metrics-port 0 \
    --listen-host 127.0.0.1 --no-build --ready-file "$work/ready.json" "$@" >"$work/cluster.log" 2>&1 &
  EPIC_CLUSTER_PID=$!
  EPIC_CLUSTER_PORT="$(epic_wait_ready "$work/ready.json" "$EPIC_CLUSTER_PID" 300 "the cluster")" ||
    { cat "$work/cluster.log" >&2; return 1; }
}

epic_stop_cluster() {
  [ -n "${EPIC_CLUSTER_PID:-}" ] || return 0
  kill -TERM "$EPIC_CLUSTER_PID" 2>/dev/null || true
  wait "$EPIC_CLUSTER_PID" 2>/dev/null || true
  EPIC_CLUSTER_PID=""
}
