"""The gateway's records: frozen dataclasses passed between store, orchestrator and API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum


class CloseReason(StrEnum):
    """Why a relayed connection ended (a fixed set; audit records and metrics use it)."""

    CLIENT_CLOSED = "client_closed"
    SERVER_CLOSED = "server_closed"
    TTL_EXPIRED = "ttl_expired"
    SESSION_DELETED = "session_deleted"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    IDLE_TIMEOUT = "idle_timeout"
    PREAUTH_TIMEOUT = "preauth_timeout"
    EVICTED = "evicted"  # made room for a newcomer before its key exchange was done
    CONNECTION_LIMIT = "connection_limit"  # only in records older than the refusal counter
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    ERROR = "error"


class SessionState(StrEnum):
    """A session's persisted lifecycle: starting -> running -> ending -> (row deleted).
    Every transition is written before its side effects."""

    STARTING = "starting"  # row reserved, container not yet answering SSH
    RUNNING = "running"
    ENDING = "ending"  # cleanup begun (``end_reason`` says why); finished by whoever resumes


@dataclass(frozen=True, slots=True)
class User:
    """A user the gateway has seen: a stable uid, and the port last given (sticky)."""

    user_id: str
    uid: int
    ssh_port: int | None = None


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    user_id: str
    uid: int
    ssh_port: int
    image: str
    workspace: str
    ttl_seconds: int
    created_at: datetime
    expires_at: datetime
    state: SessionState = SessionState.STARTING
    container_id: str | None = None
    container_ip: str | None = None
    gpu_uuid: str | None = None
    mig_profile: str | None = None
    gpu_created: bool = False  # a MIG instance this gateway created for the session
    authorized_keys: tuple[str, ...] = ()  # public keys that may log in ("type base64")
    end_reason: str | None = None  # set with state ENDING
    cpu_limit: float | None = None  # CPUs; None: unlimited
    memory_limit: int | None = None  # bytes; None: unlimited
    #: started from the waiting list: ended (``not_claimed``) unless a connection comes by then
    claim_by: datetime | None = None


@dataclass(frozen=True, slots=True)
class SessionIdle:
    """A session's stored idle state (see :mod:`gateway.core.idle`). ``last_connection_at``
    is the last moment a relayed connection was seen open; None: never."""

    session_id: str
    exempt: bool = False
    last_connection_at: datetime | None = None
    no_connection_since: datetime | None = None
    compute_idle_since: datetime | None = None
    utilization: float | None = None
    hold_until: datetime | None = None
    hold_set_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A validated POST /sessions body."""

    user_id: str
    ttl_seconds: int
    image: str
    mig_profile: str | None = None
    mig_instance_uuid: str | None = None
    public_keys: tuple[str, ...] = ()  # the caller's own keys; none: a key pair is generated
    cpu_limit: float | None = None  # CPUs; None: unlimited
    memory_limit: int | None = None  # bytes; None: unlimited
    idle_reclaim: bool = True  # False: exempt from idle reclaim
    wait: bool = False  # queue when nothing fits, instead of a 503


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """A request on the waiting list: what it asked for, until when it waits, and the
    public parts of the credentials its 202 gave (the private key was shown once)."""

    id: str  # becomes the session's id when it starts
    request: CreateRequest
    submitted_at: datetime
    expires_at: datetime  # --queue-timeout after submission
    authorized_keys: tuple[str, ...]
    password_hash: str
    attempts: int = 0  # starts that failed (it went back on the list each time)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Per-session login secrets. Only the public parts ever reach the container or disk."""

    private_key: str | None  # OpenSSH PEM, returned once; None when the caller brought keys
    public_keys: tuple[str, ...]  # "type base64" lines for authorized_keys
    password: str  # returned once
    password_hash: str  # crypt(3) hash given to the container


@dataclass(frozen=True, slots=True)
class CreatedSession:
    session: Session
    credentials: Credentials
    ttl_capped: bool = False  # the TTL was cut to fit the user's GPU-hour budget


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime, *, fraction: bool = False) -> str:
    """RFC 3339 UTC with a ``Z`` suffix; seconds, or milliseconds with ``fraction``."""
    utc = moment.astimezone(UTC)
    if fraction:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class ConnectionRecord:
    """The audit record of one relayed connection; ``ended_at`` is None while it lives."""

    id: str
    session_id: str
    user_id: str
    client_addr: str
    client_port: int
    started_at: datetime
    ended_at: datetime | None = None
    bytes_up: int = 0  # client -> container
    bytes_down: int = 0  # container -> client
    client_banner: str | None = None
    server_banner: str | None = None
    closed_by: str | None = None  # "client", "server" or "gateway"
    reason: CloseReason | None = None

    @property
    def duration(self) -> float | None:
        if self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One line of the audit trail: a connection or session lifecycle event."""

    id: int
    at: datetime
    event: str  # connect, disconnect, session_created, session_deleted, session_expired, ...
    session_id: str | None
    user_id: str | None
    connection_id: str | None
    data: dict[str, object]
