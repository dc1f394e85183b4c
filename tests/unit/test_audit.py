"""The audit queue: connections never wait on the database, and nothing queued is lost."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from gateway.audit import Audit
from gateway.metrics import Metrics
from gateway.models import CloseReason, ConnectionRecord, Session, utcnow
from gateway.store import Store


class GatedStore:
    """The real store, but connection writes wait until :attr:`gate` opens."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.gate = asyncio.Event()

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    async def save_connection(self, record: ConnectionRecord) -> None:
        await self.gate.wait()
        await self._store.save_connection(record)


def record(number: int) -> ConnectionRecord:
    return ConnectionRecord(
        id=f"c{number}",
        session_id="s1",
        user_id="alice",
        client_addr="127.0.0.1",
        client_port=40000 + number,
        started_at=utcnow(),
    )


def ended(opened: ConnectionRecord) -> ConnectionRecord:
    return replace(opened, ended_at=utcnow(), bytes_up=10, reason=CloseReason.CLIENT_CLOSED)


async def test_connections_do_not_wait_for_the_database_and_aclose_writes_all(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    gated = GatedStore(store)
    metrics = Metrics()
    audit = Audit(gated, metrics, tmp_path / "audit.log", utcnow)
    try:
        opened = [record(n) for n in range(20)]
        async with asyncio.timeout(0.5):  # the database is stuck; the relay is not
            for one in opened:
                await audit.connection_opened(one)
                await audit.connection_closed(ended(one))
        assert await store.connections() == []
        assert metrics.connections_ended.labels("client_closed")._value.get() == 20
        gated.gate.set()
        await audit.aclose()
        saved = await store.connections()
        assert sorted(r.id for r in saved) == sorted(r.id for r in opened)
        assert all(r.reason is CloseReason.CLIENT_CLOSED and r.bytes_up == 10 for r in saved)
        lines = (tmp_path / "audit.log").read_text().splitlines()
        assert len(lines) == 40
    finally:
        await store.close()


async def test_a_session_event_waits_for_its_write_and_keeps_the_order(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    audit = Audit(store, Metrics(), None, utcnow)
    now = utcnow()
    session = Session(
        id="s1",
        user_id="alice",
        uid=2000,
        ssh_port=2222,
        image="img",
        workspace="/w",
        ttl_seconds=60,
        created_at=now,
        expires_at=now + timedelta(minutes=1),
    )
    try:
        one = record(1)
        await audit.connection_opened(one)
        await audit.connection_closed(ended(one))
        await audit.session_event("session_deleted", session)
        events = await store.events(session_id="s1")  # newest first
        assert [e.event for e in events] == ["session_deleted", "disconnect", "connect"]
    finally:
        await audit.aclose()
        await store.close()
