#!/usr/bin/env bash
# Configures and builds Lockstep (Release) into build/ (or $LOCKSTEP_BUILD_DIR), with ccache when present.
# A relative LOCKSTEP_BUILD_DIR is relative to the directory this is run from.
set -euo pipefail
build_dir=${LOCKSTEP_BUILD_DIR:-}
[[ -n $build_dir && $build_dir != /* ]] && build_dir=$PWD/$build_dir
cd "$(dirname "$0")/.."
build_dir=${build_dir:-build}
args=(-DCMAKE_BUILD_TYPE=Release)
command -v ccache > /dev/null && args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# Precompiled headers and ccache agree only with these settings; paths relative to the checkout let
# a fresh clone (CI) reuse the cache of an earlier one.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
cmake -S . -B "$build_dir" "${args[@]}" "$@"

# Note [Stale precompiled header]: CMake compiles a target's PCH with `-include cmake_pch.hxx`, so GCC
# reads the old cmake_pch.hxx.gch while it writes the new one, and ccache hashes the old one as an
# input. A fresh tree (no old .gch) and a rebuild in place therefore never share a cache entry, and a
# rebuilt .gch (its bytes differ from build to build) makes every translation unit of the target miss
# too. With the Makefile generator any added or removed source rewrites the target's flags.make and so
# rebuilds its .gch: before this step, that cost a 40-minute rebuild of the whole tree on 2 cores with
# 0 cache hits. Removing a .gch that make would rebuild anyway lets it be compiled as in a fresh tree:
# a cache hit, the same bytes, and hits for the translation units after it.
find "$build_dir" -name cmake_pch.hxx.gch -path '*/CMakeFiles/*' -print0 2> /dev/null |
  while IFS= read -r -d '' gch; do
    dir=$(dirname "$gch")
    for input in "$dir/flags.make" "$dir/cmake_pch.hxx" "$dir/cmake_pch.hxx.cxx"; do
      if [ "$input" -nt "$gch" ]; then
        rm -f "$gch"
        break
      fi
    done
  done
cmake --build "$build_dir" -j "$(nproc)"
