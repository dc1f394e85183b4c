"""SSH relay: one TCP listener per session, each connection piped into the container's sshd
(by the kernel with splice on Linux, :mod:`~gateway.relay.splice`; asyncio streams elsewhere);
an observer (the audit trail, :mod:`gateway.audit`) is told of every connection."""

from gateway.relay.connection import ConnectionObserver, RelayLimits
from gateway.relay.listener import SessionListener
from gateway.relay.splice import PipePool

__all__ = ["ConnectionObserver", "PipePool", "RelayLimits", "SessionListener"]
