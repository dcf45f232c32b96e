#!/usr/bin/env bash
# Configures and builds Lockstep (Release) into build/ (or $LOCKSTEP_BUILD_DIR), with ccache when present.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${LOCKSTEP_BUILD_DIR:-build}
args=(-DCMAKE_BUILD_TYPE=Release)
command -v ccache > /dev/null && args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# Precompiled headers and ccache agree only with these settings; paths relative to the checkout let
# a fresh clone (CI) reuse the cache of an earlier one.
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$PWD}
export CCACHE_SLOPPINESS=${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}
cmake -S . -B "$build_dir" "${args[@]}" "$@"
cmake --build "$build_dir" -j "$(nproc)"
