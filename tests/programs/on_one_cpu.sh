#!/bin/sh
# Runs "$@" confined to one CPU: the first this process may use (CPU 0 may lie outside a cpuset).
set -eu
cpu=$(taskset -pc $$ | sed 's/.*: //; s/[-,].*//')
exec taskset -c "$cpu" "$@"
