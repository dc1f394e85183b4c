"""SQLite persistence: schema migrations and the session/user store."""

from gateway.store.db import Store

__all__ = ["Store"]
