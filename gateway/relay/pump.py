"""Byte pumps between a client and its upstream, with backpressure and half-close."""

from __future__ import annotations

import asyncio
import contextlib
import socket

CHUNK = 64 * 1024


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """Copy ``reader`` into ``writer`` until EOF, then half-close ``writer``.

    ``drain()`` after every chunk bounds what is buffered: a slow receiver pauses
    reading from the sender. Returns the number of bytes copied.
    """
    copied = 0
    while chunk := await reader.read(CHUNK):
        writer.write(chunk)
        copied += len(chunk)
        await writer.drain()
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    return copied


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.CancelledError):
        await writer.wait_closed()
