#!/usr/bin/env bash
# Put wheels of the gateway's dependencies (and of its build-system requirements,
# to build the gateway itself) into build/wheels, so that Dockerfile.gateway installs them with
# `pip install --no-index`: the image build needs no network, only this step does
# (PyPI, or the pip index the host is configured for).
# Skipped when build/wheels was made from the same pyproject.toml by the same
# Python version. The image's Python must be that version (the build checks).
# Env: SANDMAN_PYTHON  interpreter with pip (default .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."

python="${SANDMAN_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
out=build/wheels
version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
stamp="$(sha256sum pyproject.toml | cut -d' ' -f1) $version"

if [ -f "$out/STAMP" ] && [ "$(cat "$out/STAMP")" = "$stamp" ]; then
  echo "wheels in $out already match pyproject.toml (Python $version)"
  exit 0
fi

rm -rf "$out"
mkdir -p "$out"
"$python" - > "$out/requirements.txt" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)
print("\n".join(project["project"]["dependencies"] + project["build-system"]["requires"]))
PY
"$python" -m pip wheel --quiet --wheel-dir "$out" -r "$out/requirements.txt"
echo "$version" > "$out/PYTHON_VERSION"
echo "$stamp" > "$out/STAMP"
echo "wheels for Python $version in $out"
