#!/usr/bin/env bash
# Installs what is missing, builds, and runs every test with ctest.
#   launch/test.sh [ctest flags, e.g. -R Checkpoint]
set -euo pipefail
source "$(dirname "$0")/common.sh"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: launch/test.sh [CTEST_FLAGS...]  (build into build/, then ctest --output-on-failure)"
  echo "  EPIC_BUILD_DIR=DIR   build elsewhere;  EPIC_CMAKE_ARGS=-DEPIC_SANITIZE=ON  ASan/UBSan build"
  exit 0
fi
epic_build
cd "$EPIC_BUILD_DIR"
ctest --output-on-failure -j"$(nproc 2>/dev/null || echo 2)" "$@"
