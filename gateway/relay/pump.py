"""The portable data path (asyncio streams) and what both paths share: accounting, connecting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

from gateway.core.ssh_transport import KexWatch, Phase

CHUNK = 256 * 1024


def set_nodelay(sock: socket.socket) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(address: tuple[str, int]) -> socket.socket:
    """A non-blocking socket connected to ``address``.

    Raises:
        OSError: the connection failed.
    """
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def streams(
    sock: socket.socket,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Asyncio streams over ``sock`` (the portable data path); closed on exit."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


class Flow:
    """One direction's accounting: bytes, last activity, and what its plaintext start
    says (:class:`~gateway.core.ssh_transport.KexWatch`: identification line, key exchange)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.banner_seen = asyncio.Event()
        self.kex_done = asyncio.Event()
        self.last_activity = time.monotonic()
        self._watch = KexWatch()

    @property
    def banner(self) -> str | None:
        return self._watch.banner

    @property
    def sniffing(self) -> bool:
        """True while the bytes must pass through :meth:`observe` (the plaintext start)."""
        return self._watch.watching

    def moved(self, count: int) -> None:
        self.bytes += count
        self.last_activity = time.monotonic()

    def observe(self, chunk: bytes) -> None:
        self.moved(len(chunk))
        if self._watch.watching:
            self._watch.feed(chunk)
            if self._watch.banner is not None:
                self.banner_seen.set()
            if self._watch.phase is Phase.DONE:
                self.kex_done.set()


class PeerFailed(Exception):
    """A socket of the pump failed: its source (``source=True``) or its destination."""

    def __init__(self, *, source: bool) -> None:
        super().__init__("source failed" if source else "destination failed")
        self.source = source


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flow: Flow) -> None:
    """Copy ``reader`` into ``writer`` until EOF, then half-close ``writer``.

    ``drain()`` after every chunk bounds what is buffered: a slow receiver pauses
    reading from the sender.

    Raises:
        PeerFailed: reading or writing failed (reset, broken pipe).
    """
    while True:
        try:
            chunk = await reader.read(CHUNK)
        except OSError as exc:
            raise PeerFailed(source=True) from exc
        if not chunk:
            break
        flow.observe(chunk)
        writer.write(chunk)
        try:
            await writer.drain()
        except OSError as exc:
            raise PeerFailed(source=False) from exc
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()


CLOSE_GRACE = 1.0


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close, flushing what is buffered for up to :data:`CLOSE_GRACE` seconds; a peer
    that reads nothing is then aborted, so closing never hangs."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass
