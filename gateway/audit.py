"""The audit trail: every connection and session lifecycle event, to SQLite and a JSON-lines file.

Each event is one row of ``audit_events`` and one line of ``--audit-log``; connection
records also live in ``connections``. Ended connections feed the metrics here, so the
counters and the records always agree.

Writes go through one queue, in order, drained by a single writer task: a relayed
connection only enqueues its records (opening and closing never wait on the database),
a session event waits for its own write. The queue is written as fast as SQLite
takes it (a record is durable within milliseconds); :meth:`Audit.aclose` drains it.
A session's end and the disconnects of records a crash left open are stored by the store
in the transaction of the change they record; only their log-file lines go through here.

Only connections that finished their key exchange are recorded one by one; those that
ended before (scanners, squatters, connect-and-close floods) are counted in the metrics
and summarised as one ``connections_before_kex`` event per session and source address
per :data:`SUMMARY_INTERVAL`, so churn costs a bounded queue and a bounded number of rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from gateway.metrics import Metrics
from gateway.models import AuditEvent, ConnectionRecord, Session, rfc3339
from gateway.store import Store
from gateway.store.db import ensure_private_file

log = logging.getLogger(__name__)

SUMMARY_INTERVAL = 60.0  # seconds between summaries of connections that ended before kex
SUMMARY_SOURCES = 1024  # sources summarised apart per interval; the rest as "other"


def connection_data(record: ConnectionRecord) -> dict[str, Any]:
    """The JSON shape of a connection record (API and audit log)."""
    return {
        "id": record.id,
        "session_id": record.session_id,
        "user_id": record.user_id,
        "client_addr": record.client_addr,
        "client_port": record.client_port,
        "started_at": rfc3339(record.started_at, fraction=True),
        "ended_at": None if record.ended_at is None else rfc3339(record.ended_at, fraction=True),
        "duration_seconds": record.duration,
        "bytes_client_to_container": record.bytes_up,
        "bytes_container_to_client": record.bytes_down,
        "client_banner": record.client_banner,
        "server_banner": record.server_banner,
        "closed_by": record.closed_by,
        "reason": None if record.reason is None else record.reason.value,
    }


def disconnect_data(record: ConnectionRecord) -> dict[str, Any]:
    """The data of a connection's ``disconnect`` event: its record, less what the event's
    own fields say."""
    data = connection_data(record)
    for key in ("id", "session_id", "user_id"):
        del data[key]
    return data


def session_data(session: Session, **data: Any) -> dict[str, Any]:
    """The data of a session event: the session's port, GPU and expiry, and ``data``."""
    return {
        "ssh_port": session.ssh_port,
        "gpu_uuid": session.gpu_uuid,
        "expires_at": rfc3339(session.expires_at),
        **data,
    }


def event_data(event: AuditEvent) -> dict[str, Any]:
    return {
        **event.data,
        "id": event.id,
        "at": rfc3339(event.at, fraction=True),
        "event": event.event,
        "session_id": event.session_id,
        "user_id": event.user_id,
        "connection_id": event.connection_id,
    }


@dataclass(slots=True)
class _Summary:
    """Connections from one source to one session that ended before key exchange."""

    first_at: datetime
    last_at: datetime
    reasons: Counter[str] = field(default_factory=Counter)

    def data(self, client_addr: str) -> dict[str, Any]:
        return {
            "client_addr": client_addr,
            "count": sum(self.reasons.values()),
            "reasons": dict(sorted(self.reasons.items())),
            "first_at": rfc3339(self.first_at, fraction=True),
            "last_at": rfc3339(self.last_at, fraction=True),
        }


_Write = tuple[Callable[[], Awaitable[None]], "asyncio.Future[None] | None"]


class Audit:
    """Records the trail. :meth:`aclose` writes what is queued and closes the log file."""

    def __init__(
        self,
        store: Store,
        metrics: Metrics,
        log_path: Path | None,
        clock: Callable[[], datetime],
        *,
        summary_interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._file: IO[str] | None = None
        if log_path is not None:
            ensure_private_file(log_path)  # it names users, addresses and sessions
            self._file = log_path.open("a", encoding="utf-8")
        self._queue: asyncio.Queue[_Write] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._summary_interval = summary_interval
        self._summaries: dict[tuple[str, str, str], _Summary] = {}
        self._summary_timer: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        """Writes waiting for the writer task."""
        return self._queue.qsize()

    async def aclose(self) -> None:
        """Write everything queued (and the pending summaries), stop the writer, close the
        log file."""
        self._flush_summaries()
        if self._writer is not None:
            queued = self._queue.qsize()
            await self._queue.join()
            log.info("shutdown: wrote the %d queued audit records", queued)
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._file is not None:
            self._file.close()
            self._file = None

    async def flush(self) -> None:
        """Return once every record queued so far (and any queued meanwhile) is written, or
        its failure logged. Records of connections still open are not queued yet."""
        await self._queue.join()

    def _enqueue(
        self, work: Callable[[], Awaitable[None]], done: asyncio.Future[None] | None = None
    ) -> None:
        """Queue ``work``; ``done`` (if given) gets its outcome, else failures are logged."""
        self._queue.put_nowait((work, done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queue(), name="audit-writer")

    async def _write_queue(self) -> None:
        while True:
            work, done = await self._queue.get()
            try:
                await work()
            except Exception as exc:
                if done is None:
                    log.exception("audit: a connection record was not written")
                elif not done.done():
                    done.set_exception(exc)
            else:
                if done is not None and not done.done():
                    done.set_result(None)
            finally:
                self._queue.task_done()

    async def _event(
        self,
        event: str,
        data: dict[str, Any],
        *,
        session_id: str | None,
        user_id: str,
        connection_id: str | None = None,
    ) -> None:
        saved = await self._store.add_event(
            self._clock(),
            event,
            session_id=session_id,
            user_id=user_id,
            connection_id=connection_id,
            data=data,
        )
        await self._write_line(saved)

    async def _write_line(self, saved: AuditEvent) -> None:
        if self._file is not None:  # only the writer task gets here, so lines never mix
            self._file.write(json.dumps(event_data(saved)) + "\n")
            self._file.flush()

    def stored(self, events: list[AuditEvent]) -> None:
        """Queue the log-file lines of events the store wrote together with the change
        they record (a session's end with its row's deletion, the disconnects of records
        closed at start-up)."""
        for saved in events:
            self._enqueue(lambda saved=saved: self._write_line(saved))

    async def _connection_event(
        self, event: str, record: ConnectionRecord, data: dict[str, Any]
    ) -> None:
        await self._event(
            event,
            data,
            session_id=record.session_id,
            user_id=record.user_id,
            connection_id=record.id,
        )

    async def connection_opened(self, record: ConnectionRecord) -> None:
        """Queue the record and its ``connect`` event; returns at once."""

        async def write() -> None:
            await self._store.save_connection(record)
            await self._connection_event(
                "connect",
                record,
                {"client_addr": record.client_addr, "client_port": record.client_port},
            )

        self._enqueue(write)

    async def connection_closed(self, record: ConnectionRecord) -> None:
        """Count it in the metrics, queue the final record and its ``disconnect`` event."""
        self._metrics.connection_ended(record)

        async def write() -> None:
            await self._connection_event("disconnect", record, disconnect_data(record))
            # last: whoever sees the record ended also finds its event (row and log line)
            await self._store.save_connection(record)

        self._enqueue(write)

    def connection_ended_before_kex(self, record: ConnectionRecord) -> None:
        """Counted, and summarised per session and source at the end of the interval."""
        assert record.reason is not None and record.ended_at is not None
        self._metrics.connections_before_kex.labels(record.reason.value).inc()
        source = record.client_addr
        key = (record.session_id, record.user_id, source)
        if key not in self._summaries and len(self._summaries) >= SUMMARY_SOURCES:
            key = (record.session_id, record.user_id, "other")
        summary = self._summaries.get(key)
        if summary is None:
            summary = self._summaries[key] = _Summary(record.started_at, record.ended_at)
        summary.last_at = record.ended_at
        summary.reasons[record.reason.value] += 1
        if self._summary_timer is None:
            self._summary_timer = asyncio.get_running_loop().call_later(
                self._summary_interval, self._flush_summaries
            )

    def _flush_summaries(self) -> None:
        """Queue one ``connections_before_kex`` event per (session, source) summarised."""
        if self._summary_timer is not None:
            self._summary_timer.cancel()
            self._summary_timer = None
        summaries, self._summaries = self._summaries, {}
        for (session_id, user_id, source), summary in summaries.items():
            self._enqueue(
                functools.partial(
                    self._event,
                    "connections_before_kex",
                    summary.data(source),
                    session_id=session_id,
                    user_id=user_id,
                )
            )

    def connection_refused(self, session_id: str) -> None:
        """Only counted: a flood of refused connections must not turn into writes."""
        self._metrics.connections_refused.inc()

    async def session_event(self, event: str, session: Session, **data: Any) -> None:
        """``session_created``, ``session_deleted``, ``session_expired``, ``session_extended``,
        ``session_recovered``, ... with the session's port, GPU and expiry."""
        await self.user_event(
            event, session_id=session.id, user_id=session.user_id, **session_data(session, **data)
        )

    async def user_event(
        self, event: str, *, session_id: str | None, user_id: str, **data: Any
    ) -> None:
        """An event of a user's request: ``session_queued``, ``session_dequeued``,
        ``session_queue_timeout``, ``quota_exceeded``, ..."""
        done = asyncio.get_running_loop().create_future()
        self._enqueue(
            lambda: self._event(event, data, session_id=session_id, user_id=user_id), done
        )
        await done
