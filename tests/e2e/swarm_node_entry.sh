#!/bin/sh
# Entrypoint of the nested Swarm worker (tests/e2e/test_swarm_nodes.py): make the cgroup v1
# hierarchies writable (the container sees them read-only), then run dockerd.
for d in /sys/fs/cgroup /sys/fs/cgroup/*; do
  mount -o remount,bind,rw "$d" 2>/dev/null || true
done
exec dockerd "$@"
