#!/usr/bin/env bash
# Build an offline Debian base image for hosts with no container registry.
#
# debootstrap installs Debian (with OpenSSH and the few tools a workspace needs)
# into a folder from Debian's package mirror, and `docker import` turns that
# folder into an image. The workspace image then builds FROM it with no network.
#
# Usage: scripts/build-base-image.sh [TAG [PACKAGES]]
#   TAG       default sandman-base:bookworm
#   PACKAGES  comma-separated, default: what the workspace image needs (OpenSSH
#             and a few tools). The gateway image's base is made the same way
#             with python3,python3-venv (see build-images.sh).
# Env:   SANDMAN_DEBIAN_MIRROR (default: the host's apt mirror, else deb.debian.org)
#        SANDMAN_DEBIAN_SUITE  (default bookworm)
set -euo pipefail

tag="${1:-sandman-base:bookworm}"
packages="${2:-openssh-server,procps,iproute2,ca-certificates,less,bash-completion}"
suite="${SANDMAN_DEBIAN_SUITE:-bookworm}"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"
  exit 0
fi

mirror="${SANDMAN_DEBIAN_MIRROR:-}"
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+' | head -n1 || true)
  mirror="${mirror:-http://deb.debian.org/debian}"
fi

command -v debootstrap >/dev/null || {
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
}

rootfs=$(mktemp -d /tmp/sandman-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

echo "debootstrap $suite from $mirror into $rootfs"
debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"

# Keep the image small and free of host-specific or secret state.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
rm -f "$rootfs"/etc/ssh/ssh_host_*

tar -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  - "$tag"
echo "built base image $tag"
