"""Where the client finds its server and token: options, then environment, then config file.

The config file is ``$XDG_CONFIG_HOME/sandman/config.toml`` (``~/.config/sandman/config.toml``
when ``XDG_CONFIG_HOME`` is unset), written 0600 by ``sandman login``; it holds ``url`` and
``token``.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class SettingsError(Exception):
    """The server or the token is unknown, or the config file is unreadable."""


@dataclass(frozen=True, slots=True)
class Settings:
    url: str
    token: str


def home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def config_path(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME")
    root = Path(base) if base else home(env) / ".config"
    return root / "sandman" / "config.toml"


def _toml_string(value: str) -> str:
    escaped = []
    for char in value:
        if char in '"\\':
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04x}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def save(path: Path, settings: Settings) -> None:
    """Write the config file, readable by its owner only (0600 from the first byte)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = f"url = {_toml_string(settings.url)}\ntoken = {_toml_string(settings.token)}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(text)


def _load(path: Path) -> dict[str, object]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None


def saved_url(env: Mapping[str, str]) -> str | None:
    """The client's server, from ``SANDMAN_URL`` or the config file (no token needed).

    Raises:
        SettingsError: the config file is broken.
    """
    path = config_path(env)
    return env.get("SANDMAN_URL") or _string(_load(path), "url", path) or None


def resolve(url: str | None, token: str | None, env: Mapping[str, str]) -> Settings:
    """The server and token: each from its option, else ``SANDMAN_URL`` / ``SANDMAN_TOKEN``,
    else the config file.

    Raises:
        SettingsError: either is still unknown, or the config file is broken.
    """
    url = url or env.get("SANDMAN_URL") or None
    token = token or env.get("SANDMAN_TOKEN") or None
    if url is None or token is None:
        path = config_path(env)
        stored = _load(path)
        url = url or _string(stored, "url", path)
        token = token or _string(stored, "token", path)
    if not url or not token:
        raise SettingsError(
            "no server or token: run `sandman login --url URL --token-file FILE`, "
            "or give --url/--token or SANDMAN_URL/SANDMAN_TOKEN"
        )
    return Settings(url=url.rstrip("/"), token=token)


def _string(stored: dict[str, object], key: str, path: Path) -> str | None:
    value = stored.get(key)
    if value is not None and not isinstance(value, str):
        raise SettingsError(f"{path}: {key} must be a string")
    return value
