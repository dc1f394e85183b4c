"""The audit trail: every connection and session lifecycle event, to SQLite and a JSON-lines file.

Each event is one row of ``audit_events`` and one line of ``--audit-log``; connection
records also live in ``connections``. Ended connections feed the metrics here, so the
counters and the records always agree.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from gateway.metrics import Metrics
from gateway.models import AuditEvent, ConnectionRecord, Session, rfc3339
from gateway.store import Store
from gateway.store.db import ensure_private_file

log = logging.getLogger(__name__)


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


class Audit:
    """Records the trail. ``close()`` flushes and closes the log file."""

    def __init__(
        self, store: Store, metrics: Metrics, log_path: Path | None, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._file: IO[str] | None = None
        if log_path is not None:
            ensure_private_file(log_path)  # it names users, addresses and sessions
            self._file = log_path.open("a", encoding="utf-8")
        self._lock = asyncio.Lock()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    async def _event(
        self,
        event: str,
        data: dict[str, Any],
        *,
        session_id: str,
        user_id: str,
        connection_id: str | None = None,
    ) -> None:
        async with self._lock:  # file lines in the same order as row ids
            saved = await self._store.add_event(
                self._clock(),
                event,
                session_id=session_id,
                user_id=user_id,
                connection_id=connection_id,
                data=data,
            )
            if self._file is not None:
                self._file.write(json.dumps(event_data(saved)) + "\n")
                self._file.flush()

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
        await self._store.save_connection(record)
        await self._connection_event(
            "connect",
            record,
            {"client_addr": record.client_addr, "client_port": record.client_port},
        )

    async def connection_closed(self, record: ConnectionRecord) -> None:
        self._metrics.connection_ended(record)
        await self._store.save_connection(record)
        data = connection_data(record)
        for key in ("id", "session_id", "user_id"):  # the event's own fields say these
            del data[key]
        await self._connection_event("disconnect", record, data)

    def connection_refused(self, session_id: str) -> None:
        """Only counted: a flood of refused connections must not turn into writes."""
        self._metrics.connections_refused.inc()

    async def session_event(self, event: str, session: Session, **data: Any) -> None:
        """``session_created``, ``session_deleted``, ``session_expired``, ``session_extended``,
        ``session_recovered``, ... with the session's port, GPU and expiry."""
        base = {
            "ssh_port": session.ssh_port,
            "gpu_uuid": session.gpu_uuid,
            "expires_at": rfc3339(session.expires_at),
        }
        await self._event(event, {**base, **data}, session_id=session.id, user_id=session.user_id)
