#!/usr/bin/env bash
# A stand-in for ssh that makes this machine look like several hosts, for tests of
# multi-host launches: "fake_rsh.sh [-o OPTION ...] HOST COMMAND..." runs COMMAND here,
# unless HOST is listed (a line each) in the file $EPIC_FAKE_HOSTS_DOWN, when it fails
# as ssh does for a host that does not answer (exit 255). mpirun takes it as its agent
# (--mca plm_rsh_agent), launch/cluster.sh as its --host-check.
while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do
  case "$1" in -o|-p|-l|-i) shift 2 ;; *) shift ;; esac
done
host="$1"; shift
if [ -n "${EPIC_FAKE_HOSTS_DOWN:-}" ] && grep -qx "$host" "$EPIC_FAKE_HOSTS_DOWN" 2>/dev/null; then
  echo "ssh: connect to host $host port 22: No route to host" >&2
  exit 255
fi
exec bash -c "$*"
