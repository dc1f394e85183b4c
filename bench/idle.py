"""Idle relayed connections: the relay's memory and file descriptors per connection.

Each connection says hello both ways as a login would (an identification line, the end
of a key exchange, then 1 KiB spliced as encrypted traffic would be), then all sit idle
while the relay process is measured: pipes went back to the pool with their last bytes,
so each should hold its two sockets.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import struct
import sys

from bench.tools import open_fds, process, rss_bytes

BANNER = b"SSH-2.0-bench\r\n"
HELLO = struct.pack(">IBB", 12, 10, 21) + b"\0" * 10 + b"k" * 1024  # NEWKEYS, then "encrypted"
WARMUP = 20


def _holder(server: socket.socket) -> None:
    """Upstream: greets, echoes, and keeps every connection open."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def main() -> None:
        await asyncio.start_server(handle, sock=server, backlog=1024)
        await asyncio.Future()

    asyncio.run(main())


def open_idle(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(BANNER + HELLO)
    expected, got = 2 * len(BANNER) + len(HELLO), 0
    while got < expected:
        got += len(sock.recv(65536))
    return sock


RELAYS = {  # how to start each relay measured, given the upstream's port
    "splice": ["-m", "bench.relay_process"],
    "streams": ["-m", "bench.relay_process", "--streams"],
    "reference: minimal splice relay": ["-m", "bench.minimal_splice"],  # the anchor
}


def run(count: int, relay: str) -> dict[str, float]:
    """Open ``count`` idle connections through ``relay`` (a key of :data:`RELAYS`); what
    each costs it."""
    server = socket.create_server(("127.0.0.1", 0), backlog=1024)
    holder = multiprocessing.Process(target=_holder, args=(server,), daemon=True)
    holder.start()
    argv = [sys.executable, *RELAYS[relay], str(server.getsockname()[1])]
    try:
        with process(argv, None) as (pid, port):
            for sock in [open_idle(port) for _ in range(WARMUP)]:
                sock.close()
            base_rss, base_fds = rss_bytes(pid), open_fds(pid)
            clients = [open_idle(port) for _ in range(count)]
            rss, fds = rss_bytes(pid), open_fds(pid)
            for sock in clients:
                sock.close()
    finally:
        holder.terminate()
        server.close()
    return {
        "connections": count,
        "relay_rss_mib": rss / 2**20,
        "kib_per_connection": (rss - base_rss) / count / 1024,
        "fds_per_connection": (fds - base_fds) / count,
    }
