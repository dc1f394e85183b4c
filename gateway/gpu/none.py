"""The GPU-less backend (``--gpus none``, or ``auto`` without NVML): no GPUs, no profiles."""

from __future__ import annotations

from gateway.core.gpu_types import GpuInfo, MigDevice, MigProfile
from gateway.core.idle import Reading
from gateway.errors import NoGpuAvailable
from gateway.gpu.base import NothingLeftBehind


class NoneBackend(NothingLeftBehind):
    """A host without GPUs: sessions run with ``NVIDIA_VISIBLE_DEVICES=void``."""

    needs_device_request = False

    async def inventory(self) -> list[GpuInfo]:
        return []

    async def health_inventory(self) -> list[GpuInfo]:
        return []

    async def profiles(self) -> list[MigProfile]:
        return []

    async def create_instance(self, gpu_uuid: str, profile: str) -> MigDevice:
        """Raises:
        NoGpuAvailable: always; this host has no GPUs.
        """
        raise NoGpuAvailable("this host has no GPUs")

    async def destroy_instance(self, mig_uuid: str) -> None:
        """Nothing exists here, so there is nothing to destroy."""

    async def utilization(self, uuid: str) -> Reading:
        """A GPU this host does not have (a slice Swarm placed on another node; a GPU-less
        session is judged by its CPU and never asks) is unknown, read as running work:
        unknown is not idle, unless ``--idle-mig-unknown idle``."""
        return Reading(None, processes=True)
