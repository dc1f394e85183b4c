"""Idle reclaim, acted on: sample each running session, keep its clocks, warn, end it.

Every ``--idle-sample`` the sampler reads, for each running session, its relayed
connections (from its listener), its compute (the GPU slice's utilisation through the GPU
backend, or the container's CPU time from the engine for a GPU-less session) and the hold
a user may have asked for from inside (``sandman-session hold``, a file in the workspace).
The decision is :mod:`gateway.core.idle`'s; this module stores the clocks (so a restart
keeps the countdown), warns (``wall`` and the audit event ``session_idle_warning``), and
ends the session through the orchestrator with reason ``idle`` (audited as
``session_idle_reclaimed``). A hold set through the API goes through :meth:`hold`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.audit import Audit
from gateway.config import Config
from gateway.core import idle
from gateway.errors import GatewayError, InvalidIdleHold, SessionNotFound
from gateway.gpu.allocator import GpuAllocator
from gateway.metrics import Metrics
from gateway.models import Session, SessionIdle, rfc3339
from gateway.runtime.base import ContainerFile, Runtime
from gateway.sessions import SessionManager
from gateway.store import Store

log = logging.getLogger(__name__)

#: Written by ``sandman-session hold``/``release`` in the user's home (the workspace).
HOLD_FILE = ".sandman-hold"
HOLD_FILE_MAX = 128  # bytes; a larger file is ignored
#: What ``sandman-session`` and the login message read about the idle clocks.
IDLE_INFO = "/etc/sandman/idle.json"


def compute_kind(session: Session) -> str:
    return "gpu" if session.gpu_uuid else "cpu"


def clocks_of(state: SessionIdle) -> idle.Clocks:
    return idle.Clocks(
        state.no_connection_since, state.compute_idle_since, state.hold_until, state.exempt
    )


def read_hold_file(workspace: Path) -> tuple[datetime | None, datetime] | None:
    """The hold the user's file asks for (None: release) and when it was written; None
    when there is no usable file. The user owns the workspace: the file is opened without
    following a link, must be a regular file, and is read only up to a bound."""
    try:
        fd = os.open(workspace / HOLD_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:  # none, a link (ELOOP), unreadable
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > HOLD_FILE_MAX:
            return None
        text = os.read(fd, HOLD_FILE_MAX + 1).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    written = datetime.fromtimestamp(info.st_mtime, UTC)
    if text == "release":
        return None, written
    try:
        until = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (until, written) if until.tzinfo is not None else None  # a zone-less time: unusable


@dataclass
class _Memory:
    """What the sampler keeps about a session between samples (none of it is needed
    after a restart: the clocks are stored)."""

    cpu: tuple[float, float] | None = None  # (CPU seconds, monotonic time) of the last sample
    warned_for: datetime | None = None  # the reclaim_at the warnings below were given for
    warned: set[float] = field(default_factory=set)
    shown: str | None = None  # the idle facts last written into the container


class IdleReclaimer:
    """Samples running sessions and reclaims idle ones. One per gateway process."""

    def __init__(
        self,
        config: Config,
        *,
        sessions: SessionManager,
        store: Store,
        runtime: Runtime,
        gpus: GpuAllocator,
        audit: Audit,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._policy = config.idle
        self._sessions = sessions
        self._store = store
        self._runtime = runtime
        self._gpus = gpus
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._memory: dict[str, _Memory] = {}

    @property
    def enabled(self) -> bool:
        return self._config.idle_reclaim

    async def run(self) -> None:
        """Forever: sample every ``--idle-sample`` (a failed round is logged)."""
        while True:
            await asyncio.sleep(self._config.idle_sample)
            try:
                await self.sample()
            except Exception:
                log.exception("idle sampling failed")

    async def sample(self) -> int:
        """Sample every running session once, acting on each decision; the number reclaimed."""
        running = self._sessions.running()
        for gone in set(self._memory) - {s.id for s in running}:
            del self._memory[gone]
            with contextlib.suppress(KeyError):  # never sampled to the end
                self._metrics.session_idle_seconds.remove(gone)
        results = await asyncio.gather(*(self._sample_one(s) for s in running),
                                       return_exceptions=True)  # fmt: skip
        for session, result in zip(running, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("session %s: idle sample failed: %r", session.id, result)
        return sum(result is True for result in results)

    async def _sample_one(self, session: Session) -> bool:
        memory = self._memory.setdefault(session.id, _Memory())
        busy, utilization = await self._compute(session, memory)
        now = self._clock()
        state = await self._apply_hold_file(session, await self._store.idle_state(session.id), now)
        connections, last_seen = self._sessions.connection_activity(session.id)
        clocks = clocks_of(state)
        clocks = idle.advance(
            clocks,
            connections=connections,
            last_connection=last_seen,
            busy=busy if busy is not None else clocks.compute_idle_since is None,  # as it was
            now=now,
        )
        await self._store.save_idle(
            SessionIdle(
                session.id,
                exempt=state.exempt,
                last_connection_at=last_seen or state.last_connection_at,
                no_connection_since=clocks.no_connection_since,
                compute_idle_since=clocks.compute_idle_since,
                utilization=utilization,
            )
        )
        decision = idle.decide(clocks, self._policy, now, self._warned(memory, clocks))
        idle_since = _idle_since(clocks)
        self._metrics.session_idle_seconds.labels(session.id).set(
            0 if decision_kept(decision) or idle_since is None
            else (now - idle_since).total_seconds()
        )  # fmt: skip
        await self._show(session, memory, decision, clocks)
        match decision:
            case idle.Warn(reclaim_at=due, offset=offset):
                memory.warned.add(offset)
                await self._warn(session, clocks, due)
            case idle.Reclaim():
                if not await self._still_idle(session, clocks, now):
                    return False
                log.info("session %s: idle since %s, reclaiming", session.id, idle_since)
                return await self._sessions.end(session, "idle")
        return False

    async def _still_idle(self, session: Session, clocks: idle.Clocks, now: datetime) -> bool:
        """Check again just before the end: a connection, or a hold set meanwhile."""
        if self._sessions.connection_activity(session.id)[0]:
            return False
        fresh = await self._store.idle_state(session.id)
        current = replace(clocks, hold_until=fresh.hold_until, exempt=fresh.exempt)
        return isinstance(idle.decide(current, self._policy, now), idle.Reclaim)

    def _warned(self, memory: _Memory, clocks: idle.Clocks) -> set[float]:
        due = idle.reclaim_at(clocks, self._policy)
        if due != memory.warned_for:
            memory.warned_for, memory.warned = due, set()
        return memory.warned

    async def _compute(self, session: Session, memory: _Memory) -> tuple[bool | None, float | None]:
        """Whether the session's compute is busy now (None: no verdict yet, the first CPU
        sample after a start) and the utilisation shown (None: unknown)."""
        if not session.gpu_uuid:
            return await self._cpu(session, memory)
        reading, inside = await self._gpu(session)
        busy = idle.is_busy(reading, self._policy.gpu_threshold, self._policy)
        shown = reading.utilization if reading else None
        if busy or not inside:
            return busy, shown
        # Read from inside the container, where the driver may list no process of the
        # session's (host PIDs, not the container's): an idle GPU leaves it to the CPU.
        return (await self._cpu(session, memory))[0], shown

    async def _gpu(self, session: Session) -> tuple[idle.Reading | None, bool]:
        """The session GPU's reading (None: unreadable), and whether it was read from inside
        the container (a Swarm node's), else by the gateway's own GPU backend (NVML)."""
        try:
            container = session.container_id
            inside = await self._runtime.gpu_reading(container) if container else None
            if inside is not None:
                return inside, True
            return await self._gpus.utilization(session.gpu_uuid or ""), False
        except GatewayError as exc:
            log.warning("session %s: GPU utilisation unknown: %s", session.id, exc.log_message)
            return None, False

    async def _cpu(self, session: Session, memory: _Memory) -> tuple[bool | None, float | None]:
        """Whether the container's CPU is busy since the last sample, and its percent of one
        core (both None on the first sample, or when it cannot be read)."""
        if not session.container_id:
            return None, None
        try:
            used = await self._runtime.cpu_seconds(session.container_id)
        except GatewayError as exc:
            log.warning("session %s: CPU use unknown: %s", session.id, exc.log_message)
            used = None
        now = time.monotonic()
        previous, memory.cpu = memory.cpu, (None if used is None else (used, now))
        if used is None or previous is None or now <= previous[1]:
            return None, None
        percent = round(max(0.0, used - previous[0]) / (now - previous[1]) * 100, 1)
        busy = idle.is_busy(idle.Reading(percent), self._policy.cpu_threshold, self._policy)
        return busy, percent

    async def _apply_hold_file(
        self, session: Session, state: SessionIdle, now: datetime
    ) -> SessionIdle:
        """Take a hold (or release) the user wrote inside the session since the last hold
        set either way (the later one wins)."""
        found = await asyncio.to_thread(read_hold_file, Path(session.workspace))
        if found is None:
            return state
        until, written = found
        if state.hold_set_at is not None and written <= state.hold_set_at:
            return state
        hold = idle.file_hold(until, written, now, self._policy)
        await self._store.set_idle_hold(session.id, hold, written)
        return replace(state, hold_until=hold, hold_set_at=written)

    async def _warn(self, session: Session, clocks: idle.Clocks, due: datetime) -> None:
        kind = compute_kind(session)
        await self._sessions.tell(session, idle.warning_message(clocks, due, kind))
        try:
            await self._audit.session_event(
                "session_idle_warning",
                session,
                reclaim_at=rfc3339(due),
                reason=idle.reason(clocks, due, kind),
            )
        except Exception:
            log.exception("audit of session_idle_warning failed")

    async def _show(
        self, session: Session, memory: _Memory, decision: idle.Decision, clocks: idle.Clocks
    ) -> None:
        """Keep the container's copy of the idle facts current (only written on change)."""
        if not session.container_id:
            return
        facts = idle_facts(clocks, decision, compute_kind(session), self._policy)
        text = json.dumps(facts, indent=2) + "\n"
        if text == memory.shown:
            return
        try:
            await self._runtime.put_files(session.container_id,
                                          [ContainerFile(IDLE_INFO, text.encode())])  # fmt: skip
            memory.shown = text
        except GatewayError as exc:
            log.warning("session %s: idle facts not written: %s", session.id, exc.log_message)

    # -- API -------------------------------------------------------------------------------

    async def hold(self, session_id: str, minutes: int) -> None:
        """Hold the session from idle reclaim for ``minutes`` (0 releases). The expiry
        does not move.

        Raises:
            SessionNotFound: no such session.
            InvalidIdleHold: negative, or beyond ``--idle-hold-max``.
        """
        if await self._store.get_session(session_id) is None:
            raise SessionNotFound(f"no session {session_id!r}")
        now = self._clock()
        try:
            until = idle.hold_until(minutes, now, self._policy)
        except ValueError as exc:
            raise InvalidIdleHold(str(exc)) from None
        await self._store.set_idle_hold(session_id, until, now)

    async def view(self, session: Session) -> dict[str, Any] | None:
        """The ``idle`` object of a session's view; None while idle reclaim is off."""
        if not self.enabled:
            return None
        state = await self._store.idle_state(session.id)
        clocks = clocks_of(state)
        now = self._clock()
        decision = idle.decide(clocks, self._policy, now)
        connections, _ = self._sessions.connection_activity(session.id)
        return {
            "connections": connections,
            "no_connection_since": _time(state.no_connection_since),
            "last_connection_at": _time(state.last_connection_at),
            "compute": compute_kind(session),
            "utilization": state.utilization,
            "compute_idle_since": _time(state.compute_idle_since),
            "hold_until": _time(state.hold_until) if _holds(state, now) else None,
            "reclaim_at": None if decision_kept(decision) else _time(decision.reclaim_at),
            "kept_because": [str(k) for k in _kept(decision)],
        }


def idle_facts(
    clocks: idle.Clocks, decision: idle.Decision, compute: str, policy: idle.IdlePolicy
) -> dict[str, Any]:
    """What ``sandman-session`` shows of the idle clocks (written into the container)."""
    return {
        "compute": compute,
        "no_connection_since": _time(clocks.no_connection_since),
        "compute_idle_since": _time(clocks.compute_idle_since),
        "hold_until": _time(clocks.hold_until),
        "reclaim_at": None if decision_kept(decision) else _time(decision.reclaim_at),
        "kept_because": [str(k) for k in _kept(decision)],
        "no_connection_after": policy.no_connection,
        "compute_idle_after": policy.compute,
    }


def decision_kept(decision: idle.Decision) -> bool:
    return isinstance(decision, idle.Keep) and decision.reclaim_at is None


def _kept(decision: idle.Decision) -> tuple[idle.Kept, ...]:
    return decision.kept_because if isinstance(decision, idle.Keep) else ()


def _holds(state: SessionIdle, now: datetime) -> bool:
    return state.hold_until is not None and state.hold_until > now


def _idle_since(clocks: idle.Clocks) -> datetime | None:
    if clocks.no_connection_since is None or clocks.compute_idle_since is None:
        return None
    return max(clocks.no_connection_since, clocks.compute_idle_since)


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else rfc3339(moment)
