"""The ``sandman`` client against the real gateway: a session it creates is reached by the
real ssh with the key and the host CA it saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.conftest import TOKEN

STRICT = ["-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]


def test_cli_creates_a_session_and_ssh_logs_in_with_the_saved_key(
    gateway: Any, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "SANDMAN_URL": f"http://127.0.0.1:{gateway.api_port}",
        "SANDMAN_TOKEN": TOKEN,
    }

    def sandman(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    created = sandman("session", "create", "alice")
    assert created.returncode == 0, created.stderr
    assert (
        "private key: " + str(tmp_path / "home" / ".ssh" / "sandman" / "alice-") in created.stdout
    )
    # the host is verified through the gateway's host CA the CLI saved, with no prompt
    done = sandman("session", "ssh", *STRICT, "alice", "--", "id", "-un")
    assert (done.returncode, done.stdout) == (0, "alice\n"), done.stderr
    history = sandman("session", "connections", "alice")
    assert "SSH-2.0-OpenSSH" in history.stdout
    assert sandman("session", "delete", "alice").returncode == 0
    assert gateway.containers() == []
