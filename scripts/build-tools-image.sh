#!/usr/bin/env bash
# Add the workspace packages (workspace-image/packages.txt) to an offline Debian base
# image as one layer on top of it, with no network inside any container.
#
# The host's apt downloads the packages the base lacks, resolving against the base's
# own dpkg status, sources and keys, into a cache; a container of the base then
# installs them from that cache (`--network none`) and is committed. The result is
# tagged sandman-tools:<the base's tag> (sandman-tools:bookworm for sandman-base:bookworm)
# and labelled with a hash of the base image id, the package list and the install
# script: an unchanged list is never rebuilt, and a changed one reuses the base image
# as it is. Prints that tag on stdout (progress goes to stderr).
#
# Usage: scripts/build-tools-image.sh BASE_TAG
# Env:   SANDMAN_APT_CACHE  download cache (default .cache/apt in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."

base="$1"
image_dir="$PWD/workspace-image"
key=$({ docker image inspect -f '{{.Id}}' "$base"; cat "$image_dir/packages.txt" "$image_dir/install-packages.sh"; } \
  | sha256sum | cut -c1-12)
tag="sandman-tools:${base##*:}"
if [[ "$(docker image inspect -f '{{index .Config.Labels "sandman.tools.key"}}' "$tag" 2>/dev/null)" == "$key" ]]; then
  echo "tools image $tag already present" >&2
  echo "$tag"
  exit 0
fi

cache="${SANDMAN_APT_CACHE:-$PWD/.cache/apt}"
cache=$(mkdir -p "$cache" && cd "$cache" && pwd)
mkdir -p "$cache/lists/partial" "$cache/archives/partial" "$cache/state" "$cache/pkgcache"
work=$(mktemp -d /tmp/sandman-tools.XXXXXX)
chmod 0755 "$work"   # apt reads the keys as user _apt
cid=""
cleanup() {
  [[ -z "$cid" ]] || docker rm -f "$cid" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The base's view of the world: what is installed, where packages come from, whose keys.
cid=$(docker create "$base" true)
docker cp "$cid:/etc/apt" "$work/etc-apt" >&2
docker cp "$cid:/var/lib/dpkg/status" "$work/status" >&2
docker rm "$cid" >/dev/null
cid=""

apt_opts=(
  -o "Dir::Etc=$work/etc-apt"
  -o "Dir::State=$cache/state"
  -o "Dir::State::Lists=$cache/lists"
  -o "Dir::State::status=$work/status"
  -o "Dir::Cache=$cache/pkgcache"
  -o "Dir::Cache::archives=$cache/archives"
  -o "APT::Install-Recommends=false"
  -q
)
mapfile -t wanted < <("$image_dir/install-packages.sh" --list)
echo "downloading packages for $base into $cache" >&2
apt-get "${apt_opts[@]}" update >&2
apt-get "${apt_opts[@]}" install -y --download-only "${wanted[@]}" >&2

echo "installing them into a layer above $base" >&2
cid=$(docker create --network none \
  -v "$cache/lists:/var/lib/apt/lists" \
  -v "$cache/archives:/var/cache/apt/archives" \
  -v "$image_dir:/mnt:ro" \
  "$base" /mnt/install-packages.sh --offline)
docker start -a "$cid" >&2
docker commit --change 'CMD ["/bin/bash"]' \
  --change "LABEL sandman.tools.base=$base sandman.tools.key=$key" "$cid" "$tag" >/dev/null
echo "built tools image $tag" >&2
echo "$tag"
