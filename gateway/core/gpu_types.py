"""The GPU value types: what a backend reports about GPUs, MIG devices and MIG profiles.

Plain frozen dataclasses, so the pure selection and placement rules in :mod:`gateway.core`
can take them without importing any backend.
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True, slots=True)
class Leftover:
    """A MIG instance whose session ended while a host process (a monitoring daemon, say)
    held it: kept to destroy, retried at every sweep, never handed out."""

    mig_uuid: str
    gpu_uuid: str
    gi_id: int | None
