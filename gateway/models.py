"""The gateway's records: frozen dataclasses passed between store, orchestrator and API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum


class SessionState(StrEnum):
    STARTING = "starting"  # row reserved, container not yet answering SSH
    RUNNING = "running"


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


@dataclass(frozen=True, slots=True)
class CreateRequest:
    """A validated POST /sessions body."""

    user_id: str
    ttl_seconds: int
    image: str
    mig_profile: str | None = None
    mig_instance_uuid: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """Per-session login secrets. Only the public parts ever reach the container or disk."""

    private_key: str  # OpenSSH PEM, returned once
    public_key: str  # authorized_keys line
    password: str  # returned once
    password_hash: str  # crypt(3) hash given to the container


@dataclass(frozen=True, slots=True)
class CreatedSession:
    session: Session
    credentials: Credentials


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix, second precision."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
