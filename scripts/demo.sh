#!/usr/bin/env bash
# The demo contract: on a fresh Debian 12 machine, installs what is missing, builds, and runs the
# main job. Today that is the all-reduce benchmark on 2 ranks (Lockstep beside raw MPI_Allreduce).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
build=${LOCKSTEP_BUILD_DIR:-build}
./scripts/mpirun.sh -np 2 "$build/benchmarks/allreduce_bench" --max-bytes 64M --factor 4 --seconds 0.1 --repeats 3 "$@"
