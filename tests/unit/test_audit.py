"""The audit queue: connections never wait on the database, and nothing queued is lost."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from gateway.audit import Audit
from gateway.metrics import Metrics
from gateway.models import CloseReason, ConnectionRecord, utcnow
from gateway.relay import RelayLimits, SessionListener
from gateway.store import Store
from tests.unit.helpers import (
    CLIENT_BANNER,
    CLIENT_KEX,
    SERVER_BANNER,
    a_session,
    echo_upstream,
)


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
    session = a_session(now, ttl_seconds=60)
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


CHURN = 10_000


async def test_churn_before_kex_costs_a_bounded_queue_and_bounded_rows(tmp_path):
    """10,000 connect-and-close cycles through a real listener, none finishing its key
    exchange: the audit queue stays small, the database gets one summary per source, and
    the metrics count every one. A login past its key exchange is still recorded in full."""
    store = await Store.open(tmp_path / "db.sqlite")
    metrics = Metrics()
    audit = Audit(store, metrics, None, utcnow, summary_interval=3600)

    upstream = await asyncio.start_server(echo_upstream, "127.0.0.1", 0, backlog=1024)
    listener = SessionListener("s1", "alice", 0, limits=RelayLimits(), observer=audit, clock=utcnow)
    await listener.bind("127.0.0.1")
    listener.set_upstream("127.0.0.1", upstream.sockets[0].getsockname()[1])
    deepest = 0

    async def cycle() -> None:
        _reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(CLIENT_BANNER)  # and gone before any key exchange
        writer.close()
        await writer.wait_closed()

    try:
        for _ in range(CHURN // 50):
            await asyncio.gather(*(cycle() for _ in range(50)))
            deepest = max(deepest, audit.queued)
        async with asyncio.timeout(30):
            while sum(s.value for s in _samples(metrics, "before_kex")) < CHURN:
                await asyncio.sleep(0.05)
                deepest = max(deepest, audit.queued)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(CLIENT_KEX)  # a login: recorded in full
        await reader.readexactly(len(SERVER_BANNER + CLIENT_KEX))  # relayed, so seen
        await listener.close()
        writer.close()
        await audit.aclose()
        connections = await store.connections()
        events = await store.events(session_id="s1", limit=1000)
    finally:
        await listener.close()
        upstream.close()
        await store.close()
    assert deepest == 0  # nothing per attempt is ever queued
    assert [c.client_banner for c in connections] == ["SSH-2.0-OpenSSH_9.2p1"]  # the login
    assert sorted(e.event for e in events) == ["connect", "connections_before_kex", "disconnect"]
    summary = next(e for e in events if e.event == "connections_before_kex")
    assert summary.data["count"] == CHURN and summary.data["client_addr"] == "127.0.0.1"
    # closed by the client, or evicted by a newcomer before the relay noticed the close
    assert set(summary.data["reasons"]) <= {"client_closed", "evicted"}


def _samples(metrics: Metrics, name: str):
    return [
        s
        for family in metrics.registry.collect()
        if family.name == f"sandman_connections_{name}"
        for s in family.samples
        if s.name.endswith("_total")
    ]


async def test_one_summary_per_source_per_interval(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    audit = Audit(store, Metrics(), None, utcnow, summary_interval=0.1)
    early = ended(record(1))
    try:
        for number, source in enumerate(["10.0.0.1", "10.0.0.1", "10.0.0.2"]):
            audit.connection_ended_before_kex(replace(ended(record(number)), client_addr=source))
        await asyncio.sleep(0.3)  # the interval ends: its summaries are queued
        audit.connection_ended_before_kex(replace(early, reason=CloseReason.PREAUTH_TIMEOUT))
        await audit.aclose()  # writes the pending summary too
        events = await store.events(session_id="s1")
        connections = await store.connections()
    finally:
        await store.close()
    summaries = sorted(
        (e.data["client_addr"], e.data["count"], tuple(e.data["reasons"].items())) for e in events
    )
    assert summaries == [
        ("10.0.0.1", 2, (("client_closed", 2),)),
        ("10.0.0.2", 1, (("client_closed", 1),)),
        ("127.0.0.1", 1, (("preauth_timeout", 1),)),
    ]
    assert connections == []


async def test_flush_returns_once_what_is_queued_is_written(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite")
    gated = GatedStore(store)
    audit = Audit(gated, Metrics(), None, utcnow)
    try:
        await audit.flush()  # nothing queued: at once
        one = record(1)
        await audit.connection_opened(one)
        await audit.connection_closed(ended(one))
        flushed = asyncio.create_task(audit.flush())
        await asyncio.sleep(0.05)
        assert not flushed.done()  # the database is stuck: so is the flush
        gated.gate.set()
        async with asyncio.timeout(5):
            await flushed
        (saved,) = await store.connections()
        assert saved.ended_at is not None
        assert [e.event for e in await store.events(session_id="s1")] == ["disconnect", "connect"]
    finally:
        await audit.aclose()
        await store.close()
