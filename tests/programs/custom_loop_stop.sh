#!/usr/bin/env bash
# examples/custom_loop stopped by `kill -USR1 <mpirun>` (Note [Stop in a Join]): mpirun forwards the
# signal to every rank, the ranks' Join carries it to all of them, every rank leaves after the same step
# and exits with 128 + 10.
#   custom_loop_stop.sh LOG -- MPIRUN [FLAGS...] -np N CUSTOM_LOOP EPOCHS
set -uo pipefail
log=$1; shift
[ "$1" = "--" ] && shift
mkdir -p "$(dirname "$log")"; rm -f "$log"
"$@" > "$log" 2>&1 &
job=$!
# Wait for training to be under way (epoch 0's line), then signal mpirun.
for _ in $(seq 1 1200); do
  grep -q 'epoch 0  loss' "$log" && break
  kill -0 "$job" 2> /dev/null || break
  sleep 0.1
done
kill -USR1 "$job"
wait "$job"; status=$?
cat "$log"
fail() { echo "custom_loop_stop: FAILED: $*"; exit 1; }
[ "$status" -eq 138 ] || fail "the job exited with $status, expected 138 (128 + SIGUSR1)"
grep -q 'custom_loop: stopped in epoch [0-9]* by SIGUSR1 on ranks\? [0-9]' "$log" || fail "no 'stopped ... by SIGUSR1' line"
echo "custom_loop_stop: every rank stopped by SIGUSR1 after the same step (exit 138)"
