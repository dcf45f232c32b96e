#!/bin/sh
# Runs "$@" in a cgroup of its own whose CPU quota is one CPU's time (Note [CPU quota]), then removes the
# cgroup. Exits 77 (CTest's "skipped") where no such cgroup can be made: not root, a read-only
# /sys/fs/cgroup, a cgroup v2 hierarchy that does not hand the cpu controller down.
set -u
name=lockstep_quota_$$
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  parent=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
  limit() { { echo "100000 100000" > "$1/cpu.max"; } 2>/dev/null; }
else
  path=$(awk -F: '{ n = split($2, c, ","); for (i = 1; i <= n; i++) if (c[i] == "cpu") print $3 }' /proc/self/cgroup)
  parent=
  for mount in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do
    if [ -n "$path" ] && [ -d "$mount$path" ]; then parent=$mount$path; break; fi
  done
  limit() { { echo 100000 > "$1/cpu.cfs_period_us" && echo 100000 > "$1/cpu.cfs_quota_us"; } 2>/dev/null; }
fi
dir=${parent%/}/$name
# Those of runs a timeout killed before their cleanup (empty by now, so rmdir takes them).
for old in "${parent%/}"/lockstep_quota_*; do
  if [ -d "$old" ]; then rmdir "$old" 2>/dev/null || true; fi
done
if [ -z "$parent" ] || ! mkdir "$dir" 2>/dev/null; then
  echo "in_cpu_quota.sh: cannot make a cgroup under '${parent:-(no cpu controller)}': skipped" >&2
  exit 77
fi
cleanup() {
  { echo $$ > "${parent%/}/cgroup.procs"; } 2>/dev/null
  rmdir "$dir" 2>/dev/null || true
}
trap cleanup EXIT
if ! limit "$dir" || ! { echo $$ > "$dir/cgroup.procs"; } 2>/dev/null; then
  echo "in_cpu_quota.sh: cannot set a CPU quota on $dir or join it: skipped" >&2
  exit 77
fi
"$@"
