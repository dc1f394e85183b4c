"""Bulk TCP through the gateway's relay, side by side with direct, socat and haproxy.

A source doing ``sendall`` of 256 KiB buffers and a sink doing ``recv_into`` a 1 MiB
buffer (each its own process, faster than any relay here) move the same bytes straight
and through each relay; rounds rotate the order so machine noise hits all alike. For each
relay: MB/s, the ratio to direct, and the CPU seconds per GiB of the relaying process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.tools import GiB, cpu_seconds, ensure_tools, free_port, median, process

BANNER = b"SSH-2.0-bench\r\n"
SEND = 256 * 1024
RECV = 1 << 20
SEND_TIMEOUT = 60.0  # a relay that stalls fails the run instead of hanging it


def _drain(conn: socket.socket) -> None:
    buffer = memoryview(bytearray(RECV))
    with conn, contextlib.suppress(OSError):
        while conn.recv_into(buffer):
            pass


def _sink(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_drain, args=(conn,), daemon=True).start()


def send(port: int, size: int) -> float:
    """Send ``size`` bytes through ``port``; seconds until the sink's close comes back."""
    payload = memoryview(bytes(SEND))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=SEND_TIMEOUT) as sock:
        sock.sendall(BANNER)
        remaining = size
        while remaining > 0:
            sock.sendall(payload[: min(SEND, remaining)])
            remaining -= SEND
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # EOF: the sink has everything
    return time.perf_counter() - start


def children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


@dataclass
class Contender:
    """One way from the source to the sink: its port and the process doing the relaying."""

    name: str
    port: int
    pid: int | None
    rates: list[float] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)

    def cpu(self) -> float:
        if self.pid is None:
            return 0.0
        deadline = time.monotonic() + 5  # socat's per-connection child: counted once reaped
        while children(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return cpu_seconds(self.pid, children=True)


def haproxy_config(directory: Path, port: int, sink_port: int) -> Path:
    path = directory / "haproxy.cfg"
    path.write_text(
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n"
        "  timeout server 60s\n"
        f"frontend bench\n  bind 127.0.0.1:{port}\n  default_backend sink\n"
        f"backend sink\n  server sink 127.0.0.1:{sink_port}\n"
    )
    return path


def relay_commands(sink_port: int, directory: Path) -> dict[str, tuple[list[str], int | None]]:
    """The relays to compare, each with its port (None: it says which): the gateway's on
    each data path (and on uvloop where that is installed), socat and haproxy."""
    ours = [sys.executable, "-m", "bench.relay_process", str(sink_port)]
    commands: dict[str, tuple[list[str], int | None]] = {
        "gateway relay (splice)": (ours, None),
        "gateway relay (streams)": ([*ours, "--streams"], None),
    }
    if _has_uvloop():
        commands["gateway relay (splice, uvloop)"] = ([*ours, "--uvloop"], None)
        commands["gateway relay (streams, uvloop)"] = ([*ours, "--streams", "--uvloop"], None)
    commands["reference: minimal splice relay"] = (
        [sys.executable, "-m", "bench.minimal_splice", str(sink_port)],
        None,
    )
    missing = ensure_tools("socat", "haproxy")
    if "socat" not in missing:
        port = free_port()
        argv = ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                f"TCP:127.0.0.1:{sink_port}"]  # fmt: skip
        commands["socat"] = (argv, port)
    if "haproxy" not in missing:
        port = free_port()
        config = haproxy_config(directory, port, sink_port)
        commands["haproxy"] = (["haproxy", "-db", "-f", str(config)], port)
    return commands


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def run(size: int, rounds: int) -> dict[str, dict[str, float]]:
    """Every contender, ``rounds`` times, ``size`` bytes each; medians by contender."""
    server = socket.create_server(("127.0.0.1", 0), backlog=16)
    sink = multiprocessing.Process(target=_sink, args=(server,), daemon=True)
    sink.start()
    sink_port = server.getsockname()[1]
    contenders = [Contender("direct", sink_port, None)]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for name, (argv, wanted) in relay_commands(sink_port, Path(tmp)).items():
            pid, port = stack.enter_context(process(argv, wanted))
            contenders.append(Contender(name, port, pid))
        send(sink_port, 64 << 20)  # warm up the sink and the page cache of the path
        for round_ in range(rounds):
            shift = round_ % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                before = contender.cpu()
                seconds = send(contender.port, size)
                contender.rates.append(size / seconds / 1e6)
                contender.cpu_per_gib.append((contender.cpu() - before) / (size / GiB))
    sink.terminate()
    server.close()
    direct = median(contenders[0].rates)
    return {
        c.name: {
            "mb_per_s": median(c.rates),
            "ratio_to_direct": median(c.rates) / direct,
            "cpu_s_per_gib": median(c.cpu_per_gib),
        }
        for c in contenders
    }
