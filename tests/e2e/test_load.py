"""Load with real processes and real Docker (issue 10): a soak of create/ssh/delete cycles,
and a flood of silent connections to one session port.

``SANDMAN_SOAK_CYCLES`` (default 200, ``make soak`` runs 1000) sets the soak's length.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import socket
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from gateway.relay.splice import POOL_IDLE
from tests.e2e.conftest import Gateway, Holdings, holdings, usage, wait_for

SOAK_CYCLES = int(os.environ.get("SANDMAN_SOAK_CYCLES", "200"))
IN_FLIGHT = 10
#: Two A100s of seven 1g.10gb slices each: 14 slices, shared by 10 users in turn.
SLICED = {
    "host": "e2e",
    "gpus": [{"model": "A100-80GB", "mig": True, "instances": ["1g.10gb"] * 7}] * 2,
}
RSS_SLACK_KIB = 16 * 1024  # allocator arenas, caches: ~80 KiB a cycle over 200 cycles
FLOOD = 500
#: Docker connections the client pool may still hold, one per concurrent caller at most, and
#: the relay's idle pipes (two ends each); a leak of even one fd per cycle would be ~200 over.
POOL_SLACK = IN_FLIGHT + 2 * POOL_IDLE


@dataclass(frozen=True)
class Held:
    """One 201's session, port and slice, from its answer until its DELETE was sent."""

    session_id: str
    port: int
    gpu: str
    start: float
    end: float


def _cycle(gateway: Gateway, ssh: Any, user: str, *, keep: bool = False) -> Held:
    created = gateway.create(user_id=user, ttl_minutes=10)
    start = time.monotonic()
    assert created.status == 201, created.body
    session = created.body
    assert ssh.with_key(session, "true").returncode == 0
    end = time.monotonic()
    if not keep:
        assert gateway.request("DELETE", f"/sessions/{session['session_id']}").status == 200
    return Held(session["session_id"], session["ssh_port"], session["gpu_uuid"], start, end)


def _given_twice(held: list[Held], key: str) -> list[tuple[Held, Held]]:
    """Pairs of different sessions that held the same port (or slice) at the same time."""
    ordered = sorted(held, key=lambda h: (getattr(h, key), h.start))
    return [
        (a, b)
        for a, b in itertools.pairwise(ordered)
        if getattr(a, key) == getattr(b, key) and b.start < a.end
    ]


def test_soak_of_create_ssh_delete_cycles(gateway_factory, topology, ssh):
    gateway = gateway_factory("--gpus", topology(SLICED), "--default-mig-profile", "1g.10gb")
    assert gateway.proc is not None
    users = [f"soak{i}" for i in range(IN_FLIGHT)]
    rounds = max(2, -(-SOAK_CYCLES // IN_FLIGHT))  # cycles per user, the first a warm-up
    fresh = usage(gateway.proc.pid)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(IN_FLIGHT) as pool:
        held = list(pool.map(lambda u: _cycle(gateway, ssh, u), users))  # warm-up round
        baseline = usage(gateway.proc.pid)

        def worker(user: str) -> list[Held]:
            done = [_cycle(gateway, ssh, user) for _ in range(rounds - 2)]
            return [*done, _cycle(gateway, ssh, user, keep=True)]  # the last one stays

        results = list(pool.map(worker, users))
    kept = {result[-1].gpu for result in results}
    held += [h for result in results for h in result]
    took = time.monotonic() - began
    assert len(held) == rounds * IN_FLIGHT >= SOAK_CYCLES
    assert len({h.session_id for h in held}) == len(held)
    assert _given_twice(held, "port") == [] and _given_twice(held, "gpu") == []

    live = holdings(gateway)
    assert live.consistent and len(live.rows) == IN_FLIGHT, live  # rows = containers = ports
    assert live.slices == kept
    assert gateway.request("DELETE", "/sessions").body["deleted"] == IN_FLIGHT
    assert holdings(gateway) == Holdings(rows={}, containers=set(), listeners=set())
    # Pooled keep-alive connections to Docker close after 15 s idle, unless a sweep or the
    # event watcher reuses them meanwhile; the count at start may itself include some.
    wait_for(
        lambda: usage(gateway.proc.pid).fds <= fresh.fds + POOL_SLACK,
        timeout=45,
        what=f"fds back to {fresh.fds} + {POOL_SLACK} (now {usage(gateway.proc.pid).fds})",
    )
    after = usage(gateway.proc.pid)
    print(
        f"\nsoak: {len(held)} cycles, {IN_FLIGHT} in flight, {took:.1f} s;"
        f" gateway at start: {fresh}; after one cycle each: {baseline}; at the end: {after}"
    )
    assert after.rss_kib <= baseline.rss_kib + RSS_SLACK_KIB


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def _metric(gateway: Gateway, name: str, **labels: str) -> float:
    text = gateway.request("GET", "/metrics").body
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise AssertionError(f"no metric {name}")


def test_flood_of_silent_connections(gateway_factory):
    """500 connections that never start a key exchange: each newcomer makes the most silent
    one yield (so nobody is locked out), none is written one by one, every one is counted,
    and the API keeps answering."""
    gateway = gateway_factory("--preauth-timeout", "2s", "--max-connections-per-session", "8")
    session = gateway.create(user_id="flo", ttl_minutes=10).body
    url = f"/sessions/{session['session_id']}/connections"
    events = gateway.request("GET", "/audit?limit=1000").body["events"]

    latencies: list[float] = []
    done = threading.Event()

    def probe_health() -> None:
        while not done.is_set():
            began = time.monotonic()
            assert gateway.request("GET", "/healthz").status == 200
            latencies.append(time.monotonic() - began)

    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        prober = pool.submit(probe_health)
        socks = [socket.create_connection(("127.0.0.1", session["ssh_port"])) for _ in range(FLOOD)]
        for sock in socks:
            sock.settimeout(20)
        answers = [_read_until_closed(sock) for sock in socks]  # every one is cut
        took = time.monotonic() - began
        done.set()
        prober.result()
    for sock in socks:
        sock.close()
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(
        f"\nflood: {FLOOD} silent connections, all closed in {took:.1f} s;"
        f" GET /healthz p99 {p99 * 1000:.0f} ms over {len(latencies)} requests"
    )
    assert not [a for a in answers if b"too many connections" in a]  # none refused
    assert p99 < 1.0

    def counted() -> float:
        return sum(
            _metric(gateway, "sandman_connections_before_kex_total", reason=reason)
            for reason in ("evicted", "preauth_timeout")
        )

    wait_for(lambda: counted() == FLOOD, timeout=10, what="every connection counted")
    assert gateway.request("GET", url).body["connections"] == []  # no record per attempt
    assert len(gateway.request("GET", "/audit?limit=1000").body["events"]) == len(events)
    assert _metric(gateway, "sandman_connections_refused_total") == 0
