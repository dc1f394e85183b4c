"""The GPU seam of the orchestrator: picks, releases and describes a session's GPU.

Wraps a :class:`~gateway.gpu.base.GpuBackend`; the database holds which UUIDs are
allocated (on the session row), so this object keeps no allocation state itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.gpu.base import GpuBackend
from gateway.models import CreateRequest, Session


@dataclass(frozen=True, slots=True)
class Allocation:
    uuid: str | None = None
    profile: str | None = None
    created: bool = False  # a MIG instance made for this session, destroyed with it


class GpuAllocator:
    def __init__(self, backend: GpuBackend, *, default_profile: str, dynamic: bool) -> None:
        self.backend = backend
        self._default_profile = default_profile
        self._dynamic = dynamic

    @property
    def needs_device_request(self) -> bool:
        return self.backend.needs_device_request

    async def allocate(self, request: CreateRequest, allocated: set[str]) -> Allocation:
        return Allocation()

    async def release(self, allocation: Allocation) -> None:
        if allocation.created and allocation.uuid:
            await self.backend.destroy_instance(allocation.uuid)

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

    async def gpus_view(self, allocated: set[str]) -> list[dict[str, object]]:
        return []

    async def profiles_view(self) -> list[dict[str, object]]:
        return []

    async def available_view(self, allocated: set[str]) -> list[dict[str, object]]:
        return []
