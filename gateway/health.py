"""``sandman health``: ask the gateway on this machine for ``/healthz`` (container healthchecks)."""

from __future__ import annotations

import http.client

# A server bound to a wildcard address is reached on this machine's loopback.
WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def check(host: str, port: int, *, timeout: float = 5.0) -> tuple[bool, str]:
    """GET ``/healthz`` of the gateway whose API binds ``host:port``.

    Returns whether it answered 200, and a line saying what it answered (or why it
    could not be reached). Never raises for a connection failure or a timeout.
    """
    address = WILDCARD_TO_LOOPBACK.get(host, host)
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as exc:
        return False, f"gateway at {address}:{port} unreachable: {exc}"
    finally:
        conn.close()
    return response.status == 200, f"{response.status} {body}"
