#!/usr/bin/env bash
# The test contract: on a fresh Debian 12 machine, installs what is missing, builds, and runs the
# whole test suite (single-process and multi-rank tests under mpirun at 2 and 3 ranks).
# LOCKSTEP_BUILD_DIR (default build, in the checkout) is relative to the directory this is run from.
set -euo pipefail
if [[ -n ${LOCKSTEP_BUILD_DIR:-} && ${LOCKSTEP_BUILD_DIR} != /* ]]; then
  # Exported absolute, so that build.sh (which reads it after its own cd) builds where this runs from.
  export LOCKSTEP_BUILD_DIR=$PWD/$LOCKSTEP_BUILD_DIR
fi
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
cd "${LOCKSTEP_BUILD_DIR:-build}"
ctest --output-on-failure -j "$(nproc)" "$@"
