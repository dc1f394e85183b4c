"""Container runtime: the :class:`Runtime` protocol and its Docker and Swarm implementations."""

from gateway.runtime.base import ContainerInfo, ContainerSpec, Runtime


def open_runtime(kind: str) -> Runtime:
    """The runtime ``--runtime`` names: ``docker`` or ``swarm``."""
    if kind == "swarm":
        from gateway.runtime.swarm import SwarmRuntime

        return SwarmRuntime()
    from gateway.runtime.docker import DockerRuntime

    return DockerRuntime()


__all__ = ["ContainerInfo", "ContainerSpec", "Runtime", "open_runtime"]
