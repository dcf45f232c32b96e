#!/usr/bin/env bash
# train_resnet stopped by a signal sent to mpirun, as a batch scheduler (or `kill -USR1`) sends it:
# mpirun forwards SIGUSR1 to every rank; the ranks agree to stop after the same step, write a
# checkpoint and exit with 128 + 10. The same command then resumes from that checkpoint and finishes.
#   stop_on_signal.sh OUTPUT_DIR -- MPIRUN [FLAGS...] -np N TRAIN_RESNET [ARGS...]
set -uo pipefail
. "$(dirname "$0")/signal_job.sh"
dir=$1; shift
[ "$1" = "--" ] && shift
rm -rf "$dir"; mkdir -p "$dir"
command=("$@" --set "trainer.output_dir=$dir")

# Once training is under way (a progress line of epoch 1), SIGUSR1 to mpirun.
signal_job "$dir/stopped.log" 'epoch 1/[0-9]* \[[0-9]*/' "${command[@]}"
cat "$dir/stopped.log"
fail() { echo "stop_on_signal: FAILED: $*"; exit 1; }
[ "$status" -eq 138 ] || fail "the stopped job exited with $status, expected 138 (128 + SIGUSR1)"
grep -q 'training stopped after step [0-9]* (\(epoch 1, .*\|the end of epoch 1\|during epoch 1.s evaluation, .*\)): SIGUSR1 on ranks\? [0-9]' "$dir/stopped.log" \
  || fail "no 'training stopped after step ... SIGUSR1 on ...' line"
grep -q 'checkpoint .*checkpoint-step[0-9]*\.pt holds step [0-9]* (checkpoint.resume: auto continues from it)' "$dir/stopped.log" \
  || fail "no line naming the checkpoint"
step=$(grep -o 'training stopped after step [0-9]*' "$dir/stopped.log" | grep -o '[0-9]*$')
[ -f "$dir/checkpoints/$(printf 'checkpoint-step%08d.pt' "$step")" ] || fail "no checkpoint file for step $step"

"${command[@]}" > "$dir/resumed.log" 2>&1; status=$?
cat "$dir/resumed.log"
[ "$status" -eq 0 ] || fail "the resumed job exited with $status"
grep -q "resumed from .*checkpoint-step$(printf '%08d' "$step")\.pt (epoch [12], step $step)" "$dir/resumed.log" \
  || fail "the second run did not resume from step $step"
grep -q 'final test accuracy: [0-9.]*%' "$dir/resumed.log" || fail "the resumed run did not finish"
echo "stop_on_signal: stopped after step $step by SIGUSR1 (exit 138), resumed from it and finished"
