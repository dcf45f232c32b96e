#!/usr/bin/env bash
# Installs the built Lockstep into a scratch prefix, builds tests/package against it as an outside
# project would (find_package(Lockstep)), and runs it at 3 ranks.
set -euo pipefail
build_dir=$1; source_dir=$2; shift 2
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
cmake --install "$build_dir" --prefix "$work/prefix" > "$work/install.log" 2>&1 || { cat "$work/install.log"; exit 1; }
# Note [LibTorch in the package]: the exported link interface names targets, no path of this machine.
targets=$(find "$work/prefix" -name LockstepTargets.cmake | head -n 1)
[ -n "$targets" ] || { echo "package: no LockstepTargets.cmake installed under $work/prefix" >&2; exit 1; }
if grep 'INTERFACE_LINK_LIBRARIES' "$targets" | grep -E '("|;|:|>)/'; then
  echo "package: $targets links absolute paths (above); a consumer with another LibTorch would mix the two" >&2
  exit 1
fi
launcher=()
command -v ccache > /dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
cmake -S "$source_dir" -B "$work/build" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" > "$work/configure.log" \
  || { cat "$work/configure.log"; exit 1; }
cmake --build "$work/build" > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
"$@" -np 3 "$work/build/package_user"
