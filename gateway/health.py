"""``sandman health``: ask a gateway for ``/healthz`` (container healthchecks, operators)."""

from __future__ import annotations

import http.client
from collections.abc import Mapping
from urllib.parse import urlsplit

from gateway.client.settings import SettingsError, saved_url

# A server bound to a wildcard address is reached on this machine's loopback.
WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}
DEFAULT_PORT = 8080


def health_url(url: str | None, host: str | None, port: int | None, env: Mapping[str, str]) -> str:
    """Which gateway to ask: ``url``; else ``host``/``port`` (the API's bind address, as
    ``serve`` reads it); else the client's saved URL; else this machine's default port."""
    if url:
        return url
    if host is None and port is None:
        try:
            saved = saved_url(env)
        except SettingsError:
            saved = None
        if saved:
            return saved
    address = WILDCARD_TO_LOOPBACK.get(host or "", host or "127.0.0.1")
    if ":" in address:
        address = f"[{address}]"
    return f"http://{address}:{port or DEFAULT_PORT}"


def check(url: str, *, timeout: float = 5.0) -> tuple[bool, str]:
    """GET ``/healthz`` of the gateway at ``url`` (http or https).

    Returns whether it answered 200, and a line saying what it answered (or why it
    could not be reached). Never raises for a connection failure or a timeout.
    """
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    try:
        conn = kind(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    except ValueError as exc:  # a port that is not a number
        return False, f"not a gateway URL: {url} ({exc})"
    try:
        conn.request("GET", parts.path.rstrip("/") + "/healthz")
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as exc:
        return False, f"gateway at {url} unreachable: {exc}"
    finally:
        conn.close()
    return response.status == 200, f"{response.status} {body}"
