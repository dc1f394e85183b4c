"""Check inside a started container that it sees exactly its GPU.

Toolkit settings can defeat ``NVIDIA_VISIBLE_DEVICES`` and the DeviceRequest
(``accept-nvidia-visible-devices-as-volume-mounts = true``, or
``accept-nvidia-visible-devices-envvar-when-unprivileged = false`` with an image that
asks for ``all``), and on a Swarm node the toolkit must honour the slice the engine
assigned, so the create path asks the container itself: ``nvidia-smi -L``, which the
toolkit mounts with the ``utility`` driver capability (through ``docker exec`` with plain
Docker, through the control channel on any Swarm node: :meth:`Runtime.visible_gpus`).
"""

from __future__ import annotations

import logging

from gateway.core.gpu_pin import pin_problem
from gateway.errors import ContainerStartFailed
from gateway.runtime.base import Runtime

log = logging.getLogger(__name__)


async def seen_problem(runtime: Runtime, container_id: str, gpu_uuid: str) -> str | None:
    """What is wrong with the devices the container sees (None: exactly ``gpu_uuid``); a
    problem is logged with the ``nvidia-smi -L`` output it was read from.

    Raises:
        ContainerStartFailed: ``nvidia-smi -L`` fails, or the container cannot be asked.
        DockerUnavailable: the engine is unreachable.
    """
    result = await runtime.visible_gpus(container_id)
    if result.exit_code != 0:
        raise ContainerStartFailed(
            "could not check which GPU the session container sees",
            log_message=f"container {container_id[:12]}: `nvidia-smi -L` exited "
            f"{result.exit_code}: {result.output.strip()}",
        )
    problem = pin_problem(gpu_uuid, result.output)
    if problem is not None:
        log.warning("container %s: %s; `nvidia-smi -L`:\n%s",
                    container_id[:12], problem, result.output.strip())  # fmt: skip
    return problem


async def verify_pin(runtime: Runtime, container_id: str, gpu_uuid: str) -> None:
    """Return if the container sees exactly ``gpu_uuid``.

    Raises:
        ContainerStartFailed: it sees other or more devices, ``nvidia-smi -L`` fails, or
            the container cannot be asked.
        DockerUnavailable: the engine is unreachable.
    """
    problem = await seen_problem(runtime, container_id, gpu_uuid)
    if problem is not None:
        raise ContainerStartFailed(
            f"GPU isolation failed: {problem}; the NVIDIA Container Toolkit's settings "
            "override the gateway's pin (see docs/gpu-hosts.md)",
            log_message=f"container {container_id[:12]}: {problem}",
        )
