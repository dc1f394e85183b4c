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
from collections.abc import Callable
from datetime import datetime
from typing import Self

from gateway.models import CloseReason
from gateway.relay.connection import ConnectionObserver, RelayedConnection, RelayLimits
from gateway.relay.pump import close_writer


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
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.port = port
        self.upstream: tuple[str, int] | None = None
        self._limits = limits
        self._observer = observer
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._live: dict[RelayedConnection, asyncio.Task[None]] = {}

    @property
    def active(self) -> int:
        return len(self._live)

    def set_upstream(self, host: str, port: int) -> None:
        self.upstream = (host, port)

    async def bind(self, host: str) -> None:
        """Raises: OSError: the port cannot be bound."""
        self._server = await asyncio.start_server(
            self._on_client, host=host, port=self.port, reuse_address=True
        )

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= self._limits.max_connections:
            self._observer.connection_refused(self.session_id)
            message = f"sandman: this session already has {self.active} connections (the limit)"
            writer.write(message.encode() + b"\r\n")
            await close_writer(writer)
            return
        connection = RelayedConnection(
            session_id=self.session_id,
            user_id=self.user_id,
            reader=reader,
            writer=writer,
            limits=self._limits,
            observer=self._observer,
            clock=self._clock,
        )
        task = asyncio.current_task()
        assert task is not None
        self._live[connection] = task
        try:
            await connection.run(self.upstream)
        finally:
            del self._live[connection]

    async def close(self, reason: CloseReason = CloseReason.GATEWAY_SHUTDOWN) -> None:
        """Stop accepting, cut every live connection with ``reason``, wait until recorded."""
        if self._server is not None:
            self._server.close()
        while self._live:
            for connection in list(self._live):
                connection.cut(reason)
            await asyncio.gather(*self._live.values(), return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
