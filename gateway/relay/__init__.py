"""SSH relay: one TCP listener per session, each connection piped into the container's sshd,
with the audit trail of every connection."""

from gateway.relay.connection import ConnectionObserver, RelayLimits
from gateway.relay.listener import SessionListener

__all__ = ["ConnectionObserver", "RelayLimits", "SessionListener"]
