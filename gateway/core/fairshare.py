"""Fair sharing of scarce GPUs (pure): what a session costs, who waits first, what a budget
allows.

- **Charge**: a session holding GPU capacity is charged GPU-hours = held time * the
  fraction of a GPU it holds (:func:`gpu_fraction`): compute slices / the GPU's slices for
  a MIG instance (1g of 7 = 1/7), 1 for a whole GPU, 0 without a GPU.
- **Decayed usage** (:func:`decayed_usage`): each GPU-hour counts less as it ages, halving
  every half-life (Slurm's ``PriorityDecayHalfLife``), integrated exactly over each held
  interval.
- **Order** (:func:`queue_order`): lowest decayed usage first, then submission time.
- **Backfill** (:func:`may_backfill`): a request behind a head that does not fit may start
  only if it ends before anything now holding capacity ends, so it never takes capacity the
  head could use at its earliest start.
- **Failed starts** (:func:`attempts_after`): a queued request whose start fails goes back
  on the list, at most :data:`MAX_START_ATTEMPTS` times; finding no room does not count.
- **Budget** (:func:`usage_in_window`, :func:`ttl_allowed`, :func:`next_available`): a rolling
  window (7 days) of GPU-hours per user; a create gets its TTL capped to what is left.

Times are aware datetimes; nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.core.gpu_types import MigProfile

WEEK = timedelta(days=7)
FULL_GPU = "full"
#: The least a create is worth: a budget that allows a shorter session refuses instead.
MIN_SESSION_SECONDS = 60
#: A budget with less than this left is spent: a minute of the smallest MIG slice (1 of 7).
#: ``next_available_at`` is when this much is free again.
MIN_AVAILABLE_GPU_HOURS = MIN_SESSION_SECONDS / 3600 / 7
#: A queued request whose start failed this many times ends (``session_dequeue_failed``).
MAX_START_ATTEMPTS = 3
#: Error codes of a start that found nothing to run on: the request just waits on.
NO_ROOM_ERRORS = frozenset({"no_gpu_available", "no_port_available", "no_capacity"})


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One session's hold on GPU capacity: ``fraction`` of a GPU from ``start`` until ``end``
    (None while it still holds it)."""

    fraction: float
    start: datetime
    end: datetime | None = None

    def held_until(self, now: datetime) -> datetime:
        return now if self.end is None or self.end > now else self.end


@dataclass(frozen=True, slots=True)
class Waiting:
    """A queued request as the ordering sees it."""

    id: str
    user_id: str
    submitted_at: datetime


def gpu_fraction(profile: str | None, profiles: Sequence[MigProfile]) -> float:
    """The fraction of a GPU a session with ``profile`` holds: 0 without a GPU, 1 for a
    whole GPU (``full``), else its compute slices over the most any profile of the same
    model has (7 on an A100). A profile no model lists counts as a whole GPU: charging
    too much is the safe side of a budget."""
    if profile is None:
        return 0.0
    if profile == FULL_GPU:
        return 1.0
    for candidate in profiles:
        if candidate.name == profile:
            total = max(p.compute_slices for p in profiles if p.gpu_name == candidate.gpu_name)
            return candidate.compute_slices / total
    return 1.0


def gpu_hours(record: UsageRecord, now: datetime) -> float:
    """GPU-hours charged for ``record`` up to ``now``."""
    held = (record.held_until(now) - record.start).total_seconds()
    return record.fraction * max(held, 0.0) / 3600


def decayed_usage(records: Iterable[UsageRecord], now: datetime, half_life: timedelta) -> float:
    """GPU-hours with each moment weighted by ``0.5 ** (age / half_life)``, integrated over
    each held interval (a session running now counts up to ``now``)."""
    h = half_life.total_seconds()
    total = 0.0
    for record in records:
        end = record.held_until(now)
        if end <= record.start:
            continue
        age_end = (now - end).total_seconds()
        age_start = (now - record.start).total_seconds()
        # the integral of 0.5 ** (age / h) d(age) from age_end to age_start
        seconds = h / math.log(2) * (0.5 ** (age_end / h) - 0.5 ** (age_start / h))
        total += record.fraction * seconds / 3600
    return total


def queue_order(waiting: Iterable[Waiting], usage: dict[str, float]) -> list[Waiting]:
    """The order a queue starts in: lowest decayed usage of the user first (none counts as
    0), then earliest submission; ties keep the order given (pass arrival order)."""
    return sorted(waiting, key=lambda w: (usage.get(w.user_id, 0.0), w.submitted_at))


def may_backfill(candidate_end: datetime, holding_ends: Iterable[datetime]) -> bool:
    """Whether a request that fits now may start ahead of a head that does not: only if it
    ends (its expiry) no later than the first moment any capacity now held frees, which is
    the earliest the head could start. With nothing held, the head's wait is not about
    capacity that anyone frees, so nothing backfills."""
    ends = list(holding_ends)
    return bool(ends) and candidate_end <= min(ends)


def attempts_after(attempts: int, error: str) -> int | None:
    """The failed starts of a queued request after one more failed with ``error`` (one that
    found no room does not count), or None: that was its last, it ends."""
    if error in NO_ROOM_ERRORS:
        return attempts
    return attempts + 1 if attempts + 1 < MAX_START_ATTEMPTS else None


def usage_in_window(
    records: Iterable[UsageRecord], now: datetime, window: timedelta = WEEK
) -> float:
    """GPU-hours held within ``[now - window, now]``."""
    since = now - window
    total = 0.0
    for record in records:
        start = max(record.start, since)
        end = record.held_until(now)
        if end > start:
            total += record.fraction * (end - start).total_seconds() / 3600
    return total


def ttl_allowed(
    *, requested_seconds: int, fraction: float, used: float, budget: float | None
) -> int | None:
    """The TTL a session holding ``fraction`` of a GPU may have when the user has used
    ``used`` of ``budget`` GPU-hours: the requested one, or less so it cannot overspend.
    None when less than :data:`MIN_SESSION_SECONDS` is left (refuse). No budget or no GPU:
    the request as is."""
    if budget is None or fraction <= 0:
        return requested_seconds
    left = round((budget - used) * 3600 / fraction, 6)  # no 3599.9999 for an hour
    if left < MIN_SESSION_SECONDS:
        return None
    return min(requested_seconds, math.floor(left))


def next_available(
    records: Sequence[UsageRecord],
    now: datetime,
    budget: float,
    window: timedelta = WEEK,
) -> datetime:
    """When the rolling window will again leave :data:`MIN_AVAILABLE_GPU_HOURS` of
    ``budget`` free, if nothing more is used (a session still holding counts until its
    ``end``, so give running ones their expiry). ``now`` if it already does.
    Precise to the second."""
    need = budget - MIN_AVAILABLE_GPU_HOURS

    def fits(at: datetime) -> bool:
        return usage_in_window(records, at, window) <= need

    if fits(now):
        return now
    latest = max((r.end or now for r in records), default=now)
    high = max(latest, now) + window  # by then every record has left the window
    low = now
    while (high - low).total_seconds() > 1:
        middle = low + (high - low) / 2
        if fits(middle):
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0) + timedelta(seconds=1)
