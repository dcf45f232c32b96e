#!/usr/bin/env bash
# Prepares, on a Debian 12 machine with network access (this one), the .deb files that
# scripts/gpu-check.sh unpacks on a GPU machine that has PyTorch but no MPI and no network:
# OpenMPI (launcher, library, headers) and the small build dependencies Lockstep's CMake looks for
# (yaml-cpp, nlohmann-json, Catch2), with their dependencies, minus what every Debian/Ubuntu system
# already has (priority required/important: libc, libstdc++, ...) and minus compilers.
#
#   ./scripts/fetch-mpi-debs.sh [DIR]      # default: third_party/debs
#   # copy DIR to the GPU machine beside the checkout, then there:
#   LOCKSTEP_DEBS=DIR ./scripts/gpu-check.sh
#
# The packages are Debian 12's (glibc 2.36): the GPU machine's C library must be at least as new, or
# bring its own MPI (gpu-check.sh uses an mpirun already on PATH first).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-third_party/debs}
mkdir -p "$dest"
wanted=(openmpi-bin libopenmpi-dev libyaml-cpp-dev nlohmann-json3-dev catch2)
mapfile -t closure < <(apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
                         --no-replaces --no-enhances "${wanted[@]}" | grep -E '^[a-z0-9]' | sort -u)
skip_re='^(gcc|g\+\+|cpp|gfortran|libgcc|libstdc|libc6|libc-dev|libc-bin|linux-libc-dev|binutils|perl|debconf|dpkg|python3|libpython)'
selected=()
for pkg in "${closure[@]}"; do
  [[ $pkg =~ $skip_re ]] && continue
  priority=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | awk -F': ' '/^Priority:/ {print $2; exit}')
  [[ -z $priority ]] && continue  # virtual package
  [[ $priority == required || $priority == important ]] && continue
  selected+=("$pkg")
done
echo "fetch-mpi-debs: downloading ${#selected[@]} packages into $dest"
(cd "$dest" && apt-get download "${selected[@]}")
ls "$dest"/*.deb | wc -l | xargs echo "fetch-mpi-debs: .deb files in $dest:"
