"""A node's GPU slices as Swarm node generic resources (pure).

Each healthy MIG device is one named resource of its profile's kind
(``MIG-1g.10gb=MIG-<uuid>``), each healthy whole GPU without MIG one ``NVIDIA-GPU=GPU-<uuid>``,
so a service reserving one resource of a kind lands on a node with that slice free (and
learns its UUID from ``DOCKER_RESOURCE_<KIND>``). Split MIG devices (sharing their GPU
instance's memory) are never offered, as the gateway never hands them out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gateway.core.gpu_types import GpuInfo

#: The ``daemon.json`` key that lists a node's generic resources.
DAEMON_KEY = "node-generic-resources"
#: The kind of a whole GPU, and the prefix of a MIG profile's kind.
WHOLE_GPU_KIND = "NVIDIA-GPU"
MIG_KIND_PREFIX = "MIG-"


def slice_kind(profile: str) -> str:
    """The generic resource kind offering ``profile``'s slices (``full``: whole GPUs)."""
    return WHOLE_GPU_KIND if profile == "full" else f"{MIG_KIND_PREFIX}{profile}"


def node_generic_resources(inventory: Sequence[GpuInfo]) -> list[str]:
    """``KIND=UUID`` for every slice this node can offer, in GPU index order."""
    offered = []
    for gpu in sorted(inventory, key=lambda g: g.index):
        if not gpu.healthy or gpu.uuid is None:
            continue
        if not gpu.mig_enabled:
            offered.append(f"{WHOLE_GPU_KIND}={gpu.uuid}")
            continue
        for device in sorted(gpu.mig_devices, key=lambda d: (d.gi_id, d.ci_id)):
            if not device.split:
                offered.append(f"{slice_kind(device.profile)}={device.uuid}")
    return offered


def with_node_resources(daemon: Mapping[str, Any], offered: Sequence[str]) -> dict[str, Any]:
    """``daemon`` (a ``daemon.json``) with its GPU slices replaced by ``offered``; its
    other generic resources and settings kept."""
    ours = (WHOLE_GPU_KIND + "=", MIG_KIND_PREFIX)
    kept = [r for r in daemon.get(DAEMON_KEY) or [] if not str(r).startswith(ours)]
    merged = {**daemon, DAEMON_KEY: [*kept, *offered]}
    if not merged[DAEMON_KEY]:
        del merged[DAEMON_KEY]
    return merged
