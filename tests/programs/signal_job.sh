# Sourced by the stop-on-signal tests. signal_job LOG PATTERN COMMAND...: runs COMMAND (an mpirun) with
# its output in LOG, waits (at most 120 s) until PATTERN appears in LOG (training is under way), sends
# SIGUSR1 to it as `kill -USR1 <mpirun>` would, waits for it, and leaves its exit status in $status.
signal_job() {
  local log=$1 pattern=$2
  shift 2
  "$@" > "$log" 2>&1 &
  local job=$!
  for _ in $(seq 1 1200); do
    grep -q "$pattern" "$log" && break
    kill -0 "$job" 2> /dev/null || break
    sleep 0.1
  done
  kill -USR1 "$job"
  wait "$job"
  status=$?
}
