"""TTL arithmetic: when a session expires, when to warn, and how far it may be extended."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Protocol


class Expiring(Protocol):
    @property
    def expires_at(self) -> datetime: ...


def expires_at(created_at: datetime, ttl_seconds: int) -> datetime:
    """The instant a session created at ``created_at`` with that TTL ends."""
    return created_at + timedelta(seconds=ttl_seconds)


def is_expired(item: Expiring, now: datetime) -> bool:
    """Expired at exactly ``expires_at`` and after."""
    return item.expires_at <= now


def ttl_minutes_view(ttl_seconds: int) -> int:
    """The whole-minute TTL shown in the session view (rounded up)."""
    return -(-ttl_seconds // 60)


def warning_schedule(
    expires: datetime, offsets_seconds: Iterable[float], now: datetime
) -> list[datetime]:
    """When to warn before ``expires``: one instant per offset, only those still ahead,
    soonest first."""
    instants = {expires - timedelta(seconds=o) for o in offsets_seconds if o > 0}
    return sorted(i for i in instants if i > now)


def warning_message(expires: datetime, now: datetime) -> str:
    """The text put on the user's terminals before the session ends."""
    left = max(0, round((expires - now).total_seconds()))
    minutes, seconds = divmod(left, 60)
    if minutes:
        when = f"{minutes} minute{'s' * (minutes != 1)}"
    else:
        when = f"{seconds} second{'s' * (seconds != 1)}"
    at = expires.strftime("%H:%M:%S UTC")
    return (
        f"Sandman: this session ends in {when} (at {at}). "
        "Save your work; files in your home folder are kept."
    )


def extended_ttl(
    *,
    created_at: datetime,
    current_ttl_seconds: int,
    now: datetime,
    new_total_seconds: int | None,
    extend_seconds: int | None,
    max_seconds: int,
) -> int:
    """The new TTL (seconds from creation) for a PATCH; exactly one of the two is given.

    Raises:
        ValueError: neither or both given, not positive, beyond ``max_seconds``, or ending
            in the past (checked in that order, so no date is built from an absurd number).
    """
    if (new_total_seconds is None) == (extend_seconds is None):
        raise ValueError("give exactly one of the new TTL or the extension")
    if extend_seconds is not None:
        if extend_seconds < 1:
            raise ValueError("the extension must be positive")
        total = current_ttl_seconds + extend_seconds
    else:
        assert new_total_seconds is not None
        total = new_total_seconds
        if total < 1:
            raise ValueError("the TTL must be positive")
    if total > max_seconds:
        raise ValueError(f"the TTL would exceed the maximum of {max_seconds // 60} minutes")
    if expires_at(created_at, total) <= now:
        raise ValueError("the new TTL would already have ended")
    return total
