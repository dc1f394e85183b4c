"""A session's TCP listener: accepts SSH clients and relays each into the container.

The listener is bound when the session's port is reserved (binding proves the port
is free) and learns its upstream once the container has an address. It keeps the
live connections in a registry (:attr:`SessionListener.active` is its size), refuses
connections beyond the limit (counted, never recorded: a flood must not become database
writes), and on :meth:`SessionListener.close` cuts every one with the given reason and
waits until each is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Self

from gateway.models import CloseReason
from gateway.relay import splice as splice_module
from gateway.relay.connection import ConnectionObserver, RelayedConnection, RelayLimits

log = logging.getLogger(__name__)

ACCEPT_RETRY = 0.5  # seconds to wait after accept() fails (e.g. no file descriptor left)


class SessionListener:
    """Owns one session's server socket and its relayed connections."""

    def __init__(
        self,
        session_id: str,
        user_id: str,
        port: int,
        *,
        limits: RelayLimits,
        observer: ConnectionObserver,
        clock: Callable[[], datetime],
        splice: bool = splice_module.AVAILABLE,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.port = port
        self.upstream: tuple[str, int] | None = None
        self._limits = limits
        self._observer = observer
        self._clock = clock
        self._splice = splice
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing: CloseReason | None = None
        self._live: set[RelayedConnection] = set()
        self._last_seen: datetime | None = None

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def last_seen(self) -> datetime | None:
        """The last moment a relayed connection was open (now, while one is); None: no
        connection since the listener was bound. Idle reclaim's connection clock."""
        return self._clock() if self._live else self._last_seen

    def set_upstream(self, host: str, port: int) -> None:
        self.upstream = (host, port)

    async def bind(self, host: str) -> None:
        """Listen on ``host`` (its first address) and :attr:`port`; port 0 picks one and
        sets :attr:`port`.

        Raises: OSError: the port cannot be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, address = infos[0]
        self._socket = socket.create_server(address, family=family, backlog=100)
        self._socket.setblocking(False)
        self.port = self._socket.getsockname()[1]
        self._accepting = asyncio.create_task(
            self._accept(self._socket), name=f"{self.session_id}:accept"
        )

    async def _accept(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(server)
            except OSError as exc:  # out of file descriptors, say: keep the listener
                log.warning("session %s: accept failed: %s", self.session_id, exc)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            task = asyncio.create_task(self._on_client(client), name=f"{self.session_id}:conn")
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _on_client(self, client: socket.socket) -> None:
        if self.active >= self._limits.max_connections:  # counted, never recorded: a flood
            self._observer.connection_refused(self.session_id)  # must not become writes
            message = f"sandman: this session already has {self.active} connections (the limit)"
            with contextlib.suppress(OSError):  # a fresh socket's buffer takes one line
                client.send(message.encode() + b"\r\n")
            client.close()
            return
        try:
            connection = RelayedConnection(
                session_id=self.session_id,
                user_id=self.user_id,
                client=client,
                limits=self._limits,
                observer=self._observer,
                clock=self._clock,
                splice=self._splice,
            )
        except OSError:  # gone before we looked (getpeername)
            client.close()
            return
        self._live.add(connection)
        if self._closing is not None:
            connection.cut(self._closing)
        try:
            await connection.run(self.upstream)
        finally:
            self._live.discard(connection)
            self._last_seen = self._clock()

    async def close(self, reason: CloseReason = CloseReason.GATEWAY_SHUTDOWN) -> None:
        """Stop accepting, cut every live connection with ``reason``, wait until recorded."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._closing = reason
        while self._handlers:
            for connection in list(self._live):
                connection.cut(reason)
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
