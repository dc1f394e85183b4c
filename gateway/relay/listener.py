"""A session's TCP listener: accepts SSH clients and relays each into the container.

The listener is bound when the session's port is reserved (binding proves the port
is free) and learns its upstream once the container has an address. It keeps the
live connections in a registry (:attr:`SessionListener.active` is its size). A newcomer
that finds every slot taken makes a connection that has not finished its key exchange
yield (:mod:`gateway.core.admission`); if every one has, the newcomer is refused with an
SSH disconnect message the client prints (counted, never recorded: a flood must not
become database writes). :meth:`SessionListener.close` cuts every connection with the
given reason and waits until each is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from datetime import datetime
from typing import Self

from gateway.core.admission import Slot, admit
from gateway.core.ssh_transport import disconnect_message
from gateway.models import CloseReason
from gateway.relay import splice as splice_module
from gateway.relay.connection import (
    ConnectionObserver,
    RelayedConnection,
    RelayLimits,
    Resolver,
    resolved,
)
from gateway.relay.splice import PipePool

log = logging.getLogger(__name__)

ACCEPT_RETRY = 0.5  # seconds to wait after accept() fails (e.g. no file descriptor left)
REFUSAL_LINGER = 2.0  # seconds a refused client gets to read the refusal and close first


def refusal_text(limit: int) -> str:
    return f"too many connections to this session (limit {limit}); close one or use ControlMaster"


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
        pipes: PipePool | None = None,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.port = port
        self.upstream: tuple[str, int] | None = None
        self.resolve: Resolver | None = None
        self._limits = limits
        self._observer = observer
        self._clock = clock
        self._splice = splice
        self._own_pipes = pipes is None  # else shared with other listeners, closed by its owner
        self._pipes = pipes if pipes is not None else PipePool()
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
    def established(self) -> int:
        """The live connections that finished their key exchange (logins, not scanners)."""
        return sum(c.kex_done for c in self._live)

    @property
    def last_seen(self) -> datetime | None:
        """The last moment a relayed connection that finished its key exchange was open
        (now, while one is); None: none since the listener was bound. Idle reclaim's
        connection clock: a scanner or squatter that never gets past the key exchange
        does not keep a session."""
        return self._clock() if self.established else self._last_seen

    def set_upstream(self, host: str, port: int, resolve: Resolver | None = None) -> None:
        """Relay to ``(host, port)``; with ``resolve``, ask it where to connect at each new
        connection and once more if that address fails (a container that can move)."""
        self.upstream = (host, port)
        self.resolve = resolve

    async def where_to_connect(self) -> tuple[str, int] | None:
        """The container's sshd for a new connection (None: not known yet). The one place
        that decides it, asked once per connection: with a ``resolve`` (a runtime whose
        backends move), its answer, or the last address when it fails."""
        if self.resolve is None:
            return self.upstream
        return await resolved(self.resolve, self.upstream, self.session_id)

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
        if self.active >= self._limits.max_connections and not self._make_room():
            self._observer.connection_refused(self.session_id)  # counted, never recorded:
            await _refuse(client, refusal_text(self._limits.max_connections))  # floods
            return  # must not become writes
        try:
            connection = RelayedConnection(
                session_id=self.session_id,
                user_id=self.user_id,
                client=client,
                limits=self._limits,
                observer=self._observer,
                clock=self._clock,
                splice=self._splice,
                pipes=self._pipes,
            )
        except OSError:  # gone before we looked (getpeername)
            client.close()
            return
        self._live.add(connection)
        if self._closing is not None:
            connection.cut(self._closing)
        try:
            await connection.run(await self.where_to_connect(), self.resolve)
        finally:
            self._live.discard(connection)
            if connection.kex_done:
                self._last_seen = self._clock()

    def _make_room(self) -> bool:
        """Every slot looks taken: cut one that has not finished its key exchange if
        :func:`~gateway.core.admission.admit` says so. False: the newcomer is refused."""
        staying = {c: c for c in self._live if not c.ending}
        slots = [Slot(c, c.record.client_addr, c.silent_since, c.kex_done) for c in staying]
        decision = admit(slots, self._limits.max_connections)
        if decision.evict is not None:
            staying[decision.evict].cut(CloseReason.EVICTED)  # type: ignore[index]
        return decision.admit

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
        if self._own_pipes:
            self._pipes.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def _refuse(client: socket.socket, text: str) -> None:
    """Send our identification line and a plaintext SSH disconnect saying ``text``, then
    let the client read it and close first (closing on its unread bytes would reset the
    connection, and a reset can lose the message); at most :data:`REFUSAL_LINGER` s."""
    loop = asyncio.get_running_loop()
    try:
        client.setblocking(False)
        client.send(disconnect_message(text))  # a fresh socket's buffer takes it whole
        client.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(REFUSAL_LINGER):
            while await loop.sock_recv(client, 4096):
                pass
    except (OSError, TimeoutError):
        pass
    finally:
        client.close()
