"""How the Docker daemon hands a GPU to a container, decided from ``docker info`` (pure).

Two paths exist for a ``DeviceRequest`` with driver ``nvidia``:

- the NVIDIA Container Toolkit's prestart hook (every Docker before 29.2, and 29.2+ without
  CDI): it resolves ``DeviceIDs`` by asking the driver when the container starts, so a MIG
  instance made a second earlier is found;
- CDI: Docker 29.2 routes such requests through CDI whenever CDI is enabled and the
  toolkit's ``nvidia-cdi-hook`` is installed (moby#50228). The daemon then resolves each
  device from the CDI specs on disk (``/etc/cdi``, ``/var/run/cdi``), which the toolkit
  writes at boot or driver changes but not when MIG instances change
  (nvidia-container-toolkit#1828): an instance made after the spec was written, which is
  every ``--mig-dynamic`` instance, cannot be resolved and the container fails to start.

On the CDI path, where the ``nvidia`` runtime is registered with the daemon, the gateway
asks for that runtime instead (``HostConfig.Runtime``), with ``NVIDIA_VISIBLE_DEVICES`` set
to the device's UUID: the runtime resolves the device when the container is created (in
its legacy and its just-in-time CDI mode alike), so late instances work. Without that
runtime the request stays a ``DeviceRequest`` and :attr:`GpuPath.warning` says what fails
and how to fix it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEVICE_REQUEST = "device-request"  # HostConfig.DeviceRequests, driver "nvidia"
NVIDIA_RUNTIME = "nvidia-runtime"  # HostConfig.Runtime "nvidia" + NVIDIA_VISIBLE_DEVICES
#: the first Docker Engine that routes driver "nvidia" requests through CDI
CDI_ROUTING_SINCE = (29, 2)
_NVIDIA_CDI_KIND = "nvidia.com/gpu="


@dataclass(frozen=True, slots=True)
class GpuPath:
    """What the daemon does with a GPU request, and how the gateway asks for one."""

    docker_version: str | None
    cdi_spec_dirs: tuple[str, ...]  # empty: CDI disabled in the daemon
    cdi_gpu_devices: tuple[str, ...]  # nvidia.com/gpu=... devices its CDI specs list
    nvidia_runtime: bool  # the "nvidia" runtime is registered with the daemon
    through_cdi: bool  # driver "nvidia" DeviceRequests are resolved from CDI specs
    delivery: str  # DEVICE_REQUEST or NVIDIA_RUNTIME
    warning: str | None = None

    def view(self) -> dict[str, Any]:
        """As ``/healthz`` and ``sandman gpus --probe`` show it."""
        return {
            "docker_version": self.docker_version,
            "cdi_spec_dirs": list(self.cdi_spec_dirs),
            "cdi_gpu_devices": len(self.cdi_gpu_devices),
            "nvidia_runtime": self.nvidia_runtime,
            "through_cdi": self.through_cdi,
            "delivery": self.delivery,
            "warning": self.warning,
        }


def engine_version(version: str | None) -> tuple[int, int] | None:
    """``"29.2.0"`` → ``(29, 2)``; None for anything else."""
    match = re.match(r"^v?(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2])) if match else None


def gpu_path(info: Mapping[str, Any]) -> GpuPath:
    """Decide from the daemon's ``/info`` answer (``docker info``)."""
    version = info.get("ServerVersion")
    spec_dirs = tuple(info.get("CDISpecDirs") or ())
    devices = tuple(
        str(d.get("ID", ""))
        for d in info.get("DiscoveredDevices") or ()
        if d.get("Source") == "cdi" and str(d.get("ID", "")).startswith(_NVIDIA_CDI_KIND)
    )
    nvidia_runtime = "nvidia" in (info.get("Runtimes") or {})
    parsed = engine_version(version)
    through_cdi = parsed is not None and parsed >= CDI_ROUTING_SINCE and bool(spec_dirs)
    delivery = NVIDIA_RUNTIME if through_cdi and nvidia_runtime else DEVICE_REQUEST
    warning = None
    if through_cdi and not nvidia_runtime:
        warning = (
            f"Docker {version} resolves GPU requests from the CDI specs in "
            f"{', '.join(spec_dirs)}, which list only the MIG instances that existed when "
            "they were written: instances made later (every --mig-dynamic one) fail to "
            "start. Register the nvidia runtime (nvidia-ctk runtime configure "
            "--runtime=docker, then restart Docker), or regenerate the spec after making "
            "instances (nvidia-ctk cdi generate --output=/var/run/cdi/nvidia.yaml)"
        )
    return GpuPath(version, spec_dirs, devices, nvidia_runtime, through_cdi, delivery, warning)


def gpu_host_config(delivery: str, gpu_uuid: str) -> dict[str, Any]:
    """The ``HostConfig`` fields that hand ``gpu_uuid`` (and nothing else) to a container.

    Either way the container's environment also pins ``NVIDIA_VISIBLE_DEVICES`` to it.
    """
    if delivery == NVIDIA_RUNTIME:
        return {"Runtime": "nvidia"}
    return {
        "DeviceRequests": [{"Driver": "nvidia", "DeviceIDs": [gpu_uuid], "Capabilities": [["gpu"]]}]
    }
