"""Typed errors: each fixes a stable API ``code`` and HTTP status.

``message`` is for the person calling the API; ``log_message`` (defaulting to the
same text) is what goes to the gateway's log and may carry internal detail.
Adapters translate library errors into these with ``raise ... from exc``; the API
middleware renders them as ``{"error": message, "code": code}``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the API reports on purpose."""

    code = "internal"
    status = 500

    def __init__(
        self,
        message: str,
        *,
        log_message: str | None = None,
        details: dict[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.log_message = log_message or message
        self.details = details or {}  # further fields of the error body


class InvalidRequest(GatewayError):
    code = "invalid_request"
    status = 400


class InvalidUserId(GatewayError):
    code = "invalid_user_id"
    status = 400


class InvalidTtl(GatewayError):
    code = "invalid_ttl"
    status = 400


class InvalidIdleHold(GatewayError):
    code = "invalid_idle_hold"
    status = 400


class InvalidPublicKey(GatewayError):
    code = "invalid_public_key"
    status = 400


class InvalidLimit(GatewayError):
    code = "invalid_limit"
    status = 400


class UnknownMigProfile(GatewayError):
    code = "unknown_mig_profile"
    status = 400


class ImageNotAllowed(GatewayError):
    code = "image_not_allowed"
    status = 400


class Unauthorized(GatewayError):
    code = "unauthorized"
    status = 401


class SessionNotFound(GatewayError):
    code = "session_not_found"
    status = 404


class GpuInstanceNotFound(GatewayError):
    code = "gpu_instance_not_found"
    status = 404


class QuotaExceeded(GatewayError):
    """The user's GPU-hour budget has less than a minute of this request left; the body
    names ``gpu_hours_used``, ``gpu_hours_budget`` and ``next_available_at``."""

    code = "quota_exceeded"
    status = 403


class TooManyQueued(GatewayError):
    """The user already has ``--max-queued-per-user`` requests waiting."""

    code = "too_many_queued"
    status = 409


class SessionExists(GatewayError):
    code = "session_exists"
    status = 409


class SessionDeleted(GatewayError):
    """The session was ended (DELETE, sweep) while its create was still starting it."""

    code = "session_deleted"
    status = 409


class SessionEnding(GatewayError):
    """The session is ending (DELETE, expiry, sweep): its TTL can no longer change."""

    code = "session_ending"
    status = 409


class GpuInstanceBusy(GatewayError):
    code = "gpu_instance_busy"
    status = 409


class GpuInstanceInUse(GatewayError):
    """NVML refused to destroy a MIG instance that another process on the host holds.

    The session's container is already gone; its row stays so that the sweep retries
    the release until the holder lets go.
    """

    code = "gpu_instance_in_use"
    status = 409


class RequestTimeout(GatewayError):
    """The client did not send its whole body within ``--http-timeout`` (a slow body)."""

    code = "request_timeout"
    status = 408


class BodyTooLarge(GatewayError):
    code = "body_too_large"
    status = 413


class NoGpuAvailable(GatewayError):
    code = "no_gpu_available"
    status = 503


class NoCapacity(GatewayError):
    """No node can run the session now (``--runtime swarm``): the engine's reason is in the
    message."""

    code = "no_capacity"
    status = 503


class NoPortAvailable(GatewayError):
    code = "no_port_available"
    status = 503


class GatewayStopping(GatewayError):
    """The gateway began shutting down while this create was starting (it was rolled back)."""

    code = "gateway_stopping"
    status = 503


class DockerUnavailable(GatewayError):
    code = "docker_unavailable"
    status = 503


class GpuError(GatewayError):
    """NVML refused or failed an operation (permission, driver state, ...)."""

    code = "gpu_error"
    status = 503


class ContainerStartFailed(GatewayError):
    """The session container did not come up (image, sshd or timeout)."""

    code = "container_start_failed"
    status = 502


class DatabaseTooNew(GatewayError):
    """At start-up: the database was written by a newer gateway (its schema is unknown)."""

    code = "database_too_new"


class HostIdentityDamaged(GatewayError):
    """At start-up: the SSH host CA or host-key seed in the state directory is unusable
    (truncated by a crash, edited by hand): the gateway refuses to serve with it."""

    code = "host_identity_damaged"


class ApiTokenUnavailable(GatewayError):
    """At start-up: ``--api-token-file`` names a file that is missing, unreadable or empty."""

    code = "api_token_unavailable"
