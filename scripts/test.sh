#!/usr/bin/env bash
# The test contract: on a fresh Debian 12 machine, installs what is missing, builds, and runs the
# whole test suite (single-process and multi-rank tests under mpirun at 2 and 3 ranks).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
cd "${LOCKSTEP_BUILD_DIR:-build}"
ctest --output-on-failure -j "$(nproc)" "$@"
