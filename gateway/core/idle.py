"""Idle reclaim, decided: is a session kept, warned, or given back?

A session is idle when it has had no relayed connection for ``no_connection`` seconds
**and** its compute (the GPU slice's utilisation, or the container's CPU for a GPU-less
session) has stayed below its threshold for ``compute`` seconds. Two clocks, AND-ed, and
stored, so a gateway restart does not reset them:

- ``no_connection_since``: when the last relayed connection closed (or the session
  started, if it never had one); None while one is open.
- ``compute_idle_since``: since when every reading has been below the threshold; None
  while busy. An unknown reading (an Ampere MIG slice with compute processes on it) is busy.

A hold (until a time) or an exemption keeps the session whatever the clocks say; the TTL
stays the hard cap (a hold never moves ``expires_at``). Everything here is pure: clocks,
readings and ``now`` go in, a decision comes out, and the caller acts on it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

#: ``--idle-mig-unknown``: how a slice that reports no utilisation is read
UNKNOWN_BUSY = "busy"
UNKNOWN_IDLE = "idle"


class Kept(StrEnum):
    """What keeps a session from idle reclaim now (the view's ``kept_because``)."""

    CONNECTION = "connection"
    COMPUTE_BUSY = "compute_busy"
    HOLD = "hold"
    EXEMPT = "exempt"


@dataclass(frozen=True, slots=True)
class IdlePolicy:
    """The operator's settings (seconds and percentages)."""

    no_connection: float = 30 * 60.0
    compute: float = 60 * 60.0
    gpu_threshold: float = 5.0  # percent of the slice
    cpu_threshold: float = 10.0  # percent of one core
    mig_unknown: str = UNKNOWN_BUSY
    warnings: tuple[float, ...] = (30 * 60.0, 5 * 60.0)  # seconds before the reclaim
    hold_max: float = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One compute sample. ``utilization`` in percent (of the slice, or of one core for
    CPU); None when the device reports none. ``processes`` is whether compute processes
    run on it, where that is all that is known (an Ampere MIG slice)."""

    utilization: float | None
    processes: bool = False


@dataclass(frozen=True, slots=True)
class Clocks:
    """A session's idle clocks as stored."""

    no_connection_since: datetime | None
    compute_idle_since: datetime | None
    hold_until: datetime | None = None
    exempt: bool = False


def is_busy(reading: Reading | None, threshold: float, policy: IdlePolicy) -> bool:
    """Whether a reading counts as work. No reading at all (the sampler could not read the
    device) is busy too: unknown is not idle."""
    if reading is None:
        return True
    if reading.utilization is not None:
        return reading.utilization >= threshold
    if policy.mig_unknown == UNKNOWN_IDLE:
        return False
    return reading.processes


def advance(
    clocks: Clocks,
    *,
    connections: int,
    last_connection: datetime | None,
    busy: bool,
    now: datetime,
) -> Clocks:
    """The clocks after one sample: a connection open now (or one seen since the clock
    started, e.g. a short login between samples) restarts the connection clock, and busy
    compute stops the compute clock."""
    since = clocks.no_connection_since
    if connections > 0:
        since = None
    elif since is None:
        since = last_connection or now
    elif last_connection is not None and last_connection > since:
        since = last_connection
    compute = None if busy else (clocks.compute_idle_since or now)
    return Clocks(since, compute, clocks.hold_until, clocks.exempt)


def reclaim_at(clocks: Clocks, policy: IdlePolicy) -> datetime | None:
    """When the session is reclaimed if nothing changes; None while a connection is open,
    compute is busy, or it is exempt. After a hold the countdown has at least the longest
    warning left, so every warning is still given."""
    if clocks.exempt or clocks.no_connection_since is None or clocks.compute_idle_since is None:
        return None
    due = max(
        clocks.no_connection_since + timedelta(seconds=policy.no_connection),
        clocks.compute_idle_since + timedelta(seconds=policy.compute),
    )
    if clocks.hold_until is not None:
        due = max(due, clocks.hold_until + timedelta(seconds=max(policy.warnings, default=0)))
    return due


def kept_because(clocks: Clocks, now: datetime) -> tuple[Kept, ...]:
    """Everything that keeps the session now (empty: it is counting down)."""
    reasons = []
    if clocks.no_connection_since is None:
        reasons.append(Kept.CONNECTION)
    if clocks.compute_idle_since is None:
        reasons.append(Kept.COMPUTE_BUSY)
    if clocks.hold_until is not None and clocks.hold_until > now:
        reasons.append(Kept.HOLD)
    if clocks.exempt:
        reasons.append(Kept.EXEMPT)
    return tuple(reasons)


@dataclass(frozen=True, slots=True)
class Keep:
    """Nothing to do; ``reclaim_at`` is when it would end if nothing changes (None: kept)."""

    kept_because: tuple[Kept, ...]
    reclaim_at: datetime | None


@dataclass(frozen=True, slots=True)
class Warn:
    """Tell the user: the session will be reclaimed at ``reclaim_at`` (``offset`` seconds
    before it is the warning due now)."""

    reclaim_at: datetime
    offset: float


@dataclass(frozen=True, slots=True)
class Reclaim:
    """End the session now, with reason ``idle``."""

    reclaim_at: datetime


Decision = Keep | Warn | Reclaim


def decide(
    clocks: Clocks, policy: IdlePolicy, now: datetime, warned: Collection[float] = ()
) -> Decision:
    """What to do now. ``warned``: the warning offsets already given for the current
    ``reclaim_at`` (the caller forgets them when it moves). Of several offsets due at once
    (a late sample) only the nearest is given, and an earlier one never after it."""
    kept = kept_because(clocks, now)
    due = reclaim_at(clocks, policy)
    if kept or due is None:
        return Keep(kept, None)
    if now >= due:
        return Reclaim(due)
    passed = [o for o in policy.warnings if now >= due - timedelta(seconds=o)]
    if passed and min(passed) not in warned:
        return Warn(due, min(passed))
    return Keep((), due)


def hold_until(minutes: int, now: datetime, policy: IdlePolicy) -> datetime | None:
    """The hold a PATCH ``idle_hold_minutes`` sets: None releases (0).

    Raises:
        ValueError: negative, or longer than ``hold_max``.
    """
    if minutes < 0:
        raise ValueError("idle_hold_minutes cannot be negative")
    if minutes * 60 > policy.hold_max:
        raise ValueError(
            f"idle_hold_minutes is at most {int(policy.hold_max // 60)} (--idle-hold-max)"
        )
    return None if minutes == 0 else now + timedelta(minutes=minutes)


def file_hold(
    until: datetime | None, written: datetime, now: datetime, policy: IdlePolicy
) -> datetime | None:
    """The hold a ``sandman-session hold`` file asks for, bounded by ``hold_max`` from when
    it was written (a time in the future counts as now). None: the file releases."""
    if until is None:
        return None
    return min(until, min(written, now) + timedelta(seconds=policy.hold_max))


def reason(clocks: Clocks, reclaim: datetime, compute: str) -> str:
    """Why the session is being reclaimed, in words (warnings and the audit trail)."""
    parts = []
    if clocks.no_connection_since is not None:
        parts.append(f"no connection since {_hm(clocks.no_connection_since)}")
    if clocks.compute_idle_since is not None:
        parts.append(f"{compute.upper()} idle since {_hm(clocks.compute_idle_since)}")
    return f"{', '.join(parts)}; idle reclaim at {_hm(reclaim)} UTC"


def warning_message(clocks: Clocks, reclaim: datetime, compute: str) -> str:
    """The ``wall`` text of an idle warning: what is idle, when, and how to keep it."""
    return (
        f"Sandman: this session is idle ({reason(clocks, reclaim, compute)}). Connect, "
        "run something, or `sandman-session hold 2h` to keep it; your home stays either way."
    )


def _hm(moment: datetime) -> str:
    return moment.strftime("%H:%M:%S")
