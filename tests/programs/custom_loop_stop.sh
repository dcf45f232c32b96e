#!/usr/bin/env bash
# examples/custom_loop stopped by `kill -USR1 <mpirun>` (Note [Stop in a Join]): mpirun forwards the
# signal to every rank, the ranks' Join carries it to all of them, every rank leaves after the same step
# and exits with 128 + 10.
#   custom_loop_stop.sh LOG -- MPIRUN [FLAGS...] -np N CUSTOM_LOOP EPOCHS
set -uo pipefail
. "$(dirname "$0")/signal_job.sh"
log=$1; shift
[ "$1" = "--" ] && shift
mkdir -p "$(dirname "$log")"; rm -f "$log"
signal_job "$log" 'epoch 0  loss' "$@"  # once epoch 0 has ended, SIGUSR1 to mpirun
cat "$log"
fail() { echo "custom_loop_stop: FAILED: $*"; exit 1; }
[ "$status" -eq 138 ] || fail "the job exited with $status, expected 138 (128 + SIGUSR1)"
grep -q 'custom_loop: stopped in epoch [0-9]* by SIGUSR1 on ranks\? [0-9]' "$log" || fail "no 'stopped ... by SIGUSR1' line"
echo "custom_loop_stop: every rank stopped by SIGUSR1 after the same step (exit 138)"
