"""The user's side of SSH: private keys kept under ``~/.ssh/sandman/``, the gateway's
known-hosts line, and the ``ssh`` command line or ``~/.ssh/config`` block that uses them."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.client.settings import home

#: ``<user>-<session uuid>``, as older clients named keys (a user name has at most 32
#: characters, so no other user's ``<name>`` key file looks like this).
_LEGACY_SESSION_SUFFIX = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def key_dir(env: Mapping[str, str]) -> Path:
    return home(env) / ".ssh" / "sandman"


def key_path(env: Mapping[str, str], user_id: str) -> Path:
    """Where the generated private key of the user's latest session is kept: one file per
    user, replaced when a new session's key arrives, so a ``~/.ssh/config`` block naming it
    keeps working from one session to the next."""
    return key_dir(env) / user_id


def _session_marker(env: Mapping[str, str], user_id: str) -> Path:
    """Which session the user's key file belongs to (its id); with no key file beside it,
    that session was made with the user's own keys."""
    return key_dir(env) / f"{user_id}.session"


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


def remember_session_key(env: Mapping[str, str], session: Mapping[str, Any]) -> Path | None:
    """Keep what a new session of this client logs in with: its generated private key as
    the user's key file (replacing the previous session's, and removing per-session key
    files of older clients), or, for a session made with the user's own keys, no key file.
    Returns the key file, if one was saved."""
    user, session_id = session["ssh_user"], session["session_id"]
    directory = key_dir(env)
    for stale in directory.glob(f"{user}-*"):  # the per-session files of older clients
        if _LEGACY_SESSION_SUFFIX.fullmatch(stale.name.removeprefix(f"{user}-")):
            stale.unlink(missing_ok=True)
    key: Path | None = key_path(env, user)
    if session.get("ssh_private_key"):
        save_private_key(key, session["ssh_private_key"])
    else:
        key.unlink(missing_ok=True)
        key = None
    _private_dir(directory)
    _session_marker(env, user).write_text(session_id + "\n", encoding="utf-8")
    return key


def _key_for(env: Mapping[str, str], user: str, session_id: str) -> tuple[bool, Path | None]:
    """Whether this client saw the session's key, and the key file ssh should use (None:
    the user's own keys)."""
    legacy = key_dir(env) / f"{user}-{session_id}"  # saved by an older client
    if legacy.exists():
        return True, legacy
    marker = _session_marker(env, user)
    try:
        seen = marker.read_text(encoding="utf-8").strip() == session_id
    except OSError:
        seen = False
    key = key_path(env, user)
    return seen, key if seen and key.exists() else None


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
    seen, key = _key_for(env, user, session_id)
    if key is not None:
        options += [("IdentityFile", str(key)), ("IdentitiesOnly", "yes")]
    elif not seen:  # the key is not here: say so (see unseen_key_note) rather than prompt
        options += [("PasswordAuthentication", "no"), ("KbdInteractiveAuthentication", "no")]
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


def unseen_key_note(env: Mapping[str, str], session: Mapping[str, Any]) -> str | None:
    """What to tell the user when this client never saw the session's key (another client,
    the admin page or curl created it), or None."""
    session_id = session.get("id") or session["session_id"]
    user = session.get("user_id") or session["ssh_user"]
    if _key_for(env, user, session_id)[0]:
        return None
    return (
        f"no key of session {session_id} is saved here (a generated key is saved only by the "
        "`sandman session create` that made the session, and is shown once); trying your own "
        "SSH keys, with no password prompt (-o PasswordAuthentication=yes asks for one)"
    )


def _quoted(value: str) -> str:
    return f'"{value}"' if any(c.isspace() for c in value) else value


def ssh_config(env: Mapping[str, str], session: Mapping[str, Any], url: str) -> str:
    """A ``Host sandman-<user>`` block for ``~/.ssh/config`` that keeps working for the
    user's later sessions: their port is sticky, the key file is the user's (replaced with
    each session this client creates), and the host CA trusts every session's host key."""
    user = session.get("user_id") or session["ssh_user"]
    lines = [
        f"Host sandman-{user}",
        f"    HostName {ssh_host(session, url)}",
        f"    Port {session['ssh_port']}",
        f"    User {user}",
    ]
    key = key_path(env, user)
    if key.exists():
        lines += [f"    IdentityFile {_quoted(str(key))}", "    IdentitiesOnly yes"]
    if session.get("ssh_known_hosts"):
        known = remember_known_hosts(env, session["ssh_known_hosts"])
        lines.append(f"    UserKnownHostsFile {_quoted(str(known))}")
    return "\n".join(lines) + "\n"
