"""What every GPU backend offers: inventory, MIG profiles, create, destroy and reclaim.

The dataclasses here are the only GPU types the rest of the gateway sees; NVML,
the simulator and the GPU-less backend all return them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class MigProfile:
    """A GPU instance profile as NVML reports it for one GPU model.

    ``profile_id`` is NVML's ``info.id`` (what create/placement calls take), not the
    ``NVML_GPU_INSTANCE_PROFILE_*`` enum index used to look the profile up.
    """

    name: str  # e.g. "3g.40gb" (NVML's "MIG 3g.40gb" without the prefix)
    profile_id: int
    compute_slices: int
    memory_slices: int
    memory_bytes: int
    max_instances: int
    gpu_name: str  # the model it belongs to, e.g. "NVIDIA A100-SXM4-80GB"


@dataclass(frozen=True, slots=True)
class MigDevice:
    """One existing MIG device (a GPU instance plus one compute instance)."""

    uuid: str  # as NVML returns it: "MIG-<uuid>" or "MIG-GPU-<uuid>/<gi>/<ci>"
    gpu_uuid: str
    profile: str  # e.g. "1g.10gb"; "1c.3g.40gb" for a compute instance of a split GPU instance
    gi_id: int
    ci_id: int
    memory_bytes: int
    memory_used: int | None = None  # bytes in use on this device; None where unknown
    #: its compute instance has only part of its GPU instance's compute slices, so it
    #: shares that GPU instance's memory with the others; never handed out
    split: bool = False


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU. Telemetry NVML withholds or doesn't support is None, never a made-up 0.

    ``error`` is set when NVML failed on this GPU (e.g. GPU is lost): it is unhealthy,
    reported as such, and never handed out; ``uuid`` and ``name`` are None if even
    they could not be read.
    """

    uuid: str | None
    index: int
    name: str | None
    memory_total: int | None = None  # bytes; None in MIG mode without monitor rights
    memory_free: int | None = None
    memory_used: int | None = None
    utilization: int | None = None  # percent; NVML doesn't support it in MIG mode
    temperature: int | None = None  # degrees C
    power_usage: float | None = None  # watts
    power_limit: float | None = None  # watts
    mig_enabled: bool = False
    mig_pending: bool = False
    mig_devices: tuple[MigDevice, ...] = ()
    error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.error is None


class GpuBackend(Protocol):
    """A source of GPUs. Implementations: NVML, simulated topology, none."""

    #: whether containers need a Docker DeviceRequest (driver "nvidia") for a GPU
    needs_device_request: bool

    async def inventory(self) -> list[GpuInfo]:
        """Every GPU with its current MIG devices."""
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
            GpuInstanceInUse: another process holds it; calling again later retries.
            GpuError: NVML refused otherwise.
        """
        ...

    async def reclaim(self, held: Collection[str]) -> None:
        """At start-up: destroy what this gateway created that no session holds.

        ``held`` is every GPU/MIG UUID the database allocates to a session. What cannot
        be destroyed now is logged and tried again later, never raised.
        """
        ...

    async def close(self) -> None: ...
