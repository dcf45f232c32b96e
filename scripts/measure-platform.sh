#!/usr/bin/env bash
# Measures the speed-trap remedies of docs/performance.md on this machine, each in its own process:
# BLAS (reference vs OpenBLAS) and allocators (glibc default, glibc with Lockstep's thresholds,
# jemalloc, tcmalloc) on a ResNet-18 step; then a large all-reduce with and without the thresholds.
#   ./scripts/measure-platform.sh [build-dir]     (jemalloc/tcmalloc rows need libjemalloc2 / libtcmalloc-minimal4)
# build-dir (default build, in the checkout) is relative to the directory this is run from. A row
# whose library is not installed is skipped, saying so; a measurement that fails does not stop the
# others, and the script exits 1 when any failed.
set -uo pipefail
build=${1:-}
[[ -n $build && $build != /* ]] && build=$PWD/$build
cd "$(dirname "$0")/.." || exit 1
build=${build:-build}
bench="$build/benchmarks/platform_bench"
allreduce="$build/benchmarks/allreduce_bench"
# The library directory of this architecture, found as scripts/install-deps.sh finds it.
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null || true)
[[ -n $multiarch ]] || multiarch=$(uname -m)-linux-gnu   # gcc -print-multiarch prints nothing outside Debian
lib=/usr/lib/$multiarch
ref_blas="$lib/blas"
failed=()
# row LABEL COMMAND...: one measurement, its lines prefixed with LABEL; a failure is recorded.
row() {
  local label=$1 rc
  shift
  "$@" | sed "s/^/$label/"
  rc=${PIPESTATUS[0]}
  if [[ $rc != 0 ]]; then
    echo "${label}FAILED (exit $rc)"
    failed+=("${label%%:*} (exit $rc)")
  fi
}
skip() { echo "$1skipped: $2"; }

echo "== BLAS and allocators (1 process, 1 thread, width 64) =="
if [[ ! -x $bench ]]; then
  echo "no $bench: build it first (./scripts/build.sh), or name the build directory"
  failed+=("platform_bench (not built)")
else
  if [[ -f $ref_blas/libblas.so.3 ]]; then
    row "reference BLAS: " env LD_LIBRARY_PATH="$ref_blas" "$bench" --steps 3
  else
    skip "reference BLAS: " "no $ref_blas/libblas.so.3 (Debian's libblas3)"
  fi
  row "glibc default:   " "$bench" --no-tuning
  row "glibc tuned:     " "$bench"
  if [[ -f $lib/libjemalloc.so.2 ]]; then
    row "jemalloc:        " env LD_PRELOAD="$lib/libjemalloc.so.2" "$bench" --no-tuning
  else
    skip "jemalloc:        " "no $lib/libjemalloc.so.2 (install libjemalloc2)"
  fi
  if [[ -f $lib/libtcmalloc_minimal.so.4 ]]; then
    row "tcmalloc:        " env LD_PRELOAD="$lib/libtcmalloc_minimal.so.4" "$bench" --no-tuning
  else
    skip "tcmalloc:        " "no $lib/libtcmalloc_minimal.so.4 (install libtcmalloc-minimal4)"
  fi
fi

echo "== all-reduce, 2 ranks, 16 MiB .. 256 MiB =="
if [[ ! -x $allreduce ]]; then
  echo "no $allreduce: build it first (./scripts/build.sh), or name the build directory"
  failed+=("allreduce_bench (not built)")
else
  for tune in 0 1; do
    echo "-- LOCKSTEP_TUNE_MALLOC=$tune"
    if ! LOCKSTEP_TUNE_MALLOC=$tune ./scripts/mpirun.sh -x LOCKSTEP_TUNE_MALLOC -np 2 "$allreduce" \
           --min-bytes 16M --max-bytes 256M --factor 4 --repeats 3 --seconds 0.3; then
      echo "-- LOCKSTEP_TUNE_MALLOC=$tune: FAILED"
      failed+=("all-reduce with LOCKSTEP_TUNE_MALLOC=$tune")
    fi
  done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  printf -v list '%s; ' "${failed[@]}"
  echo "measure-platform: ${#failed[@]} measurement(s) failed: ${list%; }" >&2
  exit 1
fi
