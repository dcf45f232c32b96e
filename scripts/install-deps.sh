#!/usr/bin/env bash
# Installs the Debian 12 packages Lockstep needs, and only those that are missing: quick when
# everything is present. Needs root (or sudo) when something is missing.
set -euo pipefail

packages=(
  # toolchain
  g++ make cmake ccache pkg-config
  # LibTorch (CPU), MPI, config, tests, data
  libtorch-dev libopenmpi-dev openmpi-bin openssh-client
  libyaml-cpp-dev catch2 nlohmann-json3-dev zlib1g-dev
  dataset-fashion-mnist
  # the benchmarks' command lines (CLI11, header-only)
  libcli11-dev
  # Fast BLAS for LibTorch's Linear layers: becomes the libblas.so.3 alternative (docs/performance.md)
  libopenblas0-pthread
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
else
  echo "install-deps: installing ${missing[*]}"
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo > /dev/null || { echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  # Through env: sudo's env_reset would drop an exported DEBIAN_FRONTEND, and debconf could then prompt.
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# OpenBLAS must be what libblas.so.3 resolves to: Debian's reference BLAS runs a 1024^2 matmul
# ~20x slower. It wins the alternative by priority unless someone pinned another one by hand.
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)
blas=$(readlink -f "/usr/lib/$multiarch/libblas.so.3" 2>/dev/null || true)
case "$blas" in
  *openblas*) ;;
  *) echo "install-deps: warning: libblas.so.3 resolves to ${blas:-nothing}, not OpenBLAS;" \
          "see docs/performance.md (update-alternatives --config libblas.so.3-$multiarch)" >&2 ;;
esac
