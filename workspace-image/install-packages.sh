#!/bin/bash
# Install the packages named in packages.txt (beside this script) that are not
# installed yet, and generate the en_US.UTF-8 locale. Run as root, in an image build
# (apt-get over the network) or, with --offline, by scripts/build-tools-image.sh,
# which mounts /var/lib/apt/lists and /var/cache/apt/archives from a host-side
# download so that nothing is fetched. --list only prints the package names.
set -euo pipefail

list="$(dirname "$0")/packages.txt"
mapfile -t wanted < <(sed 's/#.*//' "$list" | tr -s ' \t' '\n\n' | grep -v '^$')
if [[ "${1:-}" == --list ]]; then   # just the names, for the host-side download
  printf '%s\n' "${wanted[@]}"
  exit 0
fi
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
done

export DEBIAN_FRONTEND=noninteractive
# No manuals (man-db is not installed), documentation or message translations:
# about 50 MB less. Copyright files stay.
cat >/etc/dpkg/dpkg.cfg.d/sandman-nodoc <<'CFG'
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
CFG
if ((${#missing[@]})); then
  echo "install-packages: installing ${missing[*]}"
  if [[ "${1:-}" == --offline ]]; then
    apt-get install -y -q --no-install-recommends --no-download "${missing[@]}"
  else
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    apt-get clean
    rm -rf /var/lib/apt/lists/*
  fi
  rm -f /var/cache/apt/*.bin
fi

if command -v localedef >/dev/null && ! locale -a | grep -qx 'en_US.utf8'; then
  localedef -i en_US -f UTF-8 en_US.UTF-8
fi
