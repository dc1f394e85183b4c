#!/usr/bin/env bash
# Build the workspace image (gpu-workspace:latest), the gateway image
# (sandman-gateway:latest) and the tests' nested Swarm worker (sandman-swarm-node:bookworm)
# with no registry access.
# By default both build FROM Debian bases made by build-base-image.sh (debootstrap;
# skipped when the image exists) with `--network none`: sandman-base:bookworm
# (with sshd) plus the packages of workspace-image/packages.txt, added by
# build-tools-image.sh (skipped when that list, its install script and the base are
# unchanged), for the workspace; sandman-python:bookworm (with python3) for the
# gateway, whose Python dependencies come from build/wheels (build-wheels.sh).
# Env: SANDMAN_BASE_IMAGE          workspace base instead (e.g. nvidia/cuda:12.4.1-runtime-ubuntu22.04);
#                                  no debootstrap, and the build may use the network (pull, apt-get).
#      SANDMAN_BASE_TAG            tag of the debootstrap workspace base (default sandman-base:bookworm)
#      SANDMAN_IMAGE               workspace tag to build (default gpu-workspace:latest)
#      SANDMAN_TIMEZONE            the workspace containers' local time zone (default Etc/UTC)
#      SANDMAN_GATEWAY_BASE_IMAGE  gateway base instead (e.g. python:3.11-slim, pulled if missing)
#      SANDMAN_GATEWAY_IMAGE       gateway tag to build (default sandman-gateway:latest)
#      SANDMAN_SWARM_NODE_IMAGE    the e2e tests' nested Swarm worker (default sandman-swarm-node:bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${SANDMAN_IMAGE:-gpu-workspace:latest}"
if [ -n "${SANDMAN_BASE_IMAGE:-}" ]; then
  base="$SANDMAN_BASE_IMAGE"
  net=()
else
  base_tag="${SANDMAN_BASE_TAG:-sandman-base:bookworm}"
  scripts/build-base-image.sh "$base_tag"
  base=$(scripts/build-tools-image.sh "$base_tag")
  net=(--network none)   # the base already has sshd and the packages: nothing to download
fi
docker build "${net[@]}" --build-arg BASE_IMAGE="$base" \
  --build-arg TIMEZONE="${SANDMAN_TIMEZONE:-Etc/UTC}" -t "$tag" workspace-image/
echo "built $tag from $base"

# The nested Swarm worker of tests/e2e/test_swarm_nodes.py: Debian with dockerd.
scripts/build-base-image.sh "${SANDMAN_SWARM_NODE_IMAGE:-sandman-swarm-node:bookworm}" \
  docker.io,iptables,ca-certificates,procps,iproute2

gateway_tag="${SANDMAN_GATEWAY_IMAGE:-sandman-gateway:latest}"
gateway_base="${SANDMAN_GATEWAY_BASE_IMAGE:-sandman-python:bookworm}"
[ -n "${SANDMAN_GATEWAY_BASE_IMAGE:-}" ] || scripts/build-base-image.sh "$gateway_base" python3,python3-venv
scripts/build-wheels.sh
docker build --network none --build-arg BASE_IMAGE="$gateway_base" \
  -f Dockerfile.gateway -t "$gateway_tag" .
echo "built $gateway_tag from $gateway_base"
