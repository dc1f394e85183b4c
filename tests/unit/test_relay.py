"""The relay on loopback sockets: close reasons, banners, bytes, limits and backpressure."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.models import CloseReason, ConnectionRecord, utcnow
from gateway.relay import RelayLimits, SessionListener

SERVER_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"
CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1\r\n"


class Recorder:
    def __init__(self) -> None:
        self.opened: list[ConnectionRecord] = []
        self.closed: asyncio.Queue[ConnectionRecord] = asyncio.Queue()
        self.refused = 0

    async def connection_opened(self, record: ConnectionRecord) -> None:
        self.opened.append(record)

    async def connection_closed(self, record: ConnectionRecord) -> None:
        await self.closed.put(record)

    def connection_refused(self, session_id: str) -> None:
        self.refused += 1

    async def next_closed(self) -> ConnectionRecord:
        return await asyncio.wait_for(self.closed.get(), 5)


async def echo_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SERVER_BANNER)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def closing_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SERVER_BANNER)
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def relay(handler=echo_upstream, **limits):
    upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
    recorder = Recorder()
    listener = SessionListener(
        "s1", "alice", 0, limits=RelayLimits(**limits), observer=recorder, clock=utcnow
    )
    await listener.bind("127.0.0.1")
    listener.port = listener._server.sockets[0].getsockname()[1]
    listener.set_upstream("127.0.0.1", upstream.sockets[0].getsockname()[1])
    try:
        yield listener, recorder
    finally:
        await listener.close()
        upstream.close()


async def connect(listener: SessionListener):
    return await asyncio.open_connection("127.0.0.1", listener.port)


async def test_client_close_records_bytes_banners_and_side():
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER + b"x" * 100_000)
        writer.write_eof()
        received = await reader.read()  # until the server closes after our EOF
        writer.close()
        record = await recorder.next_closed()
    assert received == SERVER_BANNER + CLIENT_BANNER + b"x" * 100_000
    assert record.reason is CloseReason.CLIENT_CLOSED and record.closed_by == "client"
    assert record.bytes_up == len(CLIENT_BANNER) + 100_000
    assert record.bytes_down == len(received)
    assert record.client_banner == "SSH-2.0-OpenSSH_9.2p1"
    assert record.server_banner == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert record.client_addr == "127.0.0.1" and record.client_port > 0
    assert record.ended_at is not None and record.duration >= 0
    assert [r.id for r in recorder.opened] == [record.id]


async def test_server_close_is_server_closed():
    async with relay(closing_upstream) as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        assert await reader.read() == SERVER_BANNER
        writer.close()  # as an ssh client does on EOF
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.SERVER_CLOSED, "server")


async def test_silent_client_hits_preauth_deadline():
    async with relay(preauth_timeout=0.2) as (listener, recorder):
        reader, _writer = await connect(listener)
        record = await recorder.next_closed()
        assert await reader.read() == SERVER_BANNER  # then closed by the gateway
    assert (record.reason, record.closed_by) == (CloseReason.PREAUTH_TIMEOUT, "gateway")
    assert record.client_banner is None


async def test_idle_connection_is_closed():
    async with relay(idle_timeout=0.3) as (listener, recorder):
        _reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.IDLE_TIMEOUT, "gateway")
    assert record.duration >= 0.3


async def test_connection_limit_refuses_the_extra_one():
    async with relay(max_connections=1) as (listener, recorder):
        _r1, w1 = await connect(listener)
        w1.write(CLIENT_BANNER)
        assert await _r1.readline() == SERVER_BANNER  # relayed, so registered
        r2, _w2 = await connect(listener)
        assert b"limit" in await r2.read()
        assert listener.active == 1
        assert recorder.refused == 1
        assert [r.id for r in recorder.opened] == [recorder.opened[0].id]  # counted, not recorded
        assert recorder.closed.empty()


async def test_unreachable_upstream():
    async with relay() as (listener, recorder):
        listener.set_upstream("127.0.0.1", 1)
        reader, _writer = await connect(listener)
        assert await reader.read() == b""
        record = await recorder.next_closed()
    assert record.reason is CloseReason.UPSTREAM_UNREACHABLE


@pytest.mark.parametrize("reason", [CloseReason.SESSION_DELETED, CloseReason.TTL_EXPIRED])
async def test_closing_the_listener_cuts_with_its_reason(reason):
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        assert await reader.readexactly(len(SERVER_BANNER + CLIENT_BANNER))
        await listener.close(reason)
        record = await recorder.next_closed()
        assert await reader.read() == b""
    assert (record.reason, record.closed_by) == (reason, "gateway")
    assert listener.active == 0


async def test_slow_client_pauses_the_upstream():
    """A client that reads nothing must stall the sender, not grow the gateway's buffers."""
    total = 64 * 1024 * 1024
    sent = 0
    blocked = asyncio.Event()

    async def firehose(reader, writer):
        nonlocal sent
        writer.write(SERVER_BANNER)
        chunk = b"\0" * 65536
        while sent < total:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), 0.5)
            except TimeoutError:
                blocked.set()
                return
            sent += len(chunk)

    async with relay(firehose) as (listener, _recorder):
        _reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        await asyncio.wait_for(blocked.wait(), 10)
    assert sent < total
