"""SSH relay: one TCP listener per session, each connection piped into the container's sshd."""

from gateway.relay.listener import SessionListener, open_listener

__all__ = ["SessionListener", "open_listener"]
