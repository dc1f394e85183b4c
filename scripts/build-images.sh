#!/usr/bin/env bash
# Build the workspace image (gpu-workspace:latest) with no registry access.
# By default it builds FROM sandman-base:bookworm, made by build-base-image.sh
# (debootstrap; skipped when that image exists), with `--network none`.
# Env: SANDMAN_BASE_IMAGE  use this base instead (e.g. nvidia/cuda:12.4.1-runtime-ubuntu22.04);
#                          no debootstrap, and the build may use the network (pull, apt-get).
#      SANDMAN_IMAGE       tag to build (default gpu-workspace:latest)
set -euo pipefail
cd "$(dirname "$0")/.."

tag="${SANDMAN_IMAGE:-gpu-workspace:latest}"
if [ -n "${SANDMAN_BASE_IMAGE:-}" ]; then
  base="$SANDMAN_BASE_IMAGE"
  net=()
else
  base=sandman-base:bookworm
  scripts/build-base-image.sh "$base"
  net=(--network none)   # the base already has sshd: nothing to download
fi

docker build "${net[@]}" --build-arg BASE_IMAGE="$base" -t "$tag" workspace-image/
echo "built $tag from $base"
