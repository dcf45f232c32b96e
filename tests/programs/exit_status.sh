#!/bin/sh
# Runs a program test's command and prints its exit status after its output. With a
# PASS_REGULAR_EXPRESSION CTest ignores the status, so a job that printed the line it is matched on and
# then failed (a rank that threw in its last checkpoint, its export or its teardown) would pass:
# lockstep_require_exit_zero (tests.cmake) fails the test on this line instead.
#   exit_status.sh COMMAND [ARGS...]
"$@"
status=$?
echo "lockstep-test: exit status $status"
exit "$status"
