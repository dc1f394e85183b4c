"""Loopback port checks shared by unit and end-to-end tests."""

from __future__ import annotations

import os
import socket

#: The first of the 20 session ports a unit test's gateway uses: one block per test process,
#: so test runs side by side on one machine do not take each other's ports.
UNIT_PORT_BASE = 15000 + (os.getpid() % 100) * 20


def port_bindable(port: int) -> bool:
    """Nothing listens on ``127.0.0.1:port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_tcp_port() -> int:
    """A loopback port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bindable_unit_port() -> int:
    """A port of this process's unit block that nothing listens on now (for a gateway with a
    one-port pool: full after one session)."""
    return next(p for p in range(UNIT_PORT_BASE, UNIT_PORT_BASE + 20) if port_bindable(p))
