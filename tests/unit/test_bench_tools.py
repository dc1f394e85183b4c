"""The benchmark's own helpers (``make bench`` itself is not part of the tests)."""

from __future__ import annotations

import os
import socket
import threading

from bench import bulk
from bench.swarm import step_seconds
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


def test_create_steps_are_timed_from_the_gateway_log(tmp_path):
    log = tmp_path / "gateway.log"
    log.write_text(
        "2026-12-06 10:00:00,000 DEBUG gateway.sessions: session a: create step port_bound done\n"
        "2026-12-06 10:00:00,100 DEBUG gateway.sessions: session b: create step port_bound done\n"
        "2026-12-06 10:00:00,500 INFO gateway.sessions: something else\n"
        "2026-12-06 10:00:01,000 DEBUG gateway.sessions: session a: create step sshd_ready done\n"
        "2026-12-06 10:00:00,400 DEBUG gateway.sessions: session b: create step sshd_ready done\n"
    )
    assert step_seconds(log) == {"sshd_ready": [1.0, 0.3]}
