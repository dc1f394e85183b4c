#!/usr/bin/env bash
# Build the workspace image (gpu-workspace:latest) with no registry access.
# By default it builds FROM sandman-base:bookworm, made by build-base-image.sh
# (debootstrap; skipped when that image exists), plus the packages of
# workspace-image/packages.txt, added by build-tools-image.sh (skipped when that
# list, its install script and the base are unchanged), with `--network none`.
# Env: SANDMAN_BASE_IMAGE  use this base instead (e.g. nvidia/cuda:12.4.1-runtime-ubuntu22.04);
#                          no debootstrap, and the build may use the network (pull, apt-get).
#      SANDMAN_BASE_TAG    tag of the debootstrap base (default sandman-base:bookworm)
#      SANDMAN_IMAGE       tag to build (default gpu-workspace:latest)
#      SANDMAN_TIMEZONE    the containers' local time zone (default Etc/UTC)
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
