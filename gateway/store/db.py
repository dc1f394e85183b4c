"""The session store: users' stable uids and session rows in SQLite (WAL), via aiosqlite.

One connection, autocommit, with an asyncio lock around every call so multi-statement
transactions never interleave. Returns :mod:`gateway.models` dataclasses, never rows.
"""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Self

import aiosqlite

from gateway.errors import GpuInstanceBusy, NoPortAvailable, SessionExists
from gateway.models import Session, SessionState
from gateway.store.migrations import migrate

FIRST_UID = 10000

_SESSION_COLUMNS = (
    "id, user_id, ssh_port, image, workspace, ttl_seconds, created_at, expires_at, state, "
    "container_id, container_ip, gpu_uuid, mig_profile, gpu_created"
)


def _ts(moment: datetime) -> float:
    return moment.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


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
    )


def _migrate_file(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        migrate(conn)
    finally:
        conn.close()


class Store:
    """Async access to the gateway database. Use :meth:`open`, then ``close()``."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path) -> Self:
        """Open (creating and migrating as needed) the database at ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
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

    async def ensure_user(self, user_id: str, now: datetime) -> int:
        """The stable uid of ``user_id``, assigning the next free one on first sight."""
        async with self._transaction() as conn:
            async with conn.execute("SELECT uid FROM users WHERE user_id = ?", (user_id,)) as cur:
                row = await cur.fetchone()
            if row is not None:
                return int(row["uid"])
            async with conn.execute("SELECT MAX(uid) AS top FROM users") as cur:
                top = (await cur.fetchone())["top"]
            uid = FIRST_UID if top is None else int(top) + 1
            await conn.execute(
                "INSERT INTO users (user_id, uid, created_at) VALUES (?, ?, ?)",
                (user_id, uid, _ts(now)),
            )
            return uid

    async def insert_session(self, session: Session) -> None:
        """Insert a new session row.

        Raises:
            SessionExists: the user already has a session.
            NoPortAvailable: another session holds the port.
            GpuInstanceBusy: another session holds the GPU.
        """
        try:
            async with self._transaction() as conn:
                await conn.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    ),
                )
        except sqlite3.IntegrityError as exc:
            text = str(exc)
            if "sessions.user_id" in text:
                raise SessionExists(f"user {session.user_id!r} already has a live session") from exc
            if "sessions.ssh_port" in text:
                raise NoPortAvailable(f"port {session.ssh_port} is taken") from exc
            if "gpu_uuid" in text:
                raise GpuInstanceBusy(f"GPU {session.gpu_uuid} is already allocated") from exc
            raise

    async def mark_running(self, session_id: str, container_id: str, container_ip: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE sessions SET state = ?, container_id = ?, container_ip = ? WHERE id = ?",
                (SessionState.RUNNING.value, container_id, container_ip, session_id),
            )

    async def set_container(self, session_id: str, container_id: str) -> None:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE sessions SET container_id = ? WHERE id = ?", (container_id, session_id)
            )

    async def delete_session(self, session_id: str) -> bool:
        async with self._transaction() as conn:
            cur = await conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return cur.rowcount > 0

    async def _select(self, where: str = "", params: tuple[object, ...] = ()) -> list[Session]:
        cols = ", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))
        sql = f"SELECT {cols}, u.uid FROM sessions s JOIN users u USING (user_id) {where}"
        async with self._lock, self._conn.execute(sql + " ORDER BY s.created_at", params) as cur:
            return [_session(row) for row in await cur.fetchall()]

    async def get_session(self, session_id: str) -> Session | None:
        found = await self._select("WHERE s.id = ?", (session_id,))
        return found[0] if found else None

    async def list_sessions(self) -> list[Session]:
        return await self._select()

    async def expired_sessions(self, now: datetime) -> list[Session]:
        return await self._select("WHERE s.expires_at <= ?", (_ts(now),))

    async def held_ports(self) -> set[int]:
        async with self._lock, self._conn.execute("SELECT ssh_port FROM sessions") as cur:
            return {int(row["ssh_port"]) for row in await cur.fetchall()}

    async def allocated_gpus(self) -> set[str]:
        sql = "SELECT gpu_uuid FROM sessions WHERE gpu_uuid IS NOT NULL"
        async with self._lock, self._conn.execute(sql) as cur:
            return {str(row["gpu_uuid"]) for row in await cur.fetchall()}
