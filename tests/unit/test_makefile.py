"""``make run``: the banner and the gateway follow the API port asked for."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.parametrize(("args", "env"), [(["API_PORT=9123"], {}), ([], {"SANDMAN_PORT": "9123"})])
def test_make_run_banner_and_gateway_follow_the_port(args, env):
    done = subprocess.run(
        ["make", "-n", "run", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    shown = [line for line in done.stdout.splitlines() if line.startswith("echo")]
    assert any("http://127.0.0.1:9123" in line for line in shown)
    assert "localhost:9123/ssh/known_hosts > ~/.ssh/sandman/known_hosts" in done.stdout
    assert "serve --port 9123 " in done.stdout
    assert "8080" not in done.stdout
