"""The session store: users' stable uids and session rows in SQLite (WAL), via aiosqlite.

One connection, autocommit, with an asyncio lock around every call so multi-statement
transactions never interleave. Returns :mod:`gateway.models` dataclasses, never rows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, Self, TypeVar

import aiosqlite

from gateway.core import fairshare
from gateway.core.fairshare import UsageRecord
from gateway.errors import (
    DatabaseTooNew,
    GpuInstanceBusy,
    NoPortAvailable,
    SessionDeleted,
    SessionExists,
    TooManyQueued,
)
from gateway.models import (
    AuditEvent,
    CloseReason,
    ConnectionRecord,
    CreateRequest,
    QueuedRequest,
    Session,
    SessionIdle,
    SessionState,
    User,
)
from gateway.store.migrations import migrate

FIRST_UID = 10000

P = ParamSpec("P")
T = TypeVar("T")

_SESSION_COLUMNS = (
    "id, user_id, ssh_port, image, workspace, ttl_seconds, created_at, expires_at, state, "
    "container_id, container_ip, gpu_uuid, mig_profile, gpu_created, authorized_keys, end_reason, "
    "cpu_limit, memory_limit, claim_by"
)


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def _opt_ts(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _opt_dt(value: float | None) -> datetime | None:
    return None if value is None else _dt(value)


_IDLE_COLUMNS = (
    "session_id, exempt, last_connection_at, no_connection_since, compute_idle_since, "
    "utilization, hold_until, hold_set_at"
)


def _idle(row: aiosqlite.Row) -> SessionIdle:
    return SessionIdle(
        session_id=row["session_id"],
        exempt=bool(row["exempt"]),
        last_connection_at=_opt_dt(row["last_connection_at"]),
        no_connection_since=_opt_dt(row["no_connection_since"]),
        compute_idle_since=_opt_dt(row["compute_idle_since"]),
        utilization=row["utilization"],
        hold_until=_opt_dt(row["hold_until"]),
        hold_set_at=_opt_dt(row["hold_set_at"]),
    )


def _session(row: aiosqlite.Row) -> Session:
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        uid=row["uid"],
        ssh_port=row["ssh_port"],
        image=row["image"],
        workspace=row["workspace"],
        ttl_seconds=row["ttl_seconds"],
        created_at=_dt(row["created_at"]),
        expires_at=_dt(row["expires_at"]),
        state=SessionState(row["state"]),
        container_id=row["container_id"],
        container_ip=row["container_ip"],
        gpu_uuid=row["gpu_uuid"],
        mig_profile=row["mig_profile"],
        gpu_created=bool(row["gpu_created"]),
        authorized_keys=tuple(json.loads(row["authorized_keys"])),
        end_reason=row["end_reason"],
        cpu_limit=row["cpu_limit"],
        memory_limit=row["memory_limit"],
        claim_by=None if row["claim_by"] is None else _dt(row["claim_by"]),
    )


def _queued(row: aiosqlite.Row) -> QueuedRequest:
    request = json.loads(row["request"])
    request["public_keys"] = tuple(request["public_keys"])
    return QueuedRequest(
        id=row["id"],
        request=CreateRequest(**request),
        submitted_at=_dt(row["submitted_at"]),
        expires_at=_dt(row["expires_at"]),
        authorized_keys=tuple(json.loads(row["authorized_keys"])),
        password_hash=row["password_hash"],
        attempts=row["attempts"],
    )


def _usage(row: aiosqlite.Row) -> UsageRecord:
    return UsageRecord(
        fraction=row["fraction"],
        start=_dt(row["started_at"]),
        end=None if row["ended_at"] is None else _dt(row["ended_at"]),
    )


_CONNECTION_COLUMNS = (
    "id, session_id, user_id, client_addr, client_port, started_at, ended_at, bytes_up, "
    "bytes_down, client_banner, server_banner, closed_by, reason"
)


def _connection(row: aiosqlite.Row) -> ConnectionRecord:
    return ConnectionRecord(
        id=row["id"],
        session_id=row["session_id"],
        user_id=row["user_id"],
        client_addr=row["client_addr"],
        client_port=row["client_port"],
        started_at=_dt(row["started_at"]),
        ended_at=None if row["ended_at"] is None else _dt(row["ended_at"]),
        bytes_up=row["bytes_up"],
        bytes_down=row["bytes_down"],
        client_banner=row["client_banner"],
        server_banner=row["server_banner"],
        closed_by=row["closed_by"],
        reason=None if row["reason"] is None else CloseReason(row["reason"]),
    )


def _event(row: aiosqlite.Row) -> AuditEvent:
    return AuditEvent(
        id=row["id"],
        at=_dt(row["at"]),
        event=row["event"],
        session_id=row["session_id"],
        user_id=row["user_id"],
        connection_id=row["connection_id"],
        data=json.loads(row["data"]),
    )


async def _insert_event(
    conn: aiosqlite.Connection,
    at: datetime,
    event: str,
    *,
    session_id: str | None,
    user_id: str | None,
    connection_id: str | None = None,
    data: dict[str, object],
) -> AuditEvent:
    """Insert one audit event inside the caller's transaction."""
    cur = await conn.execute(
        "INSERT INTO audit_events (at, event, session_id, user_id, connection_id, data)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (_ts(at), event, session_id, user_id, connection_id, json.dumps(data)),
    )
    assert cur.lastrowid is not None
    return AuditEvent(cur.lastrowid, at, event, session_id, user_id, connection_id, data)


async def _start_failed(
    conn: aiosqlite.Connection, queued_id: str, at: datetime, error: str
) -> AuditEvent | None:
    """Inside the caller's transaction: a start of the queued request ``queued_id`` failed
    with ``error``. It goes back on the list (``session_requeued``, unless it just found no
    room: no event), or after its last attempt ends (``session_dequeue_failed``); the
    session it never got is not charged. None (and no event) if it is not on the list."""
    sql = "SELECT user_id, attempts FROM queue WHERE id = ?"
    async with conn.execute(sql, (queued_id,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    await conn.execute("DELETE FROM gpu_usage WHERE session_id = ?", (queued_id,))
    attempts = fairshare.attempts_after(row["attempts"], error)
    if attempts is None:
        await conn.execute("DELETE FROM queue WHERE id = ?", (queued_id,))
        event, data = "session_dequeue_failed", {"error": error, "attempts": row["attempts"] + 1}
    else:
        sql = "UPDATE queue SET starting = 0, attempts = ? WHERE id = ?"
        await conn.execute(sql, (attempts, queued_id))
        if attempts == row["attempts"]:
            return None
        event, data = "session_requeued", {"error": error, "attempt": attempts}
    return await _insert_event(
        conn, at, event, session_id=queued_id, user_id=row["user_id"], data=data
    )


async def _stick_port(conn: aiosqlite.Connection, user_id: str, port: int, at: datetime) -> None:
    """``port`` becomes ``user_id``'s sticky port (taken from whoever had it)."""
    await conn.execute(
        "UPDATE users SET ssh_port = NULL, ssh_port_used_at = NULL "
        "WHERE ssh_port = ? AND user_id != ?",
        (port, user_id),
    )
    await conn.execute(
        "UPDATE users SET ssh_port = ?, ssh_port_used_at = ? WHERE user_id = ?",
        (port, _ts(at), user_id),
    )


async def _end_usage(conn: aiosqlite.Connection, session_id: str, at: datetime) -> None:
    """Close the session's GPU usage record at ``at`` (once: the first end counts)."""
    await conn.execute(
        "UPDATE gpu_usage SET ended_at = ? WHERE session_id = ? AND ended_at IS NULL",
        (_ts(at), session_id),
    )


def ensure_private_file(path: Path) -> None:
    """Create ``path`` (and its folder, 0700) as an empty 0600 file unless it exists, and
    make it 0600 if it does: only the gateway's user may read what it will hold. SQLite
    gives the ``-wal`` and ``-shm`` files the database file's mode."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    for owned in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if owned.exists():
            owned.chmod(0o600)


def _migrate_file(path: Path) -> None:
    ensure_private_file(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn)
    except DatabaseTooNew as exc:
        raise DatabaseTooNew(f"{path}: {exc.message}") from None
    finally:
        conn.close()


def _atomic(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Run a write method to completion even if its caller is cancelled: the caller
    stops waiting, the transaction still commits or rolls back as a whole."""

    @functools.wraps(method)
    async def shielded(*args: P.args, **kwargs: P.kwargs) -> T:
        return await asyncio.shield(method(*args, **kwargs))

    return shielded


class Store:
    """Async access to the gateway database. Use :meth:`open`, then ``close()``."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Self:
        """Open (creating and migrating as needed) the database at ``path``."""
        await asyncio.to_thread(_migrate_file, path)
        conn = await aiosqlite.connect(path, isolation_level=None)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA foreign_keys=ON")
        await conn.execute("PRAGMA busy_timeout=5000")
        await conn.execute("PRAGMA synchronous=NORMAL")
        return cls(conn)

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction. Callers are :func:`_atomic` methods, so a cancelled
        caller never leaves it half done."""
        async with self._lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def ping(self) -> None:
        async with self._lock:
            await self._conn.execute("SELECT 1")

    @_atomic
    async def instance_id(self) -> str:
        """This gateway's instance id, created on first use; labels its containers."""
        async with self._transaction() as conn:
            async with conn.execute("SELECT value FROM meta WHERE key = 'instance_id'") as cur:
                row = await cur.fetchone()
            if row is not None:
                return str(row["value"])
            value = secrets.token_hex(8)
            await conn.execute("INSERT INTO meta (key, value) VALUES ('instance_id', ?)", (value,))
            return value

    @_atomic
    async def ensure_user(self, user_id: str, now: datetime) -> User:
        """The user, with a stable uid assigned (the next free one) on first sight."""
        async with self._transaction() as conn:
            sql = "SELECT uid, ssh_port FROM users WHERE user_id = ?"
            async with conn.execute(sql, (user_id,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                return User(user_id, int(row["uid"]), row["ssh_port"])
            async with conn.execute("SELECT MAX(uid) AS top FROM users") as cur:
                top = (await cur.fetchone())["top"]
            uid = FIRST_UID if top is None else int(top) + 1
            await conn.execute(
                "INSERT INTO users (user_id, uid, created_at) VALUES (?, ?, ?)",
                (user_id, uid, _ts(now)),
            )
            return User(user_id, uid, None)

    async def claimed_ports(self, *, except_user: str) -> dict[int, None]:
        """The sticky ports of every user but ``except_user``, longest unused first (an
        ordered set)."""
        sql = (
            "SELECT ssh_port FROM users WHERE ssh_port IS NOT NULL AND user_id != ? "
            "ORDER BY ssh_port_used_at"
        )
        async with self._lock, self._conn.execute(sql, (except_user,)) as cur:
            return {int(row["ssh_port"]): None for row in await cur.fetchall()}

    @_atomic
    async def insert_session(
        self,
        session: Session,
        *,
        idle_exempt: bool = False,
        gpu_fraction: float = 0.0,
        from_queue: bool = False,
    ) -> None:
        """Insert a new session row, with its idle record (exempt from idle reclaim or not;
        the connection clock starts at creation, the compute clock at the first sample);
        with ``gpu_fraction``, open its GPU usage record (from its creation);
        ``from_queue`` marks the queued request of the same id ``starting`` (off the ordered
        list) in the same transaction; it leaves the list when the session runs
        (:meth:`mark_running`) and goes back when its create fails (:meth:`delete_session`).

        Raises:
            SessionExists: the user already has a session.
            NoPortAvailable: another session holds the port.
            GpuInstanceBusy: another session holds the GPU.
            SessionDeleted: ``from_queue``, and the request was withdrawn or timed out.
        """
        try:
            async with self._transaction() as conn:
                if from_queue:
                    cur = await conn.execute(
                        "UPDATE queue SET starting = 1 WHERE id = ? AND starting = 0",
                        (session.id,),
                    )
                    if cur.rowcount == 0:
                        raise SessionDeleted("the queued request was withdrawn")
                await conn.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        session.id,
                        session.user_id,
                        session.ssh_port,
                        session.image,
                        session.workspace,
                        session.ttl_seconds,
                        _ts(session.created_at),
                        _ts(session.expires_at),
                        session.state.value,
                        session.container_id,
                        session.container_ip,
                        session.gpu_uuid,
                        session.mig_profile,
                        int(session.gpu_created),
                        json.dumps(list(session.authorized_keys)),
                        session.end_reason,
                        session.cpu_limit,
                        session.memory_limit,
                        None if session.claim_by is None else _ts(session.claim_by),
                    ),
                )
                await conn.execute(  # nobody has connected yet: that clock runs from now
                    "INSERT INTO session_idle (session_id, exempt, no_connection_since) "
                    "VALUES (?, ?, ?)",
                    (session.id, int(idle_exempt), _ts(session.created_at)),
                )
                if gpu_fraction > 0:
                    await conn.execute(
                        "INSERT INTO gpu_usage (session_id, user_id, fraction, started_at)"
                        " VALUES (?, ?, ?, ?)",
                        (session.id, session.user_id, gpu_fraction, _ts(session.created_at)),
                    )
                await _stick_port(conn, session.user_id, session.ssh_port, session.created_at)
        except sqlite3.IntegrityError as exc:
            text = str(exc)
            if "sessions.user_id" in text:
                raise SessionExists(f"user {session.user_id!r} already has a live session") from exc
            if "sessions.ssh_port" in text:
                raise NoPortAvailable(f"port {session.ssh_port} is taken") from exc
            if "gpu_uuid" in text:
                raise GpuInstanceBusy(f"GPU {session.gpu_uuid} is already allocated") from exc
            raise

    @_atomic
    async def mark_running(
        self, session_id: str, container_id: str, container_ip: str, gpu_uuid: str | None = None
    ) -> bool:
        """starting -> running (or a recovered session's new address), with the GPU the
        engine assigned if it picks them (else the row's stays); the queued request it
        started, if any, leaves the waiting list. False when the session is ending or gone:
        it must not be started."""
        async with self._transaction() as conn:
            cur = await conn.execute(
                "UPDATE sessions SET state = ?, container_id = ?, container_ip = ?, "
                "gpu_uuid = COALESCE(?, gpu_uuid) WHERE id = ? AND state != ?",
                (
                    SessionState.RUNNING.value,
                    container_id,
                    container_ip,
                    gpu_uuid,
                    session_id,
                    SessionState.ENDING.value,
                ),
            )
            if cur.rowcount == 0:
                return False
            sql = "DELETE FROM queue WHERE id = ? AND starting = 1"
            await conn.execute(sql, (session_id,))
            return True

    @_atomic
    async def begin_ending(self, session_id: str, reason: str) -> Session | None:
        """Mark the session ``ending`` (the first reason given is kept) and return it as it
        now is; None if it is gone."""
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE sessions SET state = ?, end_reason = COALESCE(end_reason, ?) WHERE id = ?",
                (SessionState.ENDING.value, reason, session_id),
            )
            found = await self._select_in(conn, "WHERE s.id = ?", (session_id,))
        return found[0] if found else None

    @_atomic
    async def move_port(self, session_id: str, user_id: str, port: int, now: datetime) -> None:
        """The session now listens on ``port`` (its own was taken at restart); the port
        becomes the user's sticky port, as at create.

        Raises:
            NoPortAvailable: another session holds the port.
        """
        try:
            async with self._transaction() as conn:
                await conn.execute(
                    "UPDATE sessions SET ssh_port = ? WHERE id = ?", (port, session_id)
                )
                await _stick_port(conn, user_id, port, now)
        except sqlite3.IntegrityError as exc:
            raise NoPortAvailable(f"port {port} is taken") from exc

    @_atomic
    async def set_container(self, session_id: str, container_id: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE sessions SET container_id = ? WHERE id = ?", (container_id, session_id)
            )

    @_atomic
    async def delete_session(
        self, session_id: str, now: datetime, *, reason: str, failed: str | None = None
    ) -> tuple[bool, AuditEvent | None]:
        """Delete the row of a session that never ran (or whose create failed) and close
        its GPU usage record at ``now`` (once: the first end counts). The queued request
        it started, if any, goes with it in the same transaction: ``failed`` (the create's
        error code) puts it back on the waiting list or, after its last attempt, ends it;
        otherwise (DELETE while starting) it is withdrawn for good, with ``reason``.
        Whether the row was deleted, and the event the request's fate was recorded as."""
        async with self._transaction() as conn:
            await _end_usage(conn, session_id, now)
            cur = await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            deleted = cur.rowcount > 0
            if failed is not None:
                return deleted, await _start_failed(conn, session_id, now, failed)
            sql = "DELETE FROM queue WHERE id = ? AND starting = 1 RETURNING user_id"
            async with conn.execute(sql, (session_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return deleted, None
            event = await _insert_event(
                conn,
                now,
                "session_queue_withdrawn",
                session_id=session_id,
                user_id=row["user_id"],
                data={"reason": reason},
            )
            return deleted, event

    @_atomic
    async def delete_session_audited(
        self, session: Session, at: datetime, event: str, data: dict[str, object]
    ) -> AuditEvent | None:
        """Delete the session's row (closing its GPU usage at ``at``) and insert its end
        event in one transaction, so the trail holds exactly one end per session whatever
        crashes when. None (and no event) if the row was already gone."""
        async with self._transaction() as conn:
            await _end_usage(conn, session.id, at)
            cur = await conn.execute("DELETE FROM sessions WHERE id = ?", (session.id,))
            if cur.rowcount == 0:
                return None
            return await _insert_event(
                conn, at, event, session_id=session.id, user_id=session.user_id, data=data
            )

    @_atomic
    async def claimed(self, session_id: str) -> None:
        """The session has had a connection: no claim deadline any more."""
        async with self._transaction() as conn:
            await conn.execute("UPDATE sessions SET claim_by = NULL WHERE id = ?", (session_id,))

    # -- waiting list ----------------------------------------------------------------------

    @_atomic
    async def enqueue(self, queued: QueuedRequest, *, max_per_user: int) -> None:
        """Put a request on the waiting list.

        Raises:
            TooManyQueued: the user already has ``max_per_user`` waiting.
        """
        request = queued.request
        async with self._transaction() as conn:
            sql = "SELECT COUNT(*) AS n FROM queue WHERE user_id = ?"
            async with conn.execute(sql, (request.user_id,)) as cur:
                waiting = (await cur.fetchone())["n"]
            if waiting >= max_per_user:
                raise TooManyQueued(
                    f"user {request.user_id!r} already has {waiting} request(s) waiting"
                    f" (at most {max_per_user})"
                )
            data = dataclasses.asdict(request)
            await conn.execute(
                "INSERT INTO queue (id, user_id, submitted_at, expires_at, request,"
                " authorized_keys, password_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    queued.id,
                    request.user_id,
                    _ts(queued.submitted_at),
                    _ts(queued.expires_at),
                    json.dumps(data),
                    json.dumps(list(queued.authorized_keys)),
                    queued.password_hash,
                ),
            )

    async def queued(self) -> list[QueuedRequest]:
        """The waiting list in arrival order (not the requests starting now)."""
        sql = "SELECT * FROM queue WHERE starting = 0 ORDER BY submitted_at, rowid"
        async with self._lock, self._conn.execute(sql) as cur:
            return [_queued(row) for row in await cur.fetchall()]

    async def get_queued(self, queued_id: str) -> QueuedRequest | None:
        """The request if it is waiting (not starting)."""
        sql = "SELECT * FROM queue WHERE id = ? AND starting = 0"
        async with self._lock, self._conn.execute(sql, (queued_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else _queued(row)

    @_atomic
    async def withdraw(self, queued_id: str) -> bool:
        """Take a waiting request off the list; False if it is not there (any more) or is
        starting (its session's end takes it)."""
        async with self._transaction() as conn:
            sql = "DELETE FROM queue WHERE id = ? AND starting = 0"
            cur = await conn.execute(sql, (queued_id,))
            return cur.rowcount > 0

    @_atomic
    async def start_failed(self, queued_id: str, now: datetime, error: str) -> AuditEvent | None:
        """A waiting request's start failed with ``error`` before its session row was
        stored: back on the list or ended, as :meth:`delete_session` does after it."""
        async with self._transaction() as conn:
            return await _start_failed(conn, queued_id, now, error)

    # -- GPU usage and budgets -------------------------------------------------------------

    async def usage(
        self, since: datetime, user_id: str | None = None
    ) -> dict[str, list[UsageRecord]]:
        """GPU usage records still open or ended after ``since``, by user."""
        sql = "SELECT * FROM gpu_usage WHERE (ended_at IS NULL OR ended_at > ?)"
        params: tuple[object, ...] = (_ts(since),)
        if user_id is not None:
            sql += " AND user_id = ?"
            params += (user_id,)
        found: dict[str, list[UsageRecord]] = {}
        async with self._lock, self._conn.execute(sql + " ORDER BY started_at", params) as cur:
            for row in await cur.fetchall():
                found.setdefault(row["user_id"], []).append(_usage(row))
        return found

    @_atomic
    async def prune_usage(self, before: datetime) -> None:
        """Forget usage that ended before ``before`` (it no longer counts anywhere)."""
        async with self._transaction() as conn:
            await conn.execute("DELETE FROM gpu_usage WHERE ended_at < ?", (_ts(before),))

    async def user_budget(self, user_id: str) -> tuple[bool, float | None]:
        """(whether the user has a budget of their own, that budget in GPU-hours/week)."""
        sql = "SELECT gpu_hours_per_week FROM users WHERE user_id = ?"
        async with self._lock, self._conn.execute(sql, (user_id,)) as cur:
            row = await cur.fetchone()
        if row is None or row["gpu_hours_per_week"] is None:
            return False, None
        return True, float(row["gpu_hours_per_week"])

    @_atomic
    async def set_user_budget(self, user_id: str, hours: float | None, now: datetime) -> None:
        """Set (None: clear) the user's own budget; a user not seen yet is registered."""
        await self.ensure_user(user_id, now)
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE users SET gpu_hours_per_week = ? WHERE user_id = ?", (hours, user_id)
            )

    @staticmethod
    async def _select_in(
        conn: aiosqlite.Connection, where: str, params: tuple[object, ...]
    ) -> list[Session]:
        cols = ", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))
        sql = f"SELECT {cols}, u.uid FROM sessions s JOIN users u USING (user_id) {where}"
        async with conn.execute(sql + " ORDER BY s.created_at", params) as cur:
            return [_session(row) for row in await cur.fetchall()]

    async def _select(self, where: str = "", params: tuple[object, ...] = ()) -> list[Session]:
        async with self._lock:
            return await self._select_in(self._conn, where, params)

    async def get_session(self, session_id: str) -> Session | None:
        found = await self._select("WHERE s.id = ?", (session_id,))
        return found[0] if found else None

    async def session_of_user(self, user_id: str) -> Session | None:
        found = await self._select("WHERE s.user_id = ?", (user_id,))
        return found[0] if found else None

    async def list_sessions(self) -> list[Session]:
        return await self._select()

    async def held_ports(self) -> set[int]:
        async with self._lock, self._conn.execute("SELECT ssh_port FROM sessions") as cur:
            return {int(row["ssh_port"]) for row in await cur.fetchall()}

    async def allocated_gpus(self) -> set[str]:
        sql = "SELECT gpu_uuid FROM sessions WHERE gpu_uuid IS NOT NULL"
        async with self._lock, self._conn.execute(sql) as cur:
            return {str(row["gpu_uuid"]) for row in await cur.fetchall()}

    @_atomic
    async def update_ttl(self, session_id: str, ttl_seconds: int, expires_at: datetime) -> bool:
        """Move the expiry; False (nothing changed) when the session is ending or gone."""
        async with self._transaction() as conn:
            cur = await conn.execute(
                "UPDATE sessions SET ttl_seconds = ?, expires_at = ? WHERE id = ? AND state != ?",
                (ttl_seconds, _ts(expires_at), session_id, SessionState.ENDING.value),
            )
            return cur.rowcount > 0

    # -- idle reclaim ----------------------------------------------------------------------

    async def idle_state(self, session_id: str) -> SessionIdle:
        """The session's idle record; defaults when it has none yet."""
        sql = f"SELECT {_IDLE_COLUMNS} FROM session_idle WHERE session_id = ?"
        async with self._lock, self._conn.execute(sql, (session_id,)) as cur:
            row = await cur.fetchone()
        return SessionIdle(session_id) if row is None else _idle(row)

    @_atomic
    async def save_idle(self, idle: SessionIdle) -> None:
        """Store the clocks and reading of a sample (the hold and exemption are kept)."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO session_idle (session_id, exempt) VALUES (?, ?) "
                "ON CONFLICT (session_id) DO NOTHING",
                (idle.session_id, int(idle.exempt)),
            )
            await conn.execute(
                "UPDATE session_idle SET last_connection_at = ?, no_connection_since = ?, "
                "compute_idle_since = ?, utilization = ? WHERE session_id = ?",
                (
                    _opt_ts(idle.last_connection_at),
                    _opt_ts(idle.no_connection_since),
                    _opt_ts(idle.compute_idle_since),
                    idle.utilization,
                    idle.session_id,
                ),
            )

    @_atomic
    async def set_idle_hold(
        self, session_id: str, hold_until: datetime | None, set_at: datetime
    ) -> None:
        """Hold the session from idle reclaim until ``hold_until`` (None releases)."""
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO session_idle (session_id) VALUES (?) "
                "ON CONFLICT (session_id) DO NOTHING",
                (session_id,),
            )
            await conn.execute(
                "UPDATE session_idle SET hold_until = ?, hold_set_at = ? WHERE session_id = ?",
                (_opt_ts(hold_until), _ts(set_at), session_id),
            )

    # -- audit trail -----------------------------------------------------------------------

    @_atomic
    async def save_connection(self, record: ConnectionRecord) -> None:
        """Insert or replace the record (opened, then again when it ends)."""
        async with self._transaction() as conn:
            await conn.execute(
                f"INSERT OR REPLACE INTO connections ({_CONNECTION_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.session_id,
                    record.user_id,
                    record.client_addr,
                    record.client_port,
                    _ts(record.started_at),
                    None if record.ended_at is None else _ts(record.ended_at),
                    record.bytes_up,
                    record.bytes_down,
                    record.client_banner,
                    record.server_banner,
                    record.closed_by,
                    None if record.reason is None else record.reason.value,
                ),
            )

    async def connections(
        self, *, session_id: str | None = None, live_only: bool = False
    ) -> list[ConnectionRecord]:
        clauses, params = [], []
        if session_id is not None:
            clauses.append("session_id = ?")
            params.append(session_id)
        if live_only:
            clauses.append("ended_at IS NULL")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = f"SELECT {_CONNECTION_COLUMNS} FROM connections {where} ORDER BY started_at"
        async with self._lock, self._conn.execute(sql, params) as cur:
            return [_connection(row) for row in await cur.fetchall()]

    @_atomic
    async def add_event(
        self,
        at: datetime,
        event: str,
        *,
        session_id: str | None,
        user_id: str | None,
        connection_id: str | None,
        data: dict[str, object],
    ) -> AuditEvent:
        async with self._transaction() as conn:
            return await _insert_event(
                conn,
                at,
                event,
                session_id=session_id,
                user_id=user_id,
                connection_id=connection_id,
                data=data,
            )

    async def events(
        self,
        *,
        user_id: str | None = None,
        session_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        before_id: int | None = None,
        limit: int = 100,
    ) -> list[AuditEvent]:
        """Audit events, newest first; ``before_id`` continues a previous page."""
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (("user_id", user_id), ("session_id", session_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("at >= ?")
            params.append(_ts(since))
        if until is not None:
            clauses.append("at < ?")
            params.append(_ts(until))
        if before_id is not None:
            clauses.append("id < ?")
            params.append(before_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            "SELECT id, at, event, session_id, user_id, connection_id, data FROM audit_events "
            f"{where} ORDER BY id DESC LIMIT ?"
        )
        async with self._lock, self._conn.execute(sql, (*params, limit)) as cur:
            return [_event(row) for row in await cur.fetchall()]

    @_atomic
    async def prune_audit(self, before: datetime) -> int:
        """Delete ended connection records and events older than ``before``."""
        async with self._transaction() as conn:
            ended = await conn.execute(
                "DELETE FROM connections WHERE ended_at IS NOT NULL AND ended_at < ?",
                (_ts(before),),
            )
            events = await conn.execute("DELETE FROM audit_events WHERE at < ?", (_ts(before),))
            return ended.rowcount + events.rowcount

    @_atomic
    async def end_open_connections(
        self, now: datetime, describe: Callable[[ConnectionRecord], dict[str, object]]
    ) -> list[AuditEvent]:
        """Close records a crashed gateway left open (reason ``error``, by the gateway) and
        give each its ``disconnect`` event (data: ``describe(record)``), in one transaction,
        so every ``connect`` in the trail has its ``disconnect``. The events, in order."""
        async with self._transaction() as conn:
            sql = f"SELECT {_CONNECTION_COLUMNS} FROM connections WHERE ended_at IS NULL"
            async with conn.execute(sql + " ORDER BY started_at") as cur:
                open_records = [_connection(row) for row in await cur.fetchall()]
            await conn.execute(
                "UPDATE connections SET ended_at = ?, closed_by = 'gateway', reason = ? "
                "WHERE ended_at IS NULL",
                (_ts(now), CloseReason.ERROR.value),
            )
            events = []
            for record in open_records:
                ended = replace(record, ended_at=now, closed_by="gateway", reason=CloseReason.ERROR)
                events.append(
                    await _insert_event(
                        conn,
                        now,
                        "disconnect",
                        session_id=record.session_id,
                        user_id=record.user_id,
                        connection_id=record.id,
                        data=describe(ended),
                    )
                )
            return events
