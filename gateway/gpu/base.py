"""What every GPU backend offers: inventory, MIG profiles, create, destroy and reclaim.

The value types in :mod:`gateway.core.gpu_types` are the only GPU types the rest of the
gateway sees; NVML, the simulator and the GPU-less backend all return them.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from gateway.core.gpu_types import GpuInfo, Leftover, MigDevice, MigProfile
from gateway.core.idle import Reading


class GpuBackend(Protocol):
    """A source of GPUs. Implementations: NVML, simulated topology, none."""

    #: whether containers need a Docker DeviceRequest (driver "nvidia") for a GPU
    needs_device_request: bool

    async def inventory(self) -> list[GpuInfo]:
        """Every GPU with its current MIG devices."""
        ...

    async def health_inventory(self) -> list[GpuInfo]:
        """The inventory ``/healthz`` judges by; may be the last one read while MIG
        instances are being created or destroyed."""
        ...

    async def profiles(self) -> list[MigProfile]:
        """The MIG profiles of the GPU models present (deduplicated by model and name)."""
        ...

    async def create_instance(self, gpu_uuid: str, profile: str) -> MigDevice:
        """Create a GPU instance and one compute instance of ``profile`` on that GPU.

        Raises:
            NoGpuAvailable: no free placement or capacity left on it.
            UnknownMigProfile: the GPU's model has no such profile.
            GpuError: NVML refused (e.g. NoPermission).
        """
        ...

    async def destroy_instance(self, mig_uuid: str) -> None:
        """Destroy a MIG device this gateway created; already gone is success.

        Raises:
            GpuInstanceInUse: another process holds it; it is kept in :meth:`to_destroy`
                and :meth:`destroy_released` retries it.
            GpuError: NVML refused otherwise.
        """
        ...

    async def destroy_released(self) -> None:
        """Retry what :meth:`to_destroy` lists; failures are logged, never raised."""
        ...

    def to_destroy(self) -> list[Leftover]:
        """Instances released while a host process held them: kept to destroy, never
        handed out."""
        ...

    async def reclaim(self, held: Collection[str]) -> None:
        """At start-up: destroy what this gateway created that no session holds.

        ``held`` is every GPU/MIG UUID the database allocates to a session. What cannot
        be destroyed now is logged and tried again later, never raised.
        """
        ...

    async def utilization(self, uuid: str) -> Reading:
        """The utilisation of a GPU or MIG device (for idle reclaim): a percentage, or
        None with whether compute processes run on it where the device reports none.

        Raises:
            GpuError: the device could not be read.
        """
        ...

    async def close(self) -> None: ...


class NothingLeftBehind:
    """The reclaim half of :class:`GpuBackend` for backends that never leave an instance
    half destroyed (no GPUs, a simulator, an NVML that did not start): nothing to reclaim,
    retry or close."""

    async def reclaim(self, held: Collection[str]) -> None:
        return None

    async def destroy_released(self) -> None:
        return None

    def to_destroy(self) -> list[Leftover]:
        return []

    async def close(self) -> None:
        return None
