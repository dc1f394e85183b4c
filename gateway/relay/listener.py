"""A session's TCP listener: accepts SSH clients and relays each into the container.

The listener is bound when the session's port is reserved (binding proves the port
is free) and learns its upstream once the container has an address. Closing it stops
accepting and cuts every live connection; :meth:`SessionListener.active` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Self

from gateway.relay.pump import close_writer, pump, set_nodelay

log = logging.getLogger(__name__)

UPSTREAM_CONNECT_TIMEOUT = 5.0


class SessionListener:
    """Owns one session's server socket and its relayed connections."""

    def __init__(self, session_id: str, port: int) -> None:
        self.session_id = session_id
        self.port = port
        self.upstream: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def active(self) -> int:
        return len(self._connections)

    def set_upstream(self, host: str, port: int) -> None:
        self.upstream = (host, port)

    async def _serve(self, bind: str) -> None:
        self._server = await asyncio.start_server(
            self._on_client, host=bind, port=self.port, reuse_address=True
        )

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("session %s: relay failed", self.session_id)
        finally:
            self._connections.discard(task)
            await close_writer(writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.upstream is None:
            return
        try:
            async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except (OSError, TimeoutError) as exc:
            log.debug(
                "session %s: upstream %s unreachable: %s", self.session_id, self.upstream, exc
            )
            return
        set_nodelay(writer)
        set_nodelay(up_writer)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(pump(reader, up_writer), name=f"{self.session_id}:up")
                group.create_task(pump(up_reader, writer), name=f"{self.session_id}:down")
        except* (ConnectionError, OSError):
            pass  # one side reset: the other is closed below
        finally:
            await close_writer(up_writer)

    async def close(self) -> None:
        """Stop accepting, cut every live connection and wait until they are gone."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        while self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def open_listener(session_id: str, bind: str, port: int) -> SessionListener:
    """Bind a listener for ``session_id`` on ``bind:port``.

    Raises:
        OSError: the port cannot be bound (another process holds it).
    """
    listener = SessionListener(session_id, port)
    await listener._serve(bind)
    return listener
