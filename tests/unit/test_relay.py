"""The relay on loopback sockets: close reasons, banners, bytes, limits and backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from gateway.models import CloseReason, ConnectionRecord, utcnow
from gateway.relay import RelayLimits, SessionListener, splice
from tests.unit.helpers import CLIENT_BANNER, CLIENT_KEX, SERVER_BANNER, echo_upstream, packet


class Recorder:
    def __init__(self) -> None:
        self.opened: list[ConnectionRecord] = []
        self.closed: asyncio.Queue[ConnectionRecord] = asyncio.Queue()
        self.before_kex: list[ConnectionRecord] = []  # ended before kex: summarised, not recorded
        self.refused = 0

    async def connection_opened(self, record: ConnectionRecord) -> None:
        self.opened.append(record)

    async def connection_closed(self, record: ConnectionRecord) -> None:
        await self.closed.put(record)

    def connection_ended_before_kex(self, record: ConnectionRecord) -> None:
        self.before_kex.append(record)
        self.closed.put_nowait(record)

    def connection_refused(self, session_id: str) -> None:
        self.refused += 1

    async def next_closed(self) -> ConnectionRecord:
        return await asyncio.wait_for(self.closed.get(), 5)


async def closing_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(SERVER_BANNER)
    await writer.drain()
    writer.close()


PATHS = ["splice", "streams"] if splice.AVAILABLE else ["streams"]


@pytest.fixture(params=PATHS)
def relay(request):
    """``relay(handler, **limits)``: a listener in front of ``handler``, on each data path."""

    @contextlib.asynccontextmanager
    async def make(handler=echo_upstream, **limits):
        upstream = await asyncio.start_server(handler, "127.0.0.1", 0)
        recorder = Recorder()
        listener = SessionListener(
            "s1",
            "alice",
            0,
            limits=RelayLimits(**limits),
            observer=recorder,
            clock=utcnow,
            splice=request.param == "splice",
        )
        await listener.bind("127.0.0.1")
        listener.set_upstream("127.0.0.1", upstream.sockets[0].getsockname()[1])
        try:
            yield listener, recorder
        finally:
            await listener.close()
            upstream.close()

    return make


def open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


async def connect(listener: SessionListener):
    return await asyncio.open_connection("127.0.0.1", listener.port)


async def test_client_close_records_bytes_banners_and_side(relay):
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_KEX + b"x" * 100_000)
        writer.write_eof()
        received = await reader.read()  # until the server closes after our EOF
        writer.close()
        record = await recorder.next_closed()
    assert received == SERVER_BANNER + CLIENT_KEX + b"x" * 100_000
    assert record.reason is CloseReason.CLIENT_CLOSED and record.closed_by == "client"
    assert record.bytes_up == len(CLIENT_KEX) + 100_000
    assert record.bytes_down == len(received)
    assert record.client_banner == "SSH-2.0-OpenSSH_9.2p1"
    assert record.server_banner == "SSH-2.0-OpenSSH_9.2p1 Debian-2"
    assert record.client_addr == "127.0.0.1" and record.client_port > 0
    assert record.ended_at is not None and record.duration >= 0
    assert [r.id for r in recorder.opened] == [record.id] and not recorder.before_kex


async def test_a_connection_ending_before_kex_is_only_summarised(relay):
    """No NEWKEYS from the client: the observer hears of it once, as ended before kex."""
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER + packet(20, b"k" * 300))  # KEXINIT, then gone
        writer.write_eof()
        await reader.read()
        writer.close()
        record = await recorder.next_closed()
    assert recorder.before_kex == [record] and recorder.opened == []
    assert record.reason is CloseReason.CLIENT_CLOSED
    assert record.client_banner == "SSH-2.0-OpenSSH_9.2p1"


async def test_server_close_is_server_closed(relay):
    async with relay(closing_upstream) as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        assert await reader.read() == SERVER_BANNER
        writer.close()  # as an ssh client does on EOF
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.SERVER_CLOSED, "server")


async def test_silent_client_hits_preauth_deadline(relay):
    async with relay(preauth_timeout=0.2) as (listener, recorder):
        reader, _writer = await connect(listener)
        record = await recorder.next_closed()
        assert await reader.read() == SERVER_BANNER  # then closed by the gateway
    assert (record.reason, record.closed_by) == (CloseReason.PREAUTH_TIMEOUT, "gateway")
    assert record.client_banner is None


async def test_idle_connection_is_closed(relay):
    async with relay(idle_timeout=0.3) as (listener, recorder):
        _reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.IDLE_TIMEOUT, "gateway")
    assert record.duration >= 0.3


async def read_disconnect(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read the gateway's identification line and the plaintext SSH_MSG_DISCONNECT after it:
    (reason code, description); the gateway then closes."""
    assert await reader.readline() == b"SSH-2.0-sandman\r\n"
    length, padding = struct.unpack(">IB", await reader.readexactly(5))
    payload = (await reader.readexactly(length - 1))[: length - 1 - padding]
    message, reason, size = struct.unpack(">BII", payload[:9])
    assert message == 1  # SSH_MSG_DISCONNECT
    assert payload[9 + size :] == b"\0\0\0\0"  # an empty language tag
    assert await reader.read() == b""
    return reason, payload[9 : 9 + size].decode()


async def test_connection_limit_refuses_with_an_ssh_disconnect(relay):
    """Every slot holds a login past its key exchange: the newcomer is refused in words an
    SSH client prints (a disconnect message before any key exchange), counted, not recorded."""
    async with relay(max_connections=1) as (listener, recorder):
        r1, w1 = await connect(listener)
        w1.write(CLIENT_KEX)
        assert await r1.readexactly(len(SERVER_BANNER + CLIENT_KEX))  # relayed and past kex
        r2, w2 = await connect(listener)
        w2.write(CLIENT_BANNER)
        reason, text = await read_disconnect(r2)
        assert reason == 2
        assert text == (
            "too many connections to this session (limit 1); close one or use ControlMaster"
        )
        assert listener.active == 1
        assert recorder.refused == 1
        assert len(recorder.opened) == 1  # the login; the refusal is counted, not recorded
        assert recorder.closed.empty()


async def squat(listener: SessionListener, source: str = "127.0.0.1"):
    """A connection from ``source`` that sends an identification line and then nothing."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listener.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(CLIENT_BANNER)
    echoed = await reader.readexactly(len(SERVER_BANNER + CLIENT_BANNER))
    assert echoed == SERVER_BANNER + CLIENT_BANNER  # relayed, so registered
    return reader, writer


async def test_silent_squatters_yield_to_a_newcomer(relay):
    """Every slot held by connections that stopped before their key exchange: a newcomer
    gets in, and the one silent the longest is cut (evicted) to make room."""
    async with relay(max_connections=3) as (listener, recorder):
        squatters = [await squat(listener) for _ in range(3)]
        kexinit = packet(20, b"k" * 40)
        squatters[0][1].write(kexinit)  # the oldest spoke again: the second is the most silent
        assert await squatters[0][0].readexactly(len(kexinit)) == kexinit  # echoed, so relayed
        reader, writer = await connect(listener)
        writer.write(CLIENT_KEX)
        assert await reader.readexactly(len(SERVER_BANNER + CLIENT_KEX))
        evicted = await recorder.next_closed()
        assert evicted.client_port == squatters[1][1].get_extra_info("sockname")[1]
        assert (evicted.reason, evicted.closed_by) == (CloseReason.EVICTED, "gateway")
        await squatters[1][0].read()  # the gateway closed it
        assert squatters[1][0].at_eof()
        assert listener.active == 3 and recorder.refused == 0
        assert len(recorder.opened) == 1  # the newcomer's login


async def test_the_source_holding_most_silent_slots_yields_first(relay):
    """Where sources differ, the one crowding the session loses a slot, not an older
    connection from somewhere else."""
    async with relay(max_connections=3) as (listener, recorder):
        lone = await squat(listener, "127.0.0.1")  # the oldest
        crowd = [await squat(listener, "127.0.0.2") for _ in range(2)]
        reader, writer = await connect(listener)
        writer.write(CLIENT_KEX)
        assert await reader.readexactly(len(SERVER_BANNER + CLIENT_KEX))
        evicted = await recorder.next_closed()
        assert evicted.client_addr == "127.0.0.2" and evicted.reason is CloseReason.EVICTED
        assert evicted.client_port == crowd[0][1].get_extra_info("sockname")[1]
        assert not lone[0].at_eof()


async def test_unreachable_upstream(relay):
    async with relay() as (listener, recorder):
        listener.set_upstream("127.0.0.1", 1)
        reader, _writer = await connect(listener)
        assert await reader.read() == b""
        record = await recorder.next_closed()
    assert record.reason is CloseReason.UPSTREAM_UNREACHABLE


@pytest.mark.parametrize("reason", [CloseReason.SESSION_DELETED, CloseReason.TTL_EXPIRED])
async def test_closing_the_listener_cuts_with_its_reason(relay, reason):
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        assert await reader.readexactly(len(SERVER_BANNER + CLIENT_BANNER))
        await listener.close(reason)
        record = await recorder.next_closed()
        assert await reader.read() == b""
    assert (record.reason, record.closed_by) == (reason, "gateway")
    assert listener.active == 0


async def test_slow_client_pauses_the_upstream(relay):
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
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        writer.write(CLIENT_BANNER)
        await asyncio.wait_for(blocked.wait(), 10)
    assert sent < kernel_buffers()  # the gateway itself holds at most a pipe


def kernel_buffers() -> int:
    """What the kernel may buffer between a stalled client and the sender: the gateway's
    receive buffer from the upstream (autotuned up to tcp_rmem's maximum), two send
    buffers, one pipe, and 1 MiB of slack."""
    maximum = [
        int(Path(f"/proc/sys/net/ipv4/tcp_{b}").read_text().split()[2]) for b in ("rmem", "wmem")
    ]
    return maximum[0] + 2 * maximum[1] + splice.PIPE_SIZE + (1 << 20)


async def test_slow_upstream_pauses_the_client(relay):
    """The other direction: an upstream that reads nothing stalls the client."""
    stalled = asyncio.Event()

    async def deaf(reader, writer):
        writer.write(SERVER_BANNER)
        await stalled.wait()
        writer.close()

    async with relay(deaf) as (listener, recorder):
        _reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        chunk, sent = b"\0" * 65536, 0
        with contextlib.suppress(TimeoutError):
            while sent < 64 * 1024 * 1024:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 0.5)
                sent += len(chunk)
        stalled.set()
        writer.close()
        record = await recorder.next_closed()
    assert sent < 64 * 1024 * 1024
    assert record.bytes_up <= sent + len(CLIENT_BANNER) + len(chunk)


async def test_bulk_both_ways_arrives_intact_and_counted(relay):
    """Megabytes each way at once: every byte arrives, in order, and the record counts it."""
    size = 8 * 1024 * 1024
    down = bytes(range(256)) * (size // 256)
    up = bytes(reversed(range(256))) * (size // 256)
    received_up = bytearray()
    upstream_got_eof = asyncio.Event()

    async def exchange(reader, writer):
        writer.write(SERVER_BANNER)

        async def send():
            for i in range(0, size, 100_003):
                writer.write(down[i : i + 100_003])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        while data := await reader.read(1 << 20):
            received_up.extend(data)
        upstream_got_eof.set()
        await sender
        writer.close()

    async with relay(exchange) as (listener, recorder):
        reader, writer = await connect(listener)

        async def send():
            writer.write(CLIENT_BANNER)
            for i in range(0, size, 77_777):
                writer.write(up[i : i + 77_777])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received_down = await reader.read()
        await sender
        writer.close()
        record = await recorder.next_closed()
        await asyncio.wait_for(upstream_got_eof.wait(), 5)  # the last bytes may still be on the way
    assert received_down == SERVER_BANNER + down
    assert received_up == CLIENT_BANNER + up
    assert (record.bytes_up, record.bytes_down) == (len(received_up), len(received_down))


async def test_half_close_both_ways(relay):
    """The client's EOF reaches the server, which still answers; then the server's EOF."""

    async def counter(reader, writer):
        writer.write(SERVER_BANNER)
        total = len(await reader.read())  # until the client's EOF
        writer.write(f"got {total}\n".encode())
        writer.close()

    async with relay(counter) as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER + b"y" * 300_000)
        writer.write_eof()
        assert (
            await reader.read() == SERVER_BANNER + f"got {len(CLIENT_BANNER) + 300_000}\n".encode()
        )
        writer.close()
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.CLIENT_CLOSED, "client")


async def test_banner_after_other_lines_and_split_across_reads(relay):
    """SSH allows lines before the identification line; it may come in pieces."""
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        echoed = await reader.readexactly(len(SERVER_BANNER))
        for piece in (b"hello there\r\n", b"SSH-2.0-Spl", b"it_1.0\r\n", b"rest"):
            writer.write(piece)
            echoed += await reader.readexactly(len(piece))  # relayed alone: a read of its own
        writer.write_eof()
        echoed += await reader.read()
        writer.close()
        record = await recorder.next_closed()
    assert echoed == SERVER_BANNER + b"hello there\r\nSSH-2.0-Split_1.0\r\nrest"
    assert record.client_banner == "SSH-2.0-Split_1.0"
    assert record.bytes_up == len(b"hello there\r\nSSH-2.0-Split_1.0\r\nrest")


async def test_cut_during_a_transfer_records_and_leaks_nothing(relay):
    """A cut in the middle of a bulk download ends it with the reason, closing every fd."""
    before = open_fds()
    upstream_closed = asyncio.Event()

    async def endless(reader, writer):
        writer.write(SERVER_BANNER)
        with contextlib.suppress(OSError):
            while True:
                writer.write(b"\0" * 65536)
                await writer.drain()
        writer.close()  # the reset reached the upstream: its socket goes too
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        upstream_closed.set()

    async with relay(endless) as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER)
        assert len(await reader.readexactly(1 << 20)) == 1 << 20
        await listener.close(CloseReason.TTL_EXPIRED)
        record = await recorder.next_closed()
        with contextlib.suppress(ConnectionError):
            while await reader.read(1 << 20):
                pass
        writer.close()
    assert (record.reason, record.closed_by) == (CloseReason.TTL_EXPIRED, "gateway")
    assert record.bytes_down >= 1 << 20
    await asyncio.wait_for(upstream_closed.wait(), 5)
    assert open_fds() <= before


async def test_client_reset_mid_transfer_is_client_closed(relay):
    async with relay() as (listener, recorder):
        reader, writer = await connect(listener)
        writer.write(CLIENT_BANNER + b"z" * 100_000)
        await reader.readexactly(len(SERVER_BANNER) + 1000)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN
        record = await recorder.next_closed()
    assert (record.reason, record.closed_by) == (CloseReason.CLIENT_CLOSED, "client")


def _blast_small_segments(server: socket.socket, stalled: threading.Event) -> None:
    """Upstream: one connection; its key exchange, then 100-byte segments (each its own
    packet, so each its own pipe slot) until the relay stops taking them."""
    conn, _ = server.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(SERVER_BANNER + packet(21))
        conn.settimeout(0.5)
        with contextlib.suppress(OSError):  # the send timed out: nothing moves any more
            while True:
                conn.send(b"s" * 100)
        stalled.set()
        conn.settimeout(None)
        with contextlib.suppress(OSError):
            conn.recv(1)  # until the test closes


async def test_a_stalled_destination_costs_no_cpu(relay):
    """Small segments fill the pipe by slots long before its byte capacity; while the
    client reads nothing the relay must wait, not poll (CPU time measured, not only that
    the data stopped)."""
    server = socket.create_server(("127.0.0.1", 0))
    stalled = threading.Event()
    blaster = threading.Thread(target=_blast_small_segments, args=(server, stalled))
    blaster.start()
    try:
        async with relay() as (listener, _recorder):
            listener.set_upstream("127.0.0.1", server.getsockname()[1])
            sock = socket.create_connection(("127.0.0.1", listener.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # fills soon
            sock.sendall(CLIENT_KEX)
            assert await asyncio.to_thread(stalled.wait, 20)
            began = time.process_time()
            await asyncio.sleep(1.0)  # the destination takes nothing meanwhile
            spent = time.process_time() - began
            sock.close()
    finally:
        blaster.join(10)
        server.close()
    assert spent < 0.2, f"{spent:.2f} s of CPU in 1 s while nothing could move"


async def test_idle_connections_hold_no_pipes(relay):
    """Past its key exchange and idle, a connection holds its two sockets and nothing
    else: the pipes went back to the pool when their bytes had moved."""
    async with relay() as (listener, _recorder):
        before = open_fds()
        clients = []
        for _ in range(20):
            reader, writer = await connect(listener)
            writer.write(CLIENT_KEX + b"x" * 100_000)  # spliced, then idle
            await reader.readexactly(len(SERVER_BANNER + CLIENT_KEX) + 100_000)
            clients.append(writer)
        per_connection = (open_fds() - before) / len(clients)
        for writer in clients:
            writer.close()
    # in this process: the test's socket, the relay's two, the upstream's one
    assert per_connection <= 4 + 2 * splice.POOL_IDLE / len(clients)


class NoPipes(splice.PipePool):
    """A pool on a host out of file descriptors."""

    def take(self):
        raise OSError(errno.EMFILE, "Too many open files")


@pytest.mark.skipif(not splice.AVAILABLE, reason="the splice data path is Linux-only")
async def test_no_pipe_to_be_had_is_the_gateways_error_not_the_client_closing():
    upstream = await asyncio.start_server(echo_upstream, "127.0.0.1", 0)
    recorder = Recorder()
    listener = SessionListener(
        "s1", "alice", 0, limits=RelayLimits(), observer=recorder, clock=utcnow, pipes=NoPipes()
    )
    await listener.bind("127.0.0.1")
    listener.set_upstream("127.0.0.1", upstream.sockets[0].getsockname()[1])
    try:
        reader, writer = await connect(listener)
        writer.write(CLIENT_KEX)
        await reader.readexactly(len(SERVER_BANNER + CLIENT_KEX))
        writer.write(b"x" * 1000)  # past the key exchange, bytes are spliced through a pipe
        record = await recorder.next_closed()
        writer.close()
    finally:
        await listener.close()
        upstream.close()
    assert (record.reason, record.closed_by) == (CloseReason.ERROR, "gateway")


async def test_lookup_is_asked_at_each_connection(relay):
    """A container that moved (a Swarm task replaced on another port) is reached at its
    new address without re-setting the upstream."""
    async with relay() as (listener, recorder):
        moved = await asyncio.start_server(echo_upstream, "127.0.0.1", 0)
        asked: list[int] = []

        async def lookup() -> tuple[str, int]:
            asked.append(1)
            return "127.0.0.1", moved.sockets[0].getsockname()[1]

        listener.set_upstream("127.0.0.1", 1, lookup)  # the old address: refused
        for _ in range(2):
            await _banner_round_trip(listener, recorder)
        moved.close()
    assert len(asked) == 2


async def _banner_round_trip(listener: SessionListener, recorder) -> None:
    """A client's banner reaches the upstream and its answer comes back; the client then
    closes, and the connection is recorded as closed by it."""
    reader, writer = await connect(listener)
    writer.write(CLIENT_BANNER)
    assert await reader.readline() == SERVER_BANNER
    writer.close()
    assert (await recorder.next_closed()).reason is CloseReason.CLIENT_CLOSED


async def test_lookup_is_asked_again_once_when_its_answer_fails(relay):
    async with relay() as (listener, recorder):
        replacement = await asyncio.start_server(echo_upstream, "127.0.0.1", 0)
        answers = [("127.0.0.1", 1), ("127.0.0.1", replacement.sockets[0].getsockname()[1])]
        asked: list[tuple[str, int]] = []

        async def lookup() -> tuple[str, int]:
            asked.append(answers[len(asked)])
            return asked[-1]

        listener.set_upstream("127.0.0.1", 1, lookup)
        await _banner_round_trip(listener, recorder)
        replacement.close()
    assert asked == answers


@pytest.mark.parametrize("answer", ["nowhere", "fails"])
async def test_lookup_with_no_answer_is_unreachable_after_two_tries(relay, answer):
    """No running task (None) or an engine that fails: two lookups, then the client is
    told the upstream is unreachable (a failing lookup falls back to the last address)."""
    async with relay() as (listener, recorder):
        asked = 0

        async def lookup() -> tuple[str, int] | None:
            nonlocal asked
            asked += 1
            if answer == "fails":
                raise RuntimeError("engine down")
            return None

        listener.set_upstream("127.0.0.1", 1, lookup)
        reader, _writer = await connect(listener)
        assert await reader.read() == b""
        assert (await recorder.next_closed()).reason is CloseReason.UPSTREAM_UNREACHABLE
    assert asked == 2
