"""Helpers shared by the unit tests that drive a gateway (``make_client``/``make_server``)."""

from __future__ import annotations

import asyncio
import struct
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api import keys
from gateway.models import Session

EXAMPLES = Path(__file__).parents[2] / "examples"


async def create(client, **body):
    """POST /sessions, for alice unless the body names another user."""
    body.setdefault("user_id", "alice")
    return await client.post("/sessions", json=body)


def packet(message: int, body: bytes = b"") -> bytes:
    """A plaintext SSH binary packet (RFC 4253 6), padded to a multiple of 8."""
    padding = 8 - (5 + 1 + len(body)) % 8
    padding += 8 if padding < 4 else 0
    payload = bytes([message]) + body
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + b"\0" * padding


#: NEWKEYS, the end of a key exchange: a connection that sends it is recorded in full.
KEX_END = packet(21)

SERVER_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1\r\n"
#: What a client sends up to the end of its key exchange (KEXINIT, ECDH_INIT, NEWKEYS).
CLIENT_KEX = CLIENT_BANNER + packet(20, b"k" * 300) + packet(30, b"e" * 36) + KEX_END


async def echo_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A stand-in for a container's sshd: says its banner, then echoes what it reads."""
    writer.write(SERVER_BANNER)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def hello(port: int, banner: bytes) -> bytes:
    """One client connection through the session port that says ``banner``, ends a key
    exchange (so it is recorded), reads the server's identification line (returned) and
    leaves."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(banner + b"\r\n" + KEX_END)
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    return line


async def connections_written(app: web.Application) -> None:
    """Return once the relay has ended every connection and their records are written.

    The relay ends a connection in a task of its own once both sides have closed, and
    only then queues its record: this waits (at most 5 s) for that count to reach zero,
    then for the audit queue (:meth:`Audit.flush`)."""
    sessions = app[keys.SESSIONS]
    async with asyncio.timeout(5):
        while sessions.live_connections:  # noqa: ASYNC110 (the relay offers no event for it)
            await asyncio.sleep(0.01)
    await app[keys.AUDIT].flush()


def a_session(created_at: datetime, *, ttl_seconds: int = 3600, **fields: Any) -> Session:
    """A session row for a test that needs one outside a gateway: ``alice``'s, expiring
    ``ttl_seconds`` after ``created_at``; ``fields`` set the rest."""
    return Session(**{
        "id": "s1", "user_id": "alice", "uid": 2000, "ssh_port": 2222, "image": "img",
        "workspace": "/w", "ttl_seconds": ttl_seconds, "created_at": created_at,
        "expires_at": created_at + timedelta(seconds=ttl_seconds), **fields,
    })  # fmt: skip
