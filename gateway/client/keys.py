"""The user's side of SSH: private keys kept under ``~/.ssh/sandman/``, the gateway's
known-hosts line, and the ``ssh`` command line or ``~/.ssh/config`` block that uses them."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.client.settings import home


def key_dir(env: Mapping[str, str]) -> Path:
    return home(env) / ".ssh" / "sandman"


def key_path(env: Mapping[str, str], user_id: str, session_id: str) -> Path:
    """Where the generated private key of a session is kept (one file per session)."""
    return key_dir(env) / f"{user_id}-{session_id}"


def known_hosts_path(env: Mapping[str, str]) -> Path:
    return key_dir(env) / "known_hosts"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)


def save_private_key(path: Path, key: str) -> None:
    """Write ``key`` readable by its owner only (0600 from the first byte); ssh refuses
    keys others can read."""
    _private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(key if key.endswith("\n") else key + "\n")


def remember_known_hosts(env: Mapping[str, str], lines: str) -> Path:
    """Add the gateway's known-hosts lines to ``~/.ssh/sandman/known_hosts`` once."""
    path = known_hosts_path(env)
    _private_dir(path.parent)
    have = set(path.read_text().splitlines()) if path.exists() else set()
    new = [line for line in lines.splitlines() if line.strip() and line not in have]
    if new:
        with path.open("a", encoding="utf-8") as file:
            file.write("".join(line + "\n" for line in new))
    return path


def ssh_host(session: Mapping[str, Any], url: str) -> str:
    """The host users ssh to: the API's ``ssh_host``, else the one in its ``ssh_command``
    (``ssh ... user@host``), else the host of the gateway URL."""
    if session.get("ssh_host"):
        return session["ssh_host"]
    targets = [word for word in shlex.split(session.get("ssh_command") or "") if "@" in word]
    if targets:
        return targets[-1].rpartition("@")[2]
    return urlsplit(url).hostname or "localhost"


def _options(env: Mapping[str, str], session: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ssh options for a session: its saved key, if any, and the gateway's host CA."""
    session_id = session.get("id") or session["session_id"]
    user = session.get("user_id") or session["ssh_user"]
    options = []
    key = key_path(env, user, session_id)
    if key.exists():
        options += [("IdentityFile", str(key)), ("IdentitiesOnly", "yes")]
    if session.get("ssh_known_hosts"):
        options.append(
            ("UserKnownHostsFile", str(remember_known_hosts(env, session["ssh_known_hosts"])))
        )
    return options


def ssh_argv(
    env: Mapping[str, str],
    session: Mapping[str, Any],
    url: str,
    command: Sequence[str] = (),
    *,
    options: Sequence[str] = (),
) -> list[str]:
    """The ``ssh`` command line that logs in to ``session`` (and runs ``command``, if any);
    ``options`` are further ``-o`` options, which take precedence (ssh keeps the first)."""
    user = session.get("user_id") or session["ssh_user"]
    argv = ["ssh", "-p", str(session["ssh_port"])]
    for option in options:
        argv += ["-o", option]
    for name, value in _options(env, session):
        argv += ["-o", f"{name}={value}"] if name != "IdentityFile" else ["-i", value]
    return [*argv, f"{user}@{ssh_host(session, url)}", *command]


def _quoted(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def ssh_config(env: Mapping[str, str], session: Mapping[str, Any], url: str) -> str:
    """A ``Host sandman-<user>`` block for ``~/.ssh/config``."""
    user = session.get("user_id") or session["ssh_user"]
    lines = [
        f"Host sandman-{user}",
        f"    HostName {ssh_host(session, url)}",
        f"    Port {session['ssh_port']}",
        f"    User {user}",
    ]
    lines += [f"    {name} {_quoted(value)}" for name, value in _options(env, session)]
    return "\n".join(lines) + "\n"
