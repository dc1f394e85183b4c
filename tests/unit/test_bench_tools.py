"""The benchmark's own helpers (``make bench`` itself is not part of the tests)."""

from __future__ import annotations

import os
import socket
import threading

from bench import bulk
from bench.tools import cpu_seconds, open_fds, percentile, rss_bytes, table


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0


def test_table_pads_columns():
    text = table("t", ["a", "bb"], [["xxx", "1"], ["y", "22"]])
    assert text.splitlines() == ["t", "a    bb", "---  --", "xxx  1", "y    22"]


def test_process_probes_read_this_process():
    pid = os.getpid()
    assert cpu_seconds(pid) > 0 and rss_bytes(pid) > 1 << 20 and open_fds(pid) >= 3


def test_send_moves_every_byte_to_a_sink():
    server = socket.create_server(("127.0.0.1", 0))
    received = []

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                received.append(len(data))

    thread = threading.Thread(target=sink)
    thread.start()
    seconds = bulk.send(server.getsockname()[1], 3 << 20)
    thread.join()
    server.close()
    assert sum(received) == len(bulk.BANNER) + (3 << 20) and seconds > 0
