#!/usr/bin/env bash
# Measures the speed-trap remedies of docs/performance.md on this machine, each in its own process:
# BLAS (reference vs OpenBLAS) and allocators (glibc default, glibc with Lockstep's thresholds,
# jemalloc, tcmalloc) on a ResNet-18 step; then a large all-reduce with and without the thresholds.
#   ./scripts/measure-platform.sh [build-dir]     (jemalloc/tcmalloc rows need libjemalloc2 / libtcmalloc-minimal4)
set -uo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
bench="$build/benchmarks/platform_bench"
lib=/usr/lib/x86_64-linux-gnu
ref_blas="$lib/blas"
echo "== BLAS and allocators (1 process, 1 thread, width 64) =="
[ -f "$ref_blas/libblas.so.3" ] && LD_LIBRARY_PATH="$ref_blas" "$bench" --steps 3 | sed 's/^/reference BLAS: /'
"$bench" --no-tuning | sed 's/^/glibc default:   /'
"$bench" | sed 's/^/glibc tuned:     /'
[ -f "$lib/libjemalloc.so.2" ] && LD_PRELOAD="$lib/libjemalloc.so.2" "$bench" --no-tuning | sed 's/^/jemalloc:        /'
[ -f "$lib/libtcmalloc_minimal.so.4" ] && LD_PRELOAD="$lib/libtcmalloc_minimal.so.4" "$bench" --no-tuning | sed 's/^/tcmalloc:        /'
echo "== all-reduce, 2 ranks, 16 MiB .. 256 MiB =="
for tune in 0 1; do
  echo "-- LOCKSTEP_TUNE_MALLOC=$tune"
  LOCKSTEP_TUNE_MALLOC=$tune ./scripts/mpirun.sh -x LOCKSTEP_TUNE_MALLOC -np 2 "$build/benchmarks/allreduce_bench" \
    --min-bytes 16M --max-bytes 256M --factor 4 --repeats 3 --seconds 0.3
done
