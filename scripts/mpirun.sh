#!/usr/bin/env bash
# mpirun with the flags this kind of machine needs, so nobody has to remember them:
# --allow-run-as-root when root, --oversubscribe (more ranks than cores), --bind-to none (ranks
# pinned to one core each would fight their own communication thread).
#   ./scripts/mpirun.sh -np 2 build/benchmarks/allreduce_bench
flags=(--oversubscribe --bind-to none)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
exec mpirun "${flags[@]}" "$@"
