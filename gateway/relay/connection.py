"""One relayed SSH connection: pumps both ways, enforces its deadlines, and records why it ended.

A connection ends, with a :class:`~gateway.models.CloseReason`, when both sides have
closed (the first to close names it), a socket fails, the client sends no SSH
identification line within the pre-auth deadline, no byte moves either way for the
idle timeout, or the gateway cuts it (session expired or deleted, shutdown, or evicted
for a newcomer while its key exchange was not done).

Only a connection whose client finished its key exchange (sent NEWKEYS) is recorded in
full: opened when that happens, closed when it ends. One that ends before is only told
to the observer as :meth:`ConnectionObserver.connection_ended_before_kex` (counted and
summarised), so connect-and-close churn never becomes a row per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol

from gateway.models import CloseReason, ConnectionRecord
from gateway.relay.pump import Flow, PeerFailed, connect, pump, set_nodelay, streams
from gateway.relay.splice import PipePool, splice_pump

log = logging.getLogger(__name__)

UPSTREAM_CONNECT_TIMEOUT = 5.0

#: Where a session's container answers now (None: nowhere yet), for runtimes whose
#: containers can move or be replaced while the session lives (Swarm tasks).
Resolver = Callable[[], Awaitable[tuple[str, int] | None]]


async def resolved(
    resolve: Resolver, known: tuple[str, int] | None, session_id: str
) -> tuple[str, int] | None:
    """Ask ``resolve`` where the session's sshd is now; if it fails or takes longer than
    the connect timeout, the ``known`` address."""
    try:
        async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
            return await resolve()
    except Exception as exc:  # the engine is down or slow: the last address may do
        log.warning("session %s: resolving the upstream failed: %r", session_id, exc)
        return known


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_connections: int = 32
    preauth_timeout: float = 10.0
    idle_timeout: float | None = None  # None: off


class ConnectionObserver(Protocol):
    """Told when a connection opens and when it ends (the audit trail), and counts refusals."""

    async def connection_opened(self, record: ConnectionRecord) -> None:
        """The client finished its key exchange: a real login attempt, recorded."""

    async def connection_closed(self, record: ConnectionRecord) -> None:
        """A connection told to :meth:`connection_opened` ended."""

    def connection_ended_before_kex(self, record: ConnectionRecord) -> None:
        """A connection ended before its client finished the key exchange: counted and
        summarised, never a record of its own."""

    def connection_refused(self, session_id: str) -> None:
        """A connection over the limit was turned away: a counter, no record."""


class _Deadline(Exception):
    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class RelayedConnection:
    """Relays one accepted client to ``upstream``; :meth:`run` returns when it has ended.

    ``splice`` picks the data path: the kernel's (:mod:`gateway.relay.splice`) or asyncio
    streams (:func:`gateway.relay.pump.pump`).
    """

    def __init__(
        self,
        *,
        session_id: str,
        user_id: str,
        client: socket.socket,
        limits: RelayLimits,
        observer: ConnectionObserver,
        clock: Callable[[], datetime],
        splice: bool,
        pipes: PipePool,
    ) -> None:
        peer = client.getpeername()
        self.record = ConnectionRecord(
            id=str(uuid.uuid4()),
            session_id=session_id,
            user_id=user_id,
            client_addr=str(peer[0]),
            client_port=int(peer[1]),
            started_at=clock(),
        )
        self._client = client
        self._limits = limits
        self._observer = observer
        self._clock = clock
        self._splice = splice
        self._pipes = pipes
        self._opened = False
        self._up = Flow()  # client -> container
        self._down = Flow()  # container -> client
        self._cut_reason: CloseReason | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def kex_done(self) -> bool:
        """The client has finished its key exchange (its stream is encrypted now)."""
        return self._up.kex_done.is_set()

    @property
    def silent_since(self) -> float:
        """When (``time.monotonic()``) the client last sent a byte."""
        return self._up.last_activity

    @property
    def ending(self) -> bool:
        """Cut by the gateway, on its way out."""
        return self._cut_reason is not None

    def cut(self, reason: CloseReason) -> None:
        """End the connection from the gateway's side with ``reason``."""
        if self._cut_reason is not None:
            return
        self._cut_reason = reason
        if self._task is not None:
            self._task.cancel()

    async def run(self, upstream: tuple[str, int] | None, resolve: Resolver | None = None) -> None:
        """Relay to ``upstream`` until the connection ends. With ``resolve``, the upstream
        is looked up once more if connecting to it fails."""
        self._task = asyncio.current_task()
        reason, closed_by = CloseReason.ERROR, "gateway"
        try:
            if self._cut_reason is None:
                reason, closed_by = await self._relay(upstream, resolve)
            else:  # cut before it ran
                reason = self._cut_reason
        except asyncio.CancelledError:
            reason, closed_by = self._cut_reason or CloseReason.GATEWAY_SHUTDOWN, "gateway"
        except Exception:
            log.exception("session %s: relay failed", self.record.session_id)
        finally:
            await _through_cancellation(self._finish(reason, closed_by))

    async def _open(self) -> None:
        if not self._opened:
            self._opened = True
            await self._observer.connection_opened(self.record)

    async def _finish(self, reason: CloseReason, closed_by: str) -> None:
        self._client.close()
        self.record = replace(
            self.record,
            ended_at=self._clock(),
            bytes_up=self._up.bytes,
            bytes_down=self._down.bytes,
            client_banner=self._up.banner,
            server_banner=self._down.banner,
            closed_by=closed_by,
            reason=reason,
        )
        if self.kex_done:
            await self._open()  # it may end in the same moment its key exchange did
            await self._observer.connection_closed(self.record)
        else:
            self._observer.connection_ended_before_kex(self.record)

    async def _connect(
        self, upstream: tuple[str, int] | None, resolve: Resolver | None
    ) -> socket.socket | None:
        """A socket connected to ``upstream``; if that fails and there is a ``resolve``,
        to the address it gives when asked once more (a task being replaced). None: no
        answer from either."""
        for attempt in range(2 if resolve is not None else 1):
            if attempt and resolve is not None:
                upstream = await resolved(resolve, upstream, self.record.session_id)
            if upstream is None:
                continue
            try:
                async with asyncio.timeout(UPSTREAM_CONNECT_TIMEOUT):
                    return await connect(upstream)
            except (OSError, TimeoutError) as exc:
                log.info(
                    "session %s: upstream %s unreachable (try %d): %s",
                    self.record.session_id, upstream, attempt + 1, exc,
                )  # fmt: skip
        return None

    async def _relay(
        self, upstream: tuple[str, int] | None, resolve: Resolver | None
    ) -> tuple[CloseReason, str]:
        server = await self._connect(upstream, resolve)
        if server is None:
            return CloseReason.UPSTREAM_UNREACHABLE, "gateway"
        with server:
            set_nodelay(self._client)
            set_nodelay(server)
            if self._splice:
                return await self._supervise(
                    splice_pump(self._client, server, self._up, self._pipes),
                    splice_pump(server, self._client, self._down, self._pipes),
                )
            async with streams(self._client) as client, streams(server) as upstream_streams:
                return await self._supervise(
                    pump(client[0], upstream_streams[1], self._up),
                    pump(upstream_streams[0], client[1], self._down),
                )

    async def _supervise(
        self, up: Coroutine[Any, Any, None], down: Coroutine[Any, Any, None]
    ) -> tuple[CloseReason, str]:
        """Run both directions and the deadlines; say why and by whom the connection ended."""
        closed_first: list[str] = []

        async def direction(work: Coroutine[Any, Any, None], source: str) -> None:
            try:
                await work
            except PeerFailed as exc:
                other = "server" if source == "client" else "client"
                closed_first.append(source if exc.source else other)
                raise
            closed_first.append(source)

        deadline: CloseReason | None = None
        try:
            async with asyncio.TaskGroup() as group:
                name = self.record.id[:8]
                pumps = [
                    group.create_task(direction(up, "client"), name=f"{name}:up"),
                    group.create_task(direction(down, "server"), name=f"{name}:down"),
                ]
                watchers = [
                    group.create_task(self._guard(), name=f"{name}:guard"),
                    group.create_task(self._record_at_kex(), name=f"{name}:record"),
                ]
                await asyncio.gather(*pumps)
                for watcher in watchers:
                    watcher.cancel()
        except* _Deadline as expired:
            deadline = expired.exceptions[0].reason  # type: ignore[attr-defined]
        except* PeerFailed:
            pass  # closed_first names the side that failed
        if deadline is not None:
            return deadline, "gateway"
        side = closed_first[0] if closed_first else "client"
        reason = CloseReason.CLIENT_CLOSED if side == "client" else CloseReason.SERVER_CLOSED
        return reason, side

    async def _record_at_kex(self) -> None:
        await self._up.kex_done.wait()
        await self._open()

    async def _guard(self) -> None:
        """Raise :class:`_Deadline` when the pre-auth or idle deadline passes."""
        try:
            async with asyncio.timeout(self._limits.preauth_timeout):
                await self._up.banner_seen.wait()
        except TimeoutError:
            raise _Deadline(CloseReason.PREAUTH_TIMEOUT) from None
        idle = self._limits.idle_timeout
        if idle is None:
            await asyncio.Future()  # until the pumps finish and cancel us
            return
        while True:
            last = max(self._up.last_activity, self._down.last_activity)
            remaining = last + idle - time.monotonic()
            if remaining <= 0:
                raise _Deadline(CloseReason.IDLE_TIMEOUT)
            await asyncio.sleep(remaining)


async def _through_cancellation(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work`` to the end even if this task is cancelled again meanwhile: the
    connection is already ending, and its record must still be written."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
    task.result()
