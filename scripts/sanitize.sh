#!/usr/bin/env bash
# Builds Lockstep, its tests and examples with AddressSanitizer and UndefinedBehaviorSanitizer into
# build-asan/ (or $LOCKSTEP_BUILD_DIR) and runs the test suite there; arguments go to ctest, e.g.
#   ./scripts/sanitize.sh -R 'unit\.'        # only the single-process tests
#   ./scripts/sanitize.sh -L dist -j 1       # only the multi-rank ones
# Every rank of a multi-rank test is instrumented (mpirun passes the environment on). A report fails
# the test that caused it: ASan stops the process, and UBSan is told to stop at the first finding.
# Leak checking is off: OpenMPI and LibTorch keep memory until exit on purpose, which LeakSanitizer
# reports by the thousand. Not part of CI (a cold build takes about 35 minutes on 2 cores and the
# suite runs about twice as slowly); run it after changing threads, buffers or lifetimes.
set -euo pipefail
build_dir=${LOCKSTEP_BUILD_DIR:-}  # relative to the directory this is run from
[[ -n $build_dir && $build_dir != /* ]] && build_dir=$PWD/$build_dir
cd "$(dirname "$0")/.."
./scripts/install-deps.sh

build_dir=${build_dir:-build-asan}
sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
# RelWithDebInfo (-O2 -g): reports with lines, at near-Release speed. Benchmarks are left out (they
# are timed programs; the tests run the examples).
LOCKSTEP_BUILD_DIR=$build_dir ./scripts/build.sh \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$sanitizers" \
  -DCMAKE_EXE_LINKER_FLAGS="$sanitizers" \
  -DCMAKE_SHARED_LINKER_FLAGS="$sanitizers" \
  -DLOCKSTEP_BUILD_BENCHMARKS=OFF

# detect_leaks=0: see above. protect_shadow_gap=0: the CUDA runtime (the NCCL core's tests link it)
# maps memory where ASan would otherwise reserve its shadow gap.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:protect_shadow_gap=0:halt_on_error=1:detect_stack_use_after_return=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# The package test builds a program of its own against the installed library: with the same flags
# (CMake reads them from the environment), so that the sanitizers' runtime comes first in it too
# (without them it crashed at start-up, a harness artefact and not a finding).
export CXXFLAGS="$sanitizers" LDFLAGS="$sanitizers"
echo "sanitize.sh: ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS"
ctest --test-dir "$build_dir" --output-on-failure --timeout 900 "$@"
