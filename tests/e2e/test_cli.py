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


def client_env(gateway: Any, home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(home),
        "SANDMAN_URL": f"http://127.0.0.1:{gateway.api_port}",
        "SANDMAN_TOKEN": TOKEN,
    }


def sandman(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *argv],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_cli_creates_a_session_and_ssh_logs_in_with_the_saved_key(
    gateway: Any, tmp_path: Path
) -> None:
    env = client_env(gateway, tmp_path / "home")
    created = sandman(env, "session", "create", "alice")
    assert created.returncode == 0, created.stderr
    key = tmp_path / "home" / ".ssh" / "sandman" / "alice"
    assert f"private key: {key} (0600)" in created.stdout
    # the host is verified through the gateway's host CA the CLI saved, with no prompt
    done = sandman(env, "session", "ssh", *STRICT, "alice", "--", "id", "-un")
    assert (done.returncode, done.stdout) == (0, "alice\n"), done.stderr
    history = sandman(env, "session", "connections", "alice")
    assert "SSH-2.0-OpenSSH" in history.stdout
    assert sandman(env, "session", "delete", "alice").returncode == 0
    assert gateway.containers() == []


def test_a_day_one_ssh_config_block_logs_into_the_next_session(
    gateway: Any, tmp_path: Path
) -> None:
    env = client_env(gateway, tmp_path / "home")

    def ok(*argv: str) -> str:
        done = sandman(env, *argv)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ok("session", "create", "alice")
    config = tmp_path / "ssh_config"
    config.write_text(ok("ssh-config", "alice"))  # written once, on day one
    ok("session", "delete", "alice")
    ok("session", "create", "alice")  # the next day: a new key, the same port
    done = subprocess.run(
        ["ssh", "-F", str(config), *STRICT, "sandman-alice", "id -un"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, "alice\n"), done.stderr
    keys = sorted(p.name for p in (tmp_path / "home" / ".ssh" / "sandman").iterdir())
    assert keys == ["alice", "alice.session", "known_hosts"]  # the old key is gone
