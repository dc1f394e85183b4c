"""What every GPU backend offers: inventory, MIG profiles, create and destroy.

The dataclasses here are the only GPU types the rest of the gateway sees; NVML,
the simulator and the GPU-less backend all return them.
"""

from __future__ import annotations

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
    profile: str  # profile name, e.g. "1g.10gb"
    gi_id: int
    ci_id: int
    memory_bytes: int


@dataclass(frozen=True, slots=True)
class GpuInfo:
    uuid: str
    index: int
    name: str
    memory_total: int  # bytes
    memory_free: int
    memory_used: int
    utilization: int  # percent
    temperature: int  # degrees C
    power_usage: float  # watts
    power_limit: float  # watts
    mig_enabled: bool
    mig_pending: bool
    mig_devices: tuple[MigDevice, ...] = ()


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
        """Destroy a MIG device this gateway created; already gone is success."""
        ...

    async def close(self) -> None: ...
