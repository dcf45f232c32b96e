#!/usr/bin/env bash
# Dense vs gradually pruned ResNet-18 on Fashion-MNIST from one config (the quality runs recorded in
# docs/compression.md). Each run differs only in the pruning section, so the accuracies compare.
#   ./scripts/pruning-quality.sh [CONFIG] [RANKS] [EPOCHS] [SPARSITIES...]
# Defaults: configs/demo.yaml, 2 ranks, 3 epochs, sparsities 0.5 0.8. Prints a table at the end.
# EPOCHS is at least 2 (pruning runs from epoch 0.25 to EPOCHS - 1.25); each sparsity is in [0, 1).
# CONFIG, LOCKSTEP_BUILD_DIR (default build) and LOCKSTEP_QUALITY_DIR (default runs/pruning-quality)
# are relative to the directory this is run from when given, to the checkout when not.
set -euo pipefail
fail() { echo "pruning-quality: $*" >&2; exit 2; }
abspath() { if [[ -z $1 || $1 == /* ]]; then printf '%s\n' "$1"; else printf '%s\n' "$PWD/$1"; fi; }
config=configs/demo.yaml
[[ -n ${1:-} ]] && config=$(abspath "$1")
[[ -n ${LOCKSTEP_BUILD_DIR:-} ]] && LOCKSTEP_BUILD_DIR=$(abspath "$LOCKSTEP_BUILD_DIR")
[[ -n ${LOCKSTEP_QUALITY_DIR:-} ]] && LOCKSTEP_QUALITY_DIR=$(abspath "$LOCKSTEP_QUALITY_DIR")
cd "$(dirname "$0")/.."
ranks=${2:-2}
epochs=${3:-3}
shift $(( $# < 3 ? $# : 3 )) || true
sparsities=("$@")
[ ${#sparsities[@]} -eq 0 ] && sparsities=(0.5 0.8)
build_dir=${LOCKSTEP_BUILD_DIR:-build}
out=${LOCKSTEP_QUALITY_DIR:-runs/pruning-quality}

# Everything checked before the output folder is removed and anything trains.
[[ -f $config ]] || fail "config file '$config' does not exist (or is not a file)"
[[ $ranks =~ ^[1-9][0-9]*$ ]] || fail "RANKS must be an integer >= 1, found '$ranks'"
[[ $epochs =~ ^[1-9][0-9]*$ && $epochs -ge 2 ]] ||
  fail "EPOCHS must be an integer >= 2 (pruning ends at EPOCHS - 1.25, after it begins at 0.25), found '$epochs'"
for s in "${sparsities[@]}"; do
  [[ $s =~ ^(0(\.[0-9]*)?|\.[0-9]+)$ ]] || fail "each sparsity must be a number in [0, 1), found '$s'"
done
[[ -x $build_dir/examples/train_resnet ]] ||
  fail "$build_dir/examples/train_resnet not found: build first (./scripts/build.sh), or set LOCKSTEP_BUILD_DIR"

rm -rf "$out"
mkdir -p "$out"
run() {  # name, extra --set arguments...
  local name=$1
  shift
  local start=$SECONDS
  ./scripts/mpirun.sh -np "$ranks" "$build_dir/examples/train_resnet" --config "$config" \
    --set trainer.epochs="$epochs" --set trainer.output_dir="$out/$name" --set trainer.checkpoint.resume=never \
    --set trainer.log_every=0 "$@" | tee "$out/$name.log"
  # "final test accuracy: 91.23%", or "n/a (...)" when the run ended without one: no number, no row.
  local acc
  acc=$(sed -n 's/^final test accuracy: \([0-9][0-9]*\(\.[0-9]*\)\{0,1\}\)%.*/\1/p' "$out/$name.log" | tail -1)
  if [[ -z $acc ]]; then
    local said
    said=$(grep -m1 'final test accuracy' "$out/$name.log" || echo 'no "final test accuracy" line')
    echo "pruning-quality: run $name reported no final test accuracy: $said (log: $out/$name.log)" >&2
    exit 1
  fi
  echo "$name $acc $((SECONDS - start))" >> "$out/summary.txt"
}
run dense
for s in "${sparsities[@]}"; do
  # Gradual from a quarter epoch to a quarter epoch before the end, the stem and classifier dense.
  run "pruned-$s" --set pruning.enabled=true --set pruning.target_sparsity="$s" \
    --set pruning.begin_epoch=0.25 --set pruning.end_epoch="$(awk -v e="$epochs" 'BEGIN{print e - 1.25}')" \
    --set pruning.frequency=50 --set "pruning.exclude=['^conv1\\.', '^fc\\.']"
done
echo
echo "config $config, $ranks ranks, $epochs epochs"
printf "%-14s %10s %10s %8s\n" run "test acc %" "vs dense" "time s"
dense=$(awk '$1=="dense"{print $2}' "$out/summary.txt")
while read -r name acc secs; do
  printf "%-14s %10s %+10.2f %8s\n" "$name" "$acc" "$(awk -v a="$acc" -v d="$dense" 'BEGIN{print a - d}')" "$secs"
done < "$out/summary.txt"
