"""The GPU seam of the orchestrator: picks, releases and describes a session's GPU.

Wraps a :class:`~gateway.gpu.base.GpuBackend` and the pure rules of
:mod:`gateway.core.gpu_select`. The database holds which UUIDs are allocated (on the
session row, committed with it), so this object keeps no allocation state; the caller
holds one lock from :meth:`GpuAllocator.allocate` until the row is stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from gateway.core.gpu_select import (
    CreateInstance,
    NoGpu,
    UseDevice,
    available_instances,
    default_profile_problem,
    select_gpu,
)
from gateway.errors import GpuError, NoGpuAvailable
from gateway.gpu import create_on_first
from gateway.gpu.base import GpuBackend
from gateway.gpu.none import NoneBackend
from gateway.models import CreateRequest, Session

log = logging.getLogger(__name__)

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class Allocation:
    uuid: str | None = None
    profile: str | None = None  # a MIG profile name, "full" for a whole GPU
    created: bool = False  # a MIG instance made for this session, destroyed with it


class GpuAllocator:
    def __init__(self, backend: GpuBackend, *, default_profile: str | None, dynamic: bool) -> None:
        """``default_profile`` None hands out any free MIG instance to requests naming none."""
        self.backend = backend
        self._default_profile = default_profile
        self._dynamic = dynamic

    @property
    def needs_device_request(self) -> bool:
        return self.backend.needs_device_request

    async def check_default_profile(self) -> None:
        """At start-up: refuse a default profile that no MIG GPU of this host offers.

        Raises:
            GpuError: it is not offered; the log message names the valid profiles.
        """
        problem = default_profile_problem(
            self._default_profile, await self.backend.inventory(), await self.backend.profiles()
        )
        if problem is not None:
            raise GpuError("the default MIG profile does not exist here", log_message=problem)

    async def reclaim(self, held: set[str]) -> None:
        """Destroy MIG instances this gateway created that no session holds (``held``:
        every allocated UUID); failures are logged and retried at the next call."""
        await self.backend.reclaim(held)

    async def unhealthy(self) -> list[dict[str, Any]]:
        """The GPUs NVML fails on, for ``/healthz``."""
        return [
            {"index": gpu.index, "uuid": gpu.uuid, "error": gpu.error}
            for gpu in await self.backend.inventory()
            if not gpu.healthy
        ]

    async def allocate(self, request: CreateRequest, allocated: set[str]) -> Allocation:
        """Choose (and with ``--mig-dynamic`` create) the session's GPU.

        Raises:
            UnknownMigProfile, GpuInstanceNotFound, GpuInstanceBusy, NoGpuAvailable, GpuError.
        """
        decision = select_gpu(
            mig_profile=request.mig_profile,
            mig_instance_uuid=request.mig_instance_uuid,
            inventory=await self.backend.inventory(),
            profiles=await self.backend.profiles(),
            allocated=allocated,
            default_profile=self._default_profile,
            dynamic=self._dynamic,
            gpu_less=isinstance(self.backend, NoneBackend),
        )
        match decision:
            case NoGpu():
                return Allocation()
            case UseDevice(uuid=uuid, profile=profile):
                return Allocation(uuid=uuid, profile=profile)
            case CreateInstance(gpu_uuids=gpu_uuids, profile=profile, fallback=fallback):
                await self.backend.reclaim(allocated)  # frees what a failed rollback left
                try:
                    device = await create_on_first(self.backend, gpu_uuids, profile)
                except NoGpuAvailable:
                    if fallback is None:
                        raise
                    return Allocation(uuid=fallback.uuid, profile=fallback.profile)
                log.info("created MIG instance %s (%s)", device.uuid, profile)
                return Allocation(uuid=device.uuid, profile=profile, created=True)
        raise AssertionError(f"unhandled GPU decision {decision!r}")

    async def release(self, allocation: Allocation) -> None:
        """Give the GPU back; a MIG instance created for the session is destroyed."""
        if allocation.created and allocation.uuid:
            await self.backend.destroy_instance(allocation.uuid)
            log.info("destroyed MIG instance %s", allocation.uuid)

    async def release_session(self, session: Session) -> None:
        await self.release(
            Allocation(
                uuid=session.gpu_uuid, profile=session.mig_profile, created=session.gpu_created
            )
        )

    @staticmethod
    def container_env(gpu_uuid: str | None) -> dict[str, str]:
        """Environment that pins the NVIDIA runtime to exactly this GPU (or none)."""
        return {
            "NVIDIA_VISIBLE_DEVICES": gpu_uuid or "void",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        }

    async def gpus_view(self, allocated: set[str]) -> list[dict[str, Any]]:
        """``GET /gpus``: every GPU, with its MIG instances and whether each is allocated."""
        return [
            {
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
                    }
                    for device in gpu.mig_devices
                ],
            }
            for gpu in await self.backend.inventory()
        ]

    async def profiles_view(self) -> list[dict[str, Any]]:
        """``GET /gpus/profiles``: the MIG profiles of the GPU models present."""
        return [
            {
                "name": p.name,
                "compute_slices": p.compute_slices,
                "memory_slices": p.memory_slices,
                "memory_size": p.memory_bytes,
                "max_instances": p.max_instances,
                "gpu_name": p.gpu_name,
                "description": f"{p.compute_slices}/7 GPU, {p.memory_bytes / GIB:.0f}GB Memory",
            }
            for p in await self.backend.profiles()
        ]

    async def available_view(self, allocated: set[str]) -> list[dict[str, Any]]:
        """``GET /gpus/available``: free MIG instances, then free whole GPUs (``full``)."""
        free = available_instances(
            await self.backend.inventory(), await self.backend.profiles(), allocated
        )
        return [
            {
                "uuid": item.uuid,
                "parent_gpu": item.parent_gpu,
                "profile": item.profile,
                "memory": item.memory,
                "compute_slices": item.compute_slices,
                "memory_slices": item.memory_slices,
            }
            for item in free
        ]
