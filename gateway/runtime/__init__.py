"""Container runtime: the :class:`Runtime` protocol and its Docker implementation."""

from gateway.runtime.base import ContainerInfo, ContainerSpec, Runtime

__all__ = ["ContainerInfo", "ContainerSpec", "Runtime"]
