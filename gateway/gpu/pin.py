"""Check inside a started container that the NVIDIA runtime exposed exactly its GPU.

Toolkit settings can defeat ``NVIDIA_VISIBLE_DEVICES`` and the DeviceRequest
(``accept-nvidia-visible-devices-as-volume-mounts = true``, or
``accept-nvidia-visible-devices-envvar-when-unprivileged = false`` with an image that
asks for ``all``), so the create path asks the container itself: ``nvidia-smi -L``,
which the toolkit mounts with the ``utility`` driver capability.
"""

from __future__ import annotations

from gateway.core.gpu_pin import pin_problem
from gateway.errors import ContainerStartFailed
from gateway.runtime.base import Runtime

LIST_COMMAND = ("nvidia-smi", "-L")


async def verify_pin(runtime: Runtime, container_id: str, gpu_uuid: str) -> None:
    """Return if the container sees exactly ``gpu_uuid``.

    Raises:
        ContainerStartFailed: it sees other or more devices, or ``nvidia-smi -L`` fails.
        DockerUnavailable: the engine is unreachable.
    """
    result = await runtime.run(container_id, list(LIST_COMMAND), user="0:0")
    if result.exit_code != 0:
        raise ContainerStartFailed(
            "could not check which GPU the session container sees",
            log_message=f"container {container_id[:12]}: `nvidia-smi -L` exited "
            f"{result.exit_code}: {result.output.strip()}",
        )
    problem = pin_problem(gpu_uuid, result.output)
    if problem is not None:
        raise ContainerStartFailed(
            f"GPU isolation failed: {problem}; the NVIDIA Container Toolkit's settings "
            "override the gateway's pin (see docs/gpu-hosts.md)",
            log_message=f"container {container_id[:12]}: {problem}; `nvidia-smi -L`:\n"
            f"{result.output.strip()}",
        )
