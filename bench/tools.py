"""What every part of the benchmark shares: process probes, statistics, packages, the table."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

GiB = 1 << 30
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User plus system CPU time of ``pid`` (all its threads) so far, and with ``children``
    that of its children it has reaped."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` 0.5 is the median)."""
    ordered = sorted(values)
    rank = max(0, math.ceil(fraction * len(ordered)) - 1)
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values)


def ensure_tools(*packages: str) -> list[str]:
    """Install the Debian ``packages`` whose command is missing (as root); return those
    still missing afterwards, so their rows can say why they are absent."""
    missing = [name for name in packages if shutil.which(name) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=False)
    return [name for name in packages if shutil.which(name) is None]


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table, columns padded to fit."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * w for w in widths], *rows]
    padded = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
              for line in lines]  # fmt: skip
    return "\n".join([title, *padded])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextlib.contextmanager
def process(argv: list[str], port: int | None) -> Iterator[tuple[int, int]]:
    """Run a relay listening on ``port`` (None: it prints the port it picked); yield
    (its pid, its port) once it listens."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        if port is None:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
        wait_listening(port)
        yield proc.pid, port
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=10)
