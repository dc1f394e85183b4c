"""Prometheus metrics of one gateway, in a registry of its own (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.models import CloseReason, ConnectionRecord

CONTENT_TYPE = CONTENT_TYPE_LATEST
QUEUE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0)
CREATE_BUCKETS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_live = Gauge("sandman_sessions_live", "Live sessions", registry=r)
        self.connections_live = Gauge(
            "sandman_connections_live", "Relayed SSH connections now open", registry=r
        )
        self.connections_ended = Counter(
            "sandman_connections_ended",
            "Relayed connections ended, by reason",
            ["reason"],
            registry=r,
        )
        self.connections_refused = Counter(
            "sandman_connections_refused",
            "Connections turned away by --max-connections-per-session, every slot a login"
            " (never recorded)",
            registry=r,
        )
        self.connections_before_kex = Counter(
            "sandman_connections_before_kex",
            "Connections that ended before the client finished its key exchange, by reason"
            " (not recorded one by one: summarised per source in connections_before_kex events)",
            ["reason"],
            registry=r,
        )
        self.bytes_relayed = Counter(
            "sandman_relayed_bytes",
            "Bytes relayed by ended connections; up is client to container",
            ["direction"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "sandman_session_create_seconds",
            "Time from POST /sessions to SSH answering through the session port",
            buckets=CREATE_BUCKETS,
            registry=r,
        )
        self.gpu_slices = Gauge(
            "sandman_gpu_slices", "GPU slices (MIG instances or whole GPUs)", ["state"], registry=r
        )
        self.sessions_ended = Counter(
            "sandman_sessions_ended",
            "Sessions ended, by reason (idle: reclaimed as idle; ttl_expired, ...)",
            ["reason"],
            registry=r,
        )
        self.session_idle_seconds = Gauge(
            "sandman_session_idle_seconds",
            "How long each session has been idle (no connection and compute below threshold); "
            "0 while something keeps it",
            ["session"],
            registry=r,
        )
        for reason in ("idle", "ttl_expired", "session_deleted"):
            self.sessions_ended.labels(reason)
        self.queue_length = Gauge(
            "sandman_queue_length", "Requests on the waiting list", registry=r
        )
        self.queue_wait_seconds = Histogram(
            "sandman_queue_wait_seconds",
            "Time a request waited on the waiting list before its session was reserved",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.quota_refusals = Counter(
            "sandman_quota_refusals", "Requests refused by a GPU-hour budget", registry=r
        )
        for reason in CloseReason:
            self.connections_ended.labels(reason.value)
            self.connections_before_kex.labels(reason.value)
        for direction in ("up", "down"):
            self.bytes_relayed.labels(direction)

    def connection_ended(self, record: ConnectionRecord) -> None:
        assert record.reason is not None
        self.connections_ended.labels(record.reason.value).inc()
        self.bytes_relayed.labels("up").inc(record.bytes_up)
        self.bytes_relayed.labels("down").inc(record.bytes_down)

    def render(self) -> bytes:
        return generate_latest(self.registry)
