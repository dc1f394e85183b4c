"""JSON shapes of the API responses, built from models. Timestamps become RFC 3339 ``Z``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.budgets import Usage
from gateway.config import Config
from gateway.core.gpu_select import AvailableInstance
from gateway.core.gpu_types import GpuInfo, Leftover, MigProfile
from gateway.core.ssh import ssh_command
from gateway.core.ttl import ttl_minutes_view
from gateway.models import CreatedSession, QueuedRequest, Session, rfc3339
from gateway.runtime.base import NodeInfo
from gateway.ssh.identity import HostIdentity
from gateway.waiting import Queued


def ssh_access(session: Session, config: Config, identity: HostIdentity) -> dict[str, Any]:
    """How to reach the session and verify its host: the fingerprint of the user's (stable)
    host key, the known_hosts line trusting every session, and the command to paste."""
    return {
        "ssh_host_key_fingerprint": identity.fingerprint(session.user_id),
        "ssh_known_hosts": identity.known_hosts_line,
        "ssh_command": ssh_command(session.user_id, config.public_host, session.ssh_port),
    }


def session_view(
    session: Session,
    active_connections: int,
    config: Config,
    identity: HostIdentity,
    *,
    node: str | None = None,
) -> dict[str, Any]:
    """``node``: where the session runs (Swarm), None on this host."""
    return {
        "id": session.id,
        "user_id": session.user_id,
        "container_id": session.container_id,
        "container_ip": session.container_ip,
        "ssh_port": session.ssh_port,
        "gpu_uuid": session.gpu_uuid,
        "mig_profile": session.mig_profile,
        "ttl_minutes": ttl_minutes_view(session.ttl_seconds),
        "ttl_seconds": session.ttl_seconds,
        "state": session.state.value,
        "created_at": rfc3339(session.created_at),
        "expires_at": rfc3339(session.expires_at),
        "active_connections": active_connections,
        "node": node,
        "cpu_limit": session.cpu_limit,
        "memory_limit": session.memory_limit,
        "metadata": {
            "image": session.image,
            "workspace": session.workspace,
            "ssh_port": str(session.ssh_port),
        },
        **ssh_access(session, config, identity),
    }


def created_view(created: CreatedSession, config: Config, identity: HostIdentity) -> dict[str, Any]:
    session, creds = created.session, created.credentials
    return {
        "session_id": session.id,
        "container_id": session.container_id,
        "ssh_user": session.user_id,
        "ssh_host": config.public_host,
        "ssh_port": session.ssh_port,
        "ssh_private_key": creds.private_key,  # None when the caller brought keys
        "ssh_password": creds.password if config.ssh_password_auth else None,
        "gpu_uuid": session.gpu_uuid,
        "mig_profile": session.mig_profile,
        "created_at": rfc3339(session.created_at),
        "expires_at": rfc3339(session.expires_at),
        "cpu_limit": session.cpu_limit,
        "memory_limit": session.memory_limit,
        "ttl_seconds": session.ttl_seconds,
        "ttl_capped": created.ttl_capped,
        "ttl_capped_by": "gpu_hours_per_week" if created.ttl_capped else None,
        **ssh_access(session, config, identity),
    }


def queued_view(
    queued: QueuedRequest, position: int, config: Config, identity: HostIdentity
) -> dict[str, Any]:
    """A request on the waiting list (``GET /sessions/{id}``, ``GET /queue``): no port or
    GPU yet; ``queue_position`` 1 starts next."""
    request = queued.request
    return {
        "id": queued.id,
        "user_id": request.user_id,
        "state": "queued",
        "queue_position": position,
        "submitted_at": rfc3339(queued.submitted_at),
        "queue_expires_at": rfc3339(queued.expires_at),
        "ttl_minutes": ttl_minutes_view(request.ttl_seconds),
        "ttl_seconds": request.ttl_seconds,
        "mig_profile": request.mig_profile,
        "mig_instance_uuid": request.mig_instance_uuid,
        "ssh_port": None,
        "gpu_uuid": None,
        "ssh_user": request.user_id,
        "ssh_host": config.public_host,
        "ssh_host_key_fingerprint": identity.fingerprint(request.user_id),
        "ssh_known_hosts": identity.known_hosts_line,
    }


def enqueued_view(queued: Queued, config: Config, identity: HostIdentity) -> dict[str, Any]:
    """The 202 of a queued POST: the waiting request and its credentials, shown once; they
    work when it starts (then ``GET /sessions/{id}`` gives the port)."""
    return {
        **queued_view(queued.queued, queued.position, config, identity),
        "session_id": queued.queued.id,
        "ssh_private_key": queued.private_key,
        "ssh_password": queued.password if config.ssh_password_auth else None,
    }


def usage_view(usage: Usage) -> dict[str, Any]:
    """``GET /users/{user_id}/usage``: GPU-hours of the rolling 7-day window."""
    return {
        "user_id": usage.user_id,
        "gpu_hours_used": round(usage.used, 6),
        "gpu_hours_budget": usage.budget,
        "budget_source": "user" if usage.own else "default",
        "window_start": rfc3339(usage.window_start),
        "window_end": rfc3339(usage.window_end),
        "next_available_at": None
        if usage.next_available_at is None
        else rfc3339(usage.next_available_at),
    }


GIB = 1024**3


MIG_CHANGE_NOTE = (
    "the MIG mode change waits for a GPU reset: stop the gateway and any DCGM or monitoring "
    "daemon (they hold the GPU), reset the GPU (nvidia-smi -r) or reboot, start them again"
)


def gpu_view(gpu: GpuInfo, allocated: set[str], to_destroy: Sequence[Leftover]) -> dict[str, Any]:
    """One entry of ``GET /gpus``: a GPU, its MIG instances, what is allocated, and what
    is kept to destroy (released while a host process held it)."""
    doomed = [t for t in to_destroy if t.gpu_uuid == gpu.uuid]
    doomed_uuids = {t.mig_uuid for t in doomed}
    return {
        "uuid": gpu.uuid,
        "index": gpu.index,
        "name": gpu.name,
        "memory_total": gpu.memory_total,
        "memory_free": gpu.memory_free,
        "memory_used": gpu.memory_used,
        "utilization": gpu.utilization,
        "temperature": gpu.temperature,
        "power_usage": gpu.power_usage,
        "power_limit": gpu.power_limit,
        "mig_enabled": gpu.mig_enabled,
        "mig_pending": gpu.mig_pending,
        "mig_change": MIG_CHANGE_NOTE if gpu.mig_pending != gpu.mig_enabled else None,
        "allocated": gpu.uuid in allocated,
        "healthy": gpu.healthy,
        "error": gpu.error,
        "mig_instances": [
            {
                "uuid": device.uuid,
                "profile": device.profile,
                "memory": device.memory_bytes,
                "memory_used": device.memory_used,
                "gpu_instance_id": device.gi_id,
                "compute_instance_id": device.ci_id,
                "split": device.split,
                "allocated": device.uuid in allocated,
                "to_destroy": device.uuid in doomed_uuids,
            }
            for device in gpu.mig_devices
        ],
        "to_destroy": [{"uuid": t.mig_uuid, "gpu_instance_id": t.gi_id} for t in doomed],
    }


def unhealthy_gpu_view(gpu: GpuInfo) -> dict[str, Any]:
    """A GPU NVML fails on, as ``/healthz`` lists it."""
    return {"index": gpu.index, "uuid": gpu.uuid, "error": gpu.error}


def profile_view(profile: MigProfile) -> dict[str, Any]:
    """One entry of ``GET /gpus/profiles``."""
    return {
        "name": profile.name,
        "compute_slices": profile.compute_slices,
        "memory_slices": profile.memory_slices,
        "memory_size": profile.memory_bytes,
        "max_instances": profile.max_instances,
        "gpu_name": profile.gpu_name,
        "description": (
            f"{profile.compute_slices}/7 GPU, {profile.memory_bytes / GIB:.0f}GB Memory"
        ),
    }


def available_view(item: AvailableInstance) -> dict[str, Any]:
    """One entry of ``GET /gpus/available``: a free MIG instance or whole GPU."""
    return {
        "uuid": item.uuid,
        "parent_gpu": item.parent_gpu,
        "profile": item.profile,
        "memory": item.memory,
        "compute_slices": item.compute_slices,
        "memory_slices": item.memory_slices,
    }


def node_view(node: NodeInfo) -> dict[str, Any]:
    return {
        "id": node.id,
        "hostname": node.hostname,
        "role": node.role,
        "state": node.state,
        "availability": node.availability,
        "address": node.address,
        "cpus": node.cpus,
        "memory": node.memory,
        "engine_version": node.engine_version,
        "gateway": node.gateway,
        "resources": [{"kind": kind, "value": value} for kind, value in node.resources],
    }
