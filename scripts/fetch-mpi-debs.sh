#!/usr/bin/env bash
# Prepares, on a Debian 12 machine with network access (this one), the .deb files that
# scripts/gpu-check.sh unpacks on a GPU machine that has PyTorch but no MPI and no network:
# OpenMPI (launcher, library, headers) and the small build dependencies Lockstep's CMake looks for
# (yaml-cpp, nlohmann-json, Catch2, CLI11), with their dependencies, minus what every Debian/Ubuntu
# system already has (priority required/important: libc, libstdc++, ...) and minus compilers.
#
#   ./scripts/fetch-mpi-debs.sh [DIR]      # default: third_party/debs (in the checkout); a DIR given
#                                          # is relative to the directory this is run from
#   # copy DIR to the GPU machine beside the checkout, then there:
#   LOCKSTEP_DEBS=DIR ./scripts/gpu-check.sh
#
# The packages are Debian 12's (glibc 2.36): the GPU machine's C library must be at least as new, or
# bring its own MPI (gpu-check.sh uses an mpirun already on PATH first).
set -euo pipefail
dest=${1:-}
[[ -n $dest && $dest != /* ]] && dest=$PWD/$dest
cd "$(dirname "$0")/.."
dest=${dest:-third_party/debs}
mkdir -p "$dest"
wanted=(openmpi-bin libopenmpi-dev libyaml-cpp-dev nlohmann-json3-dev catch2 libcli11-dev)
# Resolve the install as apt would on an empty system (a status file listing nothing installed): one
# choice per alternative. `apt-cache depends --recurse` lists every alternative instead (flang-16/19/22 and
# their clang libraries for libopenmpi-dev's Fortran dependency): 307 MB instead of what is needed.
empty_status=$(mktemp)
trap 'rm -f "$empty_status"' EXIT
mapfile -t closure < <(apt-get --simulate --no-install-recommends -o Dir::State::status="$empty_status" \
                         install "${wanted[@]}" | awk '/^Inst / {print $2}' | sort -u)
[[ ${#closure[@]} -gt 0 ]] || { echo "fetch-mpi-debs: apt resolved no packages for ${wanted[*]}" >&2; exit 1; }
skip_re='^(gcc|g\+\+|cpp|gfortran|libgcc|libstdc|libc6|libc-dev|libc-bin|linux-libc-dev|binutils|perl|debconf|dpkg|python3|libpython)'
# One apt-cache call for all priorities (a call per package took minutes on a busy host).
declare -A priority=()
while read -r pkg prio; do priority[$pkg]=$prio; done < <(
  apt-cache show --no-all-versions "${closure[@]}" 2>/dev/null |
    awk -F': ' '/^Package:/ {p = $2} /^Priority:/ {print p, $2}')
selected=()
for pkg in "${closure[@]}"; do
  [[ $pkg =~ $skip_re ]] && continue
  prio=${priority[$pkg]:-}
  [[ -z $prio || $prio == required || $prio == important ]] && continue
  selected+=("$pkg")
done
echo "fetch-mpi-debs: downloading ${#selected[@]} packages into $dest"
(cd "$dest" && apt-get download "${selected[@]}")
ls "$dest"/*.deb | wc -l | xargs echo "fetch-mpi-debs: .deb files in $dest:"
