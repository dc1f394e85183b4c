"""Container runtime: the :class:`Runtime` protocol and its Docker and Swarm implementations."""

from gateway.config import Config
from gateway.runtime.base import ContainerInfo, ContainerSpec, Runtime


def open_runtime(config: Config) -> Runtime:
    """The runtime ``--runtime`` names: ``docker`` or ``swarm``."""
    if config.runtime == "swarm":
        from gateway.runtime.swarm import SwarmRuntime

        shared = config.workspace_root if config.shared_workspaces else None
        return SwarmRuntime(place_timeout=config.place_timeout, shared_root=shared)
    from gateway.runtime.docker import DockerRuntime

    return DockerRuntime()


__all__ = ["ContainerInfo", "ContainerSpec", "Runtime", "open_runtime"]
