#!/usr/bin/env bash
# Install what the gateway's venv and the tests use (python3-venv, ssh, ssh-keygen, sshpass,
# socat, rsync, docker-compose for the Compose deployment test, and Chromium for the admin page's
# browser test, driven by Playwright without a browser download) on a Debian/Ubuntu machine,
# as root. Idempotent: installs only what is missing.
# The Docker engine itself is scripts/setup-docker.sh.
set -euo pipefail

pkgs=()
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || pkgs+=(openssh-client)
command -v sshpass >/dev/null 2>&1 || pkgs+=(sshpass)
command -v socat >/dev/null 2>&1 || pkgs+=(socat)  # e2e: a Docker socket that can go away
command -v rsync >/dev/null 2>&1 || pkgs+=(rsync)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || pkgs+=(python3-venv)
command -v chromium >/dev/null 2>&1 || pkgs+=(chromium)
command -v docker-compose >/dev/null 2>&1 || docker compose version >/dev/null 2>&1 || pkgs+=(docker-compose)

if [ ${#pkgs[@]} -eq 0 ]; then
  echo "host tools already installed"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "setup-host.sh: must run as root to install ${pkgs[*]}" >&2; exit 1; }
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${pkgs[@]}"
