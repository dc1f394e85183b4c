"""GPU-hour budgets: what a user has used in the last 7 days, what a create or an extension
may still spend, and each user's decayed usage for the waiting list's order.

The rules are :mod:`gateway.core.fairshare`'s; this module reads the store and the GPU
profiles for them. A user's budget is their own (``PUT /users/{id}/limits``) or else
``--gpu-hours-per-week`` (None: unlimited).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from gateway.config import Config
from gateway.core import fairshare
from gateway.core.fairshare import WEEK, UsageRecord
from gateway.errors import QuotaExceeded
from gateway.gpu.allocator import GpuAllocator
from gateway.models import CreateRequest, Session, rfc3339
from gateway.store import Store

#: Usage older than this many half-lives weighs under 0.1 % in the queue's order: forgotten.
DECAY_HORIZON = 10


@dataclass(frozen=True, slots=True)
class Usage:
    """One user's standing: GPU-hours used in the window, the budget (None: unlimited,
    ``own``: set for this user rather than the default) and, when spent, when it frees."""

    user_id: str
    used: float
    budget: float | None
    own: bool
    window_start: datetime
    window_end: datetime
    next_available_at: datetime | None


class Budgets:
    def __init__(
        self, config: Config, *, store: Store, gpus: GpuAllocator, clock: Callable[[], datetime]
    ) -> None:
        self._config = config
        self._store = store
        self._gpus = gpus
        self._clock = clock

    async def fraction(self, profile: str | None) -> float:
        """The fraction of a GPU a session with ``profile`` holds (0 without a GPU)."""
        if profile is None:
            return 0.0
        return fairshare.gpu_fraction(profile, await self._gpus.profiles())

    async def _records(self, user_id: str, now: datetime) -> list[UsageRecord]:
        found = await self._store.usage(now - WEEK, user_id)
        return found.get(user_id, [])

    async def usage(self, user_id: str) -> Usage:
        """The user's GPU-hours in the last 7 days against their budget."""
        now = self._clock()
        own, budget = await self._store.user_budget(user_id)
        if not own:
            budget = self._config.gpu_hours_per_week
        records = await self._records(user_id, now)
        used = fairshare.usage_in_window(records, now)
        free_at = None
        if budget is not None and budget - used < fairshare.MIN_AVAILABLE_GPU_HOURS:
            session = await self._store.session_of_user(user_id)
            until = session.expires_at if session is not None else now
            held = [r if r.end is not None else replace(r, end=max(until, now)) for r in records]
            free_at = fairshare.next_available(held, now, budget)
        return Usage(user_id, used, budget, own, now - WEEK, now, free_at)

    def _refuse(self, usage: Usage, what: str) -> QuotaExceeded:
        assert usage.budget is not None
        return QuotaExceeded(
            f"{what}: user {usage.user_id!r} has used {usage.used:.2f} of"
            f" {usage.budget:g} GPU-hours in the last 7 days",
            details={
                "gpu_hours_used": round(usage.used, 6),
                "gpu_hours_budget": usage.budget,
                "next_available_at": None
                if usage.next_available_at is None
                else rfc3339(usage.next_available_at),
            },
        )

    async def precheck(self, user_id: str) -> None:
        """Refuse at once a user whose budget is spent (before any GPU is picked or a
        request queued).

        Raises:
            QuotaExceeded: less than a minute of a 1g slice is left (never on a GPU-less host).
        """
        if self._gpus.gpu_less:
            return
        usage = await self.usage(user_id)
        if usage.next_available_at is not None:
            raise self._refuse(usage, "the GPU-hour budget is spent")

    async def admit(self, request: CreateRequest, profile: str | None) -> int:
        """The TTL a create of ``request`` given ``profile`` may have: the requested one,
        or capped so the session cannot overspend the user's budget.

        Raises:
            QuotaExceeded: less than a minute of this GPU share is left.
        """
        fraction = await self.fraction(profile)
        usage = await self.usage(request.user_id)
        allowed = fairshare.ttl_allowed(
            requested_seconds=request.ttl_seconds,
            fraction=fraction,
            used=usage.used,
            budget=usage.budget,
        )
        if allowed is None:
            raise self._refuse(usage, "not enough GPU-hour budget left for a session")
        return allowed

    async def check_extend(self, session: Session, expires_at: datetime) -> None:
        """Refuse moving ``session``'s expiry to ``expires_at`` beyond its user's budget (its
        use so far counts, and the rest of its time at its share).

        Raises:
            QuotaExceeded: the new expiry would overspend.
        """
        fraction = await self.fraction(session.mig_profile if session.gpu_uuid else None)
        usage = await self.usage(session.user_id)
        if usage.budget is None or fraction <= 0:
            return
        ahead = max((expires_at - self._clock()).total_seconds(), 0.0)
        if usage.used + fraction * ahead / 3600 > usage.budget:
            raise self._refuse(usage, "the new TTL would overspend the GPU-hour budget")

    async def set_limit(self, user_id: str, hours: float | None) -> None:
        """Give the user a budget of their own (None: back to the default)."""
        await self._store.set_user_budget(user_id, hours, self._clock())

    @property
    def _half_life(self) -> timedelta:
        return timedelta(seconds=self._config.fairshare_half_life)

    @property
    def memory(self) -> timedelta:
        """How long usage counts anywhere (the budget's window, the order's decay)."""
        return max(WEEK, DECAY_HORIZON * self._half_life)

    async def decayed(self) -> dict[str, float]:
        """Every user's decayed GPU usage (the waiting list's order)."""
        now = self._clock()
        half_life = self._half_life
        records = await self._store.usage(now - DECAY_HORIZON * half_life)
        return {
            user: fairshare.decayed_usage(held, now, half_life) for user, held in records.items()
        }
