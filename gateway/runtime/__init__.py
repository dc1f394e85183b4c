"""Container runtime: the :class:`Runtime` protocol and its Docker and Swarm implementations."""

from gateway.config import Config
from gateway.runtime.base import ContainerInfo, ContainerSpec, Runtime
from gateway.ssh.identity import HostIdentity


def open_runtime(config: Config, identity: HostIdentity) -> Runtime:
    """The runtime ``--runtime`` names: ``docker``, or ``swarm`` (which writes into tasks
    on any node through the control channel, with the gateway's key from the state folder).
    """
    if config.runtime == "swarm":
        from gateway.runtime.swarm import SwarmRuntime
        from gateway.ssh.control import ControlChannel

        shared = config.workspace_root if config.shared_workspaces else None
        return SwarmRuntime(
            place_timeout=config.place_timeout,
            shared_root=shared,
            channel=ControlChannel.open(config.state_dir, identity),
        )
    from gateway.runtime.docker import DockerRuntime

    return DockerRuntime()


__all__ = ["ContainerInfo", "ContainerSpec", "Runtime", "open_runtime"]
