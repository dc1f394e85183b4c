"""Relay benchmark: what the gateway's per-connection relay costs, measured side by side.

Each round moves the same bytes over loopback twice, once straight to an upstream
server and once through a :class:`gateway.relay.SessionListener` in front of it, and
also times connection set-up (connect, banner, close) both ways. Rounds alternate so
machine noise hits both sides alike; the ratios (relay / direct) are what to read.

    .venv/bin/python bench/relay.py [--megabytes 64] [--rounds 5] [--connections 200]

The upstream and the client run in a child process so the gateway's event loop, as in
production, does nothing but relay.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from multiprocessing.connection import Connection

from gateway.models import ConnectionRecord, utcnow
from gateway.relay import RelayLimits, SessionListener

BANNER = b"SSH-2.0-bench\r\n"
CHUNK = b"\0" * 65536


class NullObserver:
    async def connection_opened(self, record: ConnectionRecord) -> None:
        return None

    async def connection_closed(self, record: ConnectionRecord) -> None:
        return None


async def _source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Upstream: greets, then sends the number of bytes the client asks for."""
    writer.write(BANNER)
    request = await reader.readline()
    if request.startswith(b"SSH-"):
        request = await reader.readline()
    remaining = int(request or b"0")
    while remaining > 0:
        piece = CHUNK[: min(len(CHUNK), remaining)]
        writer.write(piece)
        remaining -= len(piece)
        await writer.drain()
    writer.close()


async def _download(port: int, size: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(BANNER + f"{size}\n".encode())
    await reader.readline()
    got = 0
    while data := await reader.read(1 << 20):
        got += len(data)
    writer.close()
    assert got == size, (got, size)
    return time.perf_counter() - start


async def _handshakes(port: int, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(BANNER + b"0\n")
        await reader.read()
        writer.close()
    return time.perf_counter() - start


def _upstream_process(conn: Connection) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_source, "127.0.0.1", 0)
        conn.send(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        while True:
            job = await loop.run_in_executor(None, conn.recv)
            if job is None:
                return
            kind, port, amount = job
            if kind == "download":
                conn.send(await _download(port, amount))
            else:
                conn.send(await _handshakes(port, amount))

    asyncio.run(main())


async def bench(megabytes: int, rounds: int, connections: int) -> None:
    parent, child = multiprocessing.Pipe()
    worker = multiprocessing.Process(target=_upstream_process, args=(child,), daemon=True)
    worker.start()
    upstream_port = parent.recv()
    listener = SessionListener(
        "bench", "bench", 0,
        limits=RelayLimits(max_connections=10_000), observer=NullObserver(), clock=utcnow,
    )  # fmt: skip
    await listener.bind("127.0.0.1")
    assert listener._server is not None
    relay_port = listener._server.sockets[0].getsockname()[1]
    listener.set_upstream("127.0.0.1", upstream_port)
    loop = asyncio.get_running_loop()

    async def run(kind: str, port: int, amount: int) -> float:
        parent.send((kind, port, amount))
        return await loop.run_in_executor(None, parent.recv)

    size = megabytes * 1024 * 1024
    times: dict[str, list[float]] = {k: [] for k in ("direct", "relay", "hs_direct", "hs_relay")}
    for _ in range(rounds):
        times["direct"].append(await run("download", upstream_port, size))
        times["relay"].append(await run("download", relay_port, size))
        times["hs_direct"].append(await run("handshakes", upstream_port, connections))
        times["hs_relay"].append(await run("handshakes", relay_port, connections))
    parent.send(None)
    worker.join(timeout=10)
    await listener.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"relay benchmark: {megabytes} MiB x {rounds} rounds, {connections} connections/round")
    print(f"  throughput direct  {megabytes / med['direct']:9.1f} MiB/s")
    print(f"  throughput relay   {megabytes / med['relay']:9.1f} MiB/s")
    print(f"  throughput ratio relay/direct: {med['direct'] / med['relay']:.2f}")
    print(f"  connect+close direct {1e3 * med['hs_direct'] / connections:7.3f} ms")
    print(f"  connect+close relay  {1e3 * med['hs_relay'] / connections:7.3f} ms")
    print(f"  connection time ratio relay/direct: {med['hs_relay'] / med['hs_direct']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(bench(args.megabytes, args.rounds, args.connections))


if __name__ == "__main__":
    main()
