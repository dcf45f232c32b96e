#!/usr/bin/env bash
# The demo contract: on a fresh Debian 12 machine, installs what is missing, builds, and runs the
# main job: ResNet-18 (width 16) trained data-parallel on Fashion-MNIST at 2 ranks with
# configs/demo.yaml (a few minutes on 2 cores), ending with the final test accuracy.
# Extra arguments go to train_resnet (e.g. --set trainer.epochs=1); --config FILE (or --config=FILE)
# replaces configs/demo.yaml. FILE and LOCKSTEP_BUILD_DIR are relative to the directory this is run
# from; --set values are not rewritten: train_resnet runs in the checkout, so a relative path there
# (--set trainer.output_dir=runs/x) is relative to the checkout. Give an absolute one to put it elsewhere.
set -euo pipefail
abspath() { if [[ -z $1 || $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }
if [[ -n ${LOCKSTEP_BUILD_DIR:-} ]]; then
  # Exported absolute, so that build.sh (which reads it after its own cd) builds where this runs from.
  LOCKSTEP_BUILD_DIR=$(abspath "$LOCKSTEP_BUILD_DIR")
  export LOCKSTEP_BUILD_DIR
fi
config=(--config configs/demo.yaml)  # unless the arguments name one (train_resnet takes one --config)
args=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config | --set)
      [[ $1 == --config ]] && config=()
      args+=("$1")
      if [[ $# -gt 1 ]]; then  # the value: a file name to resolve, or a --set's, passed as it is
        if [[ $1 == --config ]]; then args+=("$(abspath "$2")"); else args+=("$2"); fi
        shift
      fi
      ;;
    --config=*)
      config=()
      args+=("--config=$(abspath "${1#--config=}")")
      ;;
    *) args+=("$1") ;;
  esac
  shift
done
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
./scripts/build.sh
build=${LOCKSTEP_BUILD_DIR:-build}
./scripts/mpirun.sh -np 2 "$build/examples/train_resnet" "${config[@]}" "${args[@]}"
