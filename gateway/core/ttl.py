"""TTL arithmetic: when a session expires and which sessions are due."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol, TypeVar


class Expiring(Protocol):
    @property
    def expires_at(self) -> datetime: ...


E = TypeVar("E", bound=Expiring)


def expires_at(created_at: datetime, ttl_seconds: int) -> datetime:
    """The instant a session created at ``created_at`` with that TTL ends."""
    return created_at + timedelta(seconds=ttl_seconds)


def is_expired(item: Expiring, now: datetime) -> bool:
    """Expired at exactly ``expires_at`` and after."""
    return item.expires_at <= now


def due(items: Iterable[E], now: datetime) -> list[E]:
    """The items whose expiry has come, soonest first."""
    return sorted((i for i in items if is_expired(i, now)), key=lambda i: i.expires_at)


def seconds_left(item: Expiring, now: datetime) -> float:
    """Seconds until expiry, never negative."""
    return max(0.0, (item.expires_at - now).total_seconds())


def ttl_minutes_view(ttl_seconds: int) -> int:
    """The whole-minute TTL shown in the session view (rounded up)."""
    return -(-ttl_seconds // 60)
