"""Reading an SSH server's identification line, to know a session is ready."""

from __future__ import annotations

import asyncio

from gateway.relay.pump import close_writer

BANNER_TIMEOUT = 2.0


async def read_banner(host: str, port: int) -> bytes | None:
    """The first line the server at ``host:port`` sends if it starts with ``SSH-``, else None."""
    try:
        async with asyncio.timeout(BANNER_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                line = await reader.readline()
            finally:
                await close_writer(writer)
    except (OSError, TimeoutError):
        return None
    return line if line.startswith(b"SSH-") else None
