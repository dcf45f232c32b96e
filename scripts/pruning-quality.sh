#!/usr/bin/env bash
# Dense vs gradually pruned ResNet-18 on Fashion-MNIST from one config (the quality runs recorded in
# docs/compression.md). Each run differs only in the pruning section, so the accuracies compare.
#   ./scripts/pruning-quality.sh [CONFIG] [RANKS] [EPOCHS] [SPARSITIES...]
# Defaults: configs/demo.yaml, 2 ranks, 3 epochs, sparsities 0.5 0.8. Prints a table at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/demo.yaml}
ranks=${2:-2}
epochs=${3:-3}
shift $(( $# < 3 ? $# : 3 )) || true
sparsities=("$@")
[ ${#sparsities[@]} -eq 0 ] && sparsities=(0.5 0.8)
build_dir=${LOCKSTEP_BUILD_DIR:-build}
out=${LOCKSTEP_QUALITY_DIR:-runs/pruning-quality}
rm -rf "$out"
mkdir -p "$out"
run() {  # name, extra --set arguments...
  local name=$1
  shift
  local start=$SECONDS
  ./scripts/mpirun.sh -np "$ranks" "$build_dir/examples/train_resnet" --config "$config" \
    --set trainer.epochs="$epochs" --set trainer.output_dir="$out/$name" --set trainer.checkpoint.resume=never \
    --set trainer.log_every=0 "$@" | tee "$out/$name.log"
  echo "$name $(grep -o 'final test accuracy: [0-9.]*' "$out/$name.log" | grep -o '[0-9.]*$') $((SECONDS - start))" >> "$out/summary.txt"
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
