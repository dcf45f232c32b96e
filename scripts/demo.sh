#!/usr/bin/env bash
# The demo contract: on a fresh Debian 12 machine, installs what is missing, builds, and runs the
# main job: ResNet-18 (width 16) trained data-parallel on Fashion-MNIST at 2 ranks with
# configs/demo.yaml (a few minutes on 2 cores), ending with the final test accuracy.
# Extra arguments go to train_resnet (e.g. --set trainer.epochs=1).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
build=${LOCKSTEP_BUILD_DIR:-build}
./scripts/mpirun.sh -np 2 "$build/examples/train_resnet" --config configs/demo.yaml "$@"
