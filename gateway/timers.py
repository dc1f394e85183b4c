"""A session's clocks: sleep until the next warning or the end, waking early when the
deadline moves. The decisions (which warnings, when) are :mod:`gateway.core.ttl`'s; this
module only waits and calls back, so the orchestrator keeps every side effect."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from gateway.core import ttl

Clock = Callable[[], datetime]


async def run_until(
    deadline: Callable[[], datetime],
    changed: asyncio.Event,
    *,
    clock: Clock,
    warnings: Sequence[float],
    warn: Callable[[], Awaitable[None]],
) -> None:
    """Return once ``clock()`` reaches ``deadline()``, calling ``warn`` at each of the
    ``warnings`` offsets (seconds) before it (each offset once). Setting ``changed`` wakes the
    clock to plan again on the current deadline (a PATCH moved it)."""
    warned: set[datetime] = set()
    while True:
        changed.clear()
        now = clock()
        due = deadline()
        if now >= due:
            return
        schedule = ttl.warning_schedule(due, warnings, now)
        moment = next((m for m in schedule if m not in warned), due)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout((moment - now).total_seconds()):
                await changed.wait()
            continue  # the deadline moved: plan again
        if moment < due:
            warned.add(moment)
            await warn()
