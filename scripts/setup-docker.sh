#!/usr/bin/env bash
# Make a Docker engine available on a Debian/Ubuntu machine (run as root).
# Idempotent: does nothing if `docker info` already works. Otherwise installs
# docker.io when dockerd is missing, then starts the engine: with systemctl
# when systemd is PID 1, else as a detached background dockerd logging to
# /var/log/sandman-dockerd.log. Waits up to SANDMAN_DOCKER_WAIT (60) seconds.
set -euo pipefail

wait_s="${SANDMAN_DOCKER_WAIT:-60}"
log=/var/log/sandman-dockerd.log

if docker info >/dev/null 2>&1; then
  echo "docker engine already running"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "setup-docker.sh: must run as root" >&2; exit 1; }

if ! command -v dockerd >/dev/null 2>&1; then
  echo "installing docker.io"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io
fi

if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
  systemctl start docker
else
  echo "starting dockerd in the background (log: $log)"
  setsid nohup dockerd >>"$log" 2>&1 </dev/null &
fi

for _ in $(seq "$wait_s"); do
  docker info >/dev/null 2>&1 && { echo "docker engine ready"; exit 0; }
  sleep 1
done
echo "setup-docker.sh: docker engine did not come up within ${wait_s}s; see $log or 'journalctl -u docker'" >&2
exit 1
