"""The session orchestrator: the only place that sequences store, runtime, GPU and relay.

Each session this process knows is owned by one :class:`LiveSession`: its listener, the
task starting it, its expiry timer and the task ending it. The database holds its state,
``starting -> running -> ending(reason) -> (row deleted)``, and each transition is written
before its side effects, so a crash or a failed step is always visible and resumable:

- **create** checks the user has no session, then reserves GPU, port (by binding the
  listener) and row under one lock; the start (container, files, sshd handshake) runs in
  its own task under ``--start-timeout``. Any failure ends the session through the same
  path as DELETE.
- **end** (DELETE, TTL timer, sweep, vanished container, failed create, restart) cancels a
  start in progress and waits for it, writes ``ending(reason)``, then cuts connections and
  closes the listener, removes the container, releases the GPU and deletes the row together
  with its end event (one transaction: the trail ends each session exactly once). If a step
  fails, the row says what is left: the owner keeps whatever it still holds (a listener is
  never dropped until it is closed), and a retry (DELETE, the sweep, the next start)
  finishes it through the same owner.
- **extend** (PATCH) moves the expiry under the session's lock; a starting session picks it
  up when it starts, and the timer reads the current expiry each time it wakes. An ending
  session is never extended: the row's state is checked under the lock and by the update.
- **recover** re-opens each live session's listener on its port, or on another one when
  that port is taken (the container and the user's jobs keep running; the move is audited).

A session started from the waiting list keeps its queued request until it runs: a create
that fails puts the request back on the list, in the transaction that deletes its row
(:meth:`Store.delete_session`), so neither a failure nor a crash mid-start loses it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from gateway import timers
from gateway.audit import Audit, disconnect_data, session_data
from gateway.budgets import Budgets
from gateway.config import Config
from gateway.core import ttl
from gateway.errors import (
    ContainerStartFailed,
    GatewayError,
    GatewayStopping,
    InvalidTtl,
    NoPortAvailable,
    SessionDeleted,
    SessionEnding,
    SessionExists,
    SessionNotFound,
)
from gateway.gpu.allocator import Allocation, GpuAllocator
from gateway.gpu.pin import seen_problem
from gateway.metrics import Metrics
from gateway.models import (
    CloseReason,
    CreatedSession,
    CreateRequest,
    Credentials,
    QueuedRequest,
    Session,
    SessionState,
    User,
    rfc3339,
)
from gateway.provisioning import Provisioner
from gateway.relay import PipePool, RelayLimits, SessionListener
from gateway.runtime.base import LABEL_SESSION, ContainerInfo, Runtime
from gateway.ssh.credentials import new_key_pair, new_password
from gateway.ssh.identity import HostIdentity
from gateway.store import Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
WATCH_RETRY_SECONDS = 2.0
#: The sweep ends sessions concurrently, at most this many at once, and waits for each at
#: most this long (a hung engine call must not stop the sweep of the others for good).
SWEEP_CONCURRENCY = 16
SWEEP_BUDGET_SECONDS = 150.0
CREATE_FAILED = "create_failed"  # an end reason that was never a created session
#: The error of a create whose failure this process did not see: the gateway crashed or
#: stopped mid-start (recovery), or the failed create's cleanup was finished by the sweep.
START_INTERRUPTED = "start_interrupted"
#: The end reason of a session whose task Swarm replaced with one that does not see
#: exactly the GPU slice the engine assigned it (the pin check of the new task failed).
GPU_PIN_LOST = "gpu_pin_lost"
#: How long the check of a replaced task's GPU may take (it is tried again next sweep).
TASK_CHECK_SECONDS = 15.0
#: A create's steps, in order; each is logged at DEBUG when done (the kill test stops there).
CREATE_STEPS = (
    "port_bound",  # GPU, port and row reserved, listener bound
    "container_created",
    "files_written",
    "container_started",
    "sshd_ready",
    "marked_running",
    "created",  # audited; the 201 is next
)

#: How an ending session closes its live connections, by why it ends.
_CONNECTION_REASON = {
    "ttl_expired": CloseReason.TTL_EXPIRED,
    "session_deleted": CloseReason.SESSION_DELETED,
    "container_gone": CloseReason.SERVER_CLOSED,
    "backend_gone": CloseReason.SERVER_CLOSED,
    GPU_PIN_LOST: CloseReason.SERVER_CLOSED,
}
#: The audit event of a session ending, by why it ends.
_END_EVENT = {
    "ttl_expired": "session_expired",
    "session_deleted": "session_deleted",
    "idle": "session_idle_reclaimed",
}


@dataclass(eq=False)
class LiveSession:
    """The single owner, in this process, of one session's moving parts. One made by an end
    for a session nobody here owns (left by a crash) is a placeholder: it holds nothing.
    An owner stays in the manager's table until what it holds (listener, timer) is let go.
    """

    session: Session  # the latest known row
    listener: SessionListener | None = None
    starting: asyncio.Task[Session] | None = None
    timer: asyncio.Task[None] | None = None
    ending: asyncio.Task[bool] | None = None
    files_written: bool = False  # the container holds its files: a PATCH rewrites them
    failure: str | None = None  # the error code its create failed with
    #: the engine's task running its container, as last checked (Swarm replaces tasks);
    #: None: not yet checked in this process (a recovered session)
    task_id: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # PATCH vs start vs sweep
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # the expiry moved

    @property
    def holds(self) -> bool:
        """Whether it still holds a listener or a running timer (it must not be dropped)."""
        return self.listener is not None or (self.timer is not None and not self.timer.done())


class SessionManager:
    """Creates, tracks, extends and ends sessions. One per gateway process."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        runtime: Runtime,
        gpus: GpuAllocator,
        audit: Audit,
        metrics: Metrics,
        identity: HostIdentity,
        instance_id: str,
        clock: Clock,
        budgets: Budgets,
        on_end: Callable[[], None] = lambda: None,
    ) -> None:
        """``on_end`` is told whenever an ending session's GPU is released (under the
        reserve lock) and again when its row (so its port) is gone: capacity may be free."""
        self._config = config
        self._budgets = budgets
        self._on_end = on_end
        self._provision = Provisioner(
            config, runtime=runtime, gpus=gpus, identity=identity, instance_id=instance_id
        )
        self._store = store
        self._runtime = runtime
        self._gpus = gpus
        self._audit = audit
        self._metrics = metrics
        self._instance_id = instance_id
        self._clock = clock
        self._limits = RelayLimits(
            max_connections=config.max_connections_per_session,
            preauth_timeout=config.preauth_timeout,
            idle_timeout=config.idle_timeout,
        )
        self._pipes = PipePool()  # shared by every session's connections: pipes follow the bytes
        self._live: dict[str, LiveSession] = {}
        self._background: set[asyncio.Task[object]] = set()
        self._reserve_lock = asyncio.Lock()
        self._stopping = False

    # -- queries ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session:
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    async def list(self) -> list[Session]:
        return await self._store.list_sessions()

    def active_connections(self, session_id: str) -> int:
        live = self._live.get(session_id)
        return live.listener.active if live and live.listener else 0

    def connection_activity(self, session_id: str) -> tuple[int, datetime | None]:
        """The session's open relayed connections past their key exchange now, and the
        last moment one was open in this process (None: none since it started or was
        recovered). Connections that never finish a key exchange count for neither."""
        live = self._live.get(session_id)
        if live is None or live.listener is None:
            return 0, None
        return live.listener.established, live.listener.last_seen

    def running(self) -> list[Session]:
        """The sessions running in this process and not ending (the idle sampler's)."""
        return [
            live.session
            for live in self._live.values()
            if live.session.state is SessionState.RUNNING and live.ending is None
        ]

    async def tell(self, session: Session, message: str) -> None:
        """Write ``message`` to the session's open terminals (best effort)."""
        await self._provision.tell(session, message)

    def _listeners(self) -> list[SessionListener]:
        return [live.listener for live in self._live.values() if live.listener is not None]

    @property
    def live_sessions(self) -> int:
        return sum(live.session.state is SessionState.RUNNING for live in self._live.values())

    @property
    def live_connections(self) -> int:
        return sum(listener.active for listener in self._listeners())

    # -- create ----------------------------------------------------------------------------

    async def create(
        self,
        request: CreateRequest,
        *,
        queued: QueuedRequest | None = None,
        reserved: Callable[[Session], None] = lambda session: None,
        guard: Callable[[], None] = lambda: None,
    ) -> CreatedSession:
        """Start a session and return it once its sshd answers with its host certificate.
        ``queued``: start that waiting request (its id and credentials), taking it off the
        waiting list as its row is stored; ``reserved`` is called once GPU, port and row are;
        ``guard`` is called just before the GPU is chosen, under the lock that GPU releases
        also take, and may refuse by raising.

        Raises:
            QuotaExceeded, SessionExists, NoPortAvailable, NoGpuAvailable, ...: nothing was
                reserved.
            ContainerStartFailed: the container did not answer SSH within the start
                timeout; everything was released (or is left ``ending`` for the sweep).
            SessionDeleted: a DELETE ended the session while it was starting (or, for
                ``queued``, withdrew it).
            GatewayStopping: the gateway began shutting down meanwhile (rolled back).
        """
        started = time.monotonic()
        if queued is None:
            keys = new_key_pair(request.public_keys)
            # the password's bcrypt (~60 ms) runs in a thread while port, row and container
            # are made
            creds = asyncio.ensure_future(_credentials(keys))
        else:
            keys = (None, queued.authorized_keys)
            creds = asyncio.ensure_future(_ready(Credentials(*keys, "", queued.password_hash)))
        try:
            live = await self._reserve(request, keys[1], queued, guard)
        except BaseException:
            creds.cancel()
            raise
        reserved(live.session)
        self._step_done(live.session, "port_bound")
        task = asyncio.create_task(self._start(live, creds), name=f"start:{live.session.id}")
        live.starting = task
        try:
            session = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():  # our caller went away: the start goes too
                task.cancel()
                await self._roll_back(live, GatewayStopping.code)
                raise
            await self._roll_back(live, GatewayStopping.code)  # a DELETE's reason wins
            if self._stopping:
                raise GatewayStopping("the gateway is stopping; try again shortly") from None
            raise SessionDeleted("the session was ended while it was starting") from None
        except BaseException as exc:
            await self._roll_back(live, _error_code(exc))
            raise
        self._metrics.create_seconds.observe(time.monotonic() - started)
        await _quietly(
            self._audit.session_event(
                "session_created", session, image=session.image, ttl_seconds=session.ttl_seconds
            ),
            "audit of session_created",
        )
        self._step_done(session, "created")
        log.info(
            "session %s created for %s on port %d (gpu %s)",
            session.id, session.user_id, session.ssh_port, session.gpu_uuid,
        )  # fmt: skip
        return CreatedSession(
            session=session,
            credentials=creds.result(),
            ttl_capped=session.ttl_seconds < request.ttl_seconds,
        )

    async def _roll_back(self, live: LiveSession, error: str) -> None:
        """End a session whose create failed with ``error`` (its queued request, if any,
        goes back on the waiting list: see :meth:`_delete_row`)."""
        live.failure = error
        await _quietly(self.end(live.session, CREATE_FAILED), "rollback")

    async def _reserve(
        self,
        request: CreateRequest,
        authorized_keys: tuple[str, ...],
        queued: QueuedRequest | None,
        guard: Callable[[], None],
    ) -> LiveSession:
        """Reserve user uid, GPU, port and row atomically with respect to other creates;
        the TTL is capped to the user's GPU-hour budget.

        Raises:
            SessionExists, QuotaExceeded, GatewayStopping: before anything is allocated.
        """
        session_id = str(uuid.uuid4()) if queued is None else queued.id
        now = self._clock().replace(microsecond=0)  # so the shown expires_at is exact
        async with self._reserve_lock:
            if self._stopping:  # its start would be cancelled at once
                raise GatewayStopping("the gateway is stopping; try again shortly")
            if await self._store.session_of_user(request.user_id) is not None:
                raise SessionExists(f"user {request.user_id!r} already has a live session")
            await self._budgets.precheck(request.user_id)
            user = await self._store.ensure_user(request.user_id, now)
            guard()
            allocation = await self._gpus.allocate(request, await self._store.allocated_gpus())
            listener: SessionListener | None = None
            try:
                ttl_seconds = await self._budgets.admit(request, allocation.profile)
                listener = await self._bind_free_port(session_id, user)
                session = Session(
                    id=session_id,
                    user_id=request.user_id,
                    uid=user.uid,
                    ssh_port=listener.port,
                    image=request.image,
                    workspace=str(self._config.workspace_root / request.user_id),
                    ttl_seconds=ttl_seconds,
                    created_at=now,
                    expires_at=ttl.expires_at(now, ttl_seconds),
                    gpu_uuid=allocation.uuid,
                    mig_profile=allocation.profile,
                    gpu_created=allocation.created,
                    authorized_keys=authorized_keys,
                    cpu_limit=request.cpu_limit,
                    memory_limit=request.memory_limit,
                    claim_by=None
                    if queued is None
                    else now + timedelta(seconds=self._config.claim_timeout),
                )
                await self._store.insert_session(
                    session,
                    idle_exempt=not request.idle_reclaim,
                    gpu_fraction=await self._budgets.fraction(allocation.profile),
                    from_queue=queued is not None,
                )
            except BaseException:
                await self._unreserve(allocation, listener)
                raise
            live = LiveSession(session, listener=listener)
            self._live[session_id] = live
        return live

    async def _unreserve(self, allocation: Allocation, listener: SessionListener | None) -> None:
        """Undo a reservation that never got its row (so the end path cannot see it)."""
        if listener is not None:
            await listener.close()
        if allocation.created:
            await _quietly(self._gpus.release(allocation), "GPU release")

    def _listener(self, session_id: str, user_id: str, port: int) -> SessionListener:
        return SessionListener(
            session_id,
            user_id,
            port,
            limits=self._limits,
            observer=self._audit,
            clock=self._clock,
            pipes=self._pipes,
        )

    async def _bind_free_port(self, session_id: str, user: User) -> SessionListener:
        """Bind the user's sticky port if it is free, else the lowest port no other user
        calls theirs, else (the pool forces it) another user's."""
        held = await self._store.held_ports()
        claimed = await self._store.claimed_ports(except_user=user.user_id)
        candidates = self._config.ssh_ports.candidates(
            held, preferred=user.ssh_port, claimed=claimed
        )
        for port in candidates:
            listener = self._listener(session_id, user.user_id, port)
            try:
                await listener.bind(self._config.ssh_bind)
            except OSError:
                continue  # held by another process
            return listener
        raise NoPortAvailable(
            f"no free SSH port in {self._config.ssh_ports.start}-{self._config.ssh_ports.end}"
        )

    async def _start(self, live: LiveSession, creds: Awaitable[Credentials]) -> Session:
        """Container, files, start, handshake, GPU check; then ``running`` and the timer.

        Raises:
            ContainerStartFailed: not up within ``--start-timeout``, or it failed.
            SessionDeleted: the session started ending meanwhile.
        """
        try:
            async with asyncio.timeout(self._config.start_timeout):
                return await self._start_steps(live, creds)
        except TimeoutError:
            raise ContainerStartFailed(
                f"the session container did not answer SSH within {self._config.start_timeout:g} s"
            ) from None

    async def _start_steps(self, live: LiveSession, creds: Awaitable[Credentials]) -> Session:
        session = live.session
        await self._provision.prepare_workspace(session)
        container_id = await self._provision.find_or_create(session)
        await self._store.set_container(session.id, container_id)
        self._step_done(session, "container_created")
        async with live.lock:  # a PATCH meanwhile is in the row: read it with the files
            session = live.session = await self.get(session.id)
            await self._provision.write_files(container_id, session, await creds)
            live.files_written = True
        self._step_done(session, "files_written")
        info = await self._provision.start(container_id)
        self._step_done(session, "container_started")
        assert info.ip is not None  # start() guarantees an address
        await self._provision.wait_ready(session, container_id, (info.ip, info.ssh_port))
        self._step_done(session, "sshd_ready")
        await self._provision.check_gpu(session, container_id, info)
        live.task_id = info.task_id
        assert live.listener is not None
        network = self._config.docker_network
        lookup = self._runtime.address_lookup(container_id, network)
        live.listener.set_upstream(info.ip, info.ssh_port, lookup)
        async with live.lock:
            if not await self._store.mark_running(session.id, container_id, info.ip, info.gpu_uuid):
                raise SessionDeleted("the session was ended while it was starting")
            live.session = replace(
                live.session,
                state=SessionState.RUNNING,
                container_id=container_id,
                container_ip=info.ip,
                gpu_uuid=info.gpu_uuid or live.session.gpu_uuid,
            )
        self._step_done(session, "marked_running")
        self._start_timer(live)
        return live.session

    def _step_done(self, session: Session, step: str) -> None:
        """Log a create's progress. Under the tests' ``SANDMAN_TEST_STOP_AT`` the process
        stops itself at that step, so a kill test hits it exactly (never set in service)."""
        log.debug("session %s: create step %s done", session.id, step)
        if step == self._config.test_stop_at:
            os.kill(os.getpid(), signal.SIGSTOP)

    # -- time ------------------------------------------------------------------------------

    async def extend(
        self, session_id: str, *, new_total_seconds: int | None, extend_seconds: int | None
    ) -> Session:
        """Change the session's TTL (counted from creation). The container's authorized
        keys and session facts are rewritten first; a starting session gets them when it
        starts; the timer and its warnings follow.

        Raises:
            SessionNotFound: no such session.
            SessionEnding: it is ending (also when it began ending during this call).
            InvalidTtl: beyond ``--max-ttl-minutes``, or ending in the past.
            QuotaExceeded: longer than the user's GPU-hour budget allows.
        """
        live = self._live.get(session_id)
        session = await self.get(session_id)  # 404 when unknown
        if live is None or live.ending is not None or session.state is SessionState.ENDING:
            raise _ending(session_id)
        async with live.lock:  # decide on the row as it is now: an end may have begun
            session = await self.get(session_id)
            if live.ending is not None or session.state is SessionState.ENDING:
                raise _ending(session_id)
            try:
                total = ttl.extended_ttl(
                    created_at=session.created_at,
                    current_ttl_seconds=session.ttl_seconds,
                    now=self._clock(),
                    new_total_seconds=new_total_seconds,
                    extend_seconds=extend_seconds,
                    max_seconds=self._config.max_ttl_minutes * 60,
                )
            except ValueError as exc:
                raise InvalidTtl(str(exc)) from None
            expires = ttl.expires_at(session.created_at, total)
            if expires > session.expires_at:
                await self._budgets.check_extend(session, expires)
            updated = replace(session, ttl_seconds=total, expires_at=expires)
            if live.files_written and session.container_id:
                try:
                    await self._provision.rewrite_expiring(session.container_id, updated)
                except GatewayError:  # the container went with an end meanwhile?
                    if live.ending is not None:
                        raise _ending(session_id) from None
                    raise
            if not await self._store.update_ttl(session.id, total, expires):
                raise _ending(session_id)
            live.session = replace(live.session, ttl_seconds=total, expires_at=expires)
            live.changed.set()
        await _quietly(
            self._audit.session_event(
                "session_extended", updated, previous_expires_at=rfc3339(session.expires_at)
            ),
            "audit of session_extended",
        )
        return updated

    def _start_timer(self, live: LiveSession) -> None:
        live.timer = self._spawn(self._expire_on_time(live), f"ttl:{live.session.id}")

    async def _expire_on_time(self, live: LiveSession) -> None:
        """Warn the user's terminals at the configured offsets, then end the session at its
        expiry. Wakes early when a PATCH moves the expiry, and always acts on the current
        one."""

        async def warn() -> None:  # a failed warning never stops the clock
            message = ttl.warning_message(live.session.expires_at, self._clock())
            await _quietly(self._provision.tell(live.session, message), "expiry warning")

        await timers.run_until(
            lambda: live.session.expires_at,
            live.changed,
            clock=self._clock,
            warnings=self._config.expiry_warnings,
            warn=warn,
        )
        await _quietly(self.end(live.session, "ttl_expired"), "expiry (the sweep retries)")

    # -- end -------------------------------------------------------------------------------

    async def delete(self, session_id: str) -> None:
        """End the session now (a starting one is cancelled, and its rollback awaited).

        Raises:
            SessionNotFound: no such session.
        """
        await self.end(await self.get(session_id), "session_deleted")

    async def delete_all(self) -> int:
        """End every session; the number this call ended."""
        sessions = await self.list()
        results = await asyncio.gather(
            *(self.end(s, "session_deleted") for s in sessions), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(result is True for result in results)

    async def end(self, session: Session, reason: str) -> bool:
        """End one session; idempotent. Concurrent calls share one cleanup, and the first
        reason wins. True if this cleanup deleted the row (it audits the end, once).

        Raises:
            GatewayError: a step failed; the row stays ``ending`` for the sweep.
        """
        return await asyncio.shield(self._begin_end(session, reason))

    def _begin_end(self, session: Session, reason: str) -> asyncio.Task[bool]:
        live = self._live.get(session.id)
        if live is None:
            live = self._live[session.id] = LiveSession(session)
        if live.ending is None:  # its callers get its outcome: not reported on its own
            live.ending = self._spawn(self._end(live, reason), f"end:{session.id}", report=False)
        return live.ending

    async def _end(self, live: LiveSession, reason: str) -> bool:
        """The one path that ends a session: see the module docstring. On failure the owner
        stays with what it still holds, ``ending`` cleared, so a retry goes on from there."""
        session_id = live.session.id
        try:
            await _cancel_and_wait(live.starting)
            row = await self._store.begin_ending(session_id, reason)
            if row is None:
                self._forget(live)
                return False  # ended already
            live.session = row
            await _cancel_and_wait(live.timer)
            if live.listener is not None:
                cut = _CONNECTION_REASON.get(row.end_reason or reason, CloseReason.SESSION_DELETED)
                await live.listener.close(cut)
                live.listener = None
            await self._provision.remove(row)
            if row.gpu_uuid:
                async with self._reserve_lock:  # a create's guard sees it before or after
                    await self._gpus.release_session(row)
                    self._on_end()
            why = row.end_reason or reason
            deleted = await self._delete_row(row, why, live.failure)
        except BaseException:
            live.ending = None
            if not live.holds:
                self._forget(live)
            raise
        self._forget(live)
        self._on_end()
        if deleted:
            self._metrics.sessions_ended.labels(why).inc()
            log.info("session %s of %s ended: %s", session_id, row.user_id, why)
        return deleted

    async def _delete_row(self, row: Session, why: str, failure: str | None) -> bool:
        """Delete the row; one that was created gets its end event in the same transaction.
        One that never ran, or whose create failed even after it ran (its start timed out
        while ``running`` was being written: no ``session_created``), ends with its POST's
        answer; the queued request it started goes back on the list if its create failed
        (with ``failure``, the error), else with it."""
        if row.container_ip is None or why == CREATE_FAILED:
            failed = (failure or START_INTERRUPTED) if why == CREATE_FAILED else None
            deleted, saved = await self._store.delete_session(
                row.id, self._clock(), reason=why, failed=failed
            )
            self._audit.stored([saved] if saved is not None else [])
            return deleted
        event = _END_EVENT.get(why, "session_ended")
        saved = await self._store.delete_session_audited(
            row, self._clock(), event, session_data(row, reason=why)
        )
        if saved is not None:
            self._audit.stored([saved])
        return saved is not None

    def _forget(self, live: LiveSession) -> None:
        if self._live.get(live.session.id) is live:
            del self._live[live.session.id]

    async def sweep(self) -> int:
        """End every expired session, every session whose container is gone and every one
        left ``ending``; remove labelled containers that have no session; prune audit
        records past their retention. The number of sessions ended."""
        owned = await self._runtime.list_owned(self._instance_id, self._config.docker_network)
        slots = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def one(session: Session) -> bool:
            async with slots:
                try:
                    async with asyncio.timeout(SWEEP_BUDGET_SECONDS):
                        return await self._sweep_one(session)
                except TimeoutError:  # its end goes on in its own task; the next sweep looks
                    log.warning("session %s: cleanup still running after %g s",
                                session.id, SWEEP_BUDGET_SECONDS)  # fmt: skip
                except GatewayError as exc:
                    log.warning("session %s: cleanup failed, will retry: %s",
                                session.id, exc.log_message)  # fmt: skip
                except Exception:
                    log.exception("session %s: cleanup failed, will retry", session.id)
                return False

        ended = sum(await asyncio.gather(*map(one, await self._store.list_sessions())))
        await self._remove_orphans(owned)
        retention = timedelta(days=self._config.audit_retention_days)
        await self._store.prune_audit(self._clock() - retention)
        return ended

    async def _sweep_one(self, session: Session) -> bool:
        live = self._live.get(session.id)
        if session.state is SessionState.ENDING:
            return await self.end(session, session.end_reason or "session_deleted")
        if session.state is SessionState.STARTING:
            if live is None:  # no create of this process owns it: a crash left it
                return await self.end(session, CREATE_FAILED)
            return False
        if live is not None:  # decide on the current row, not the list's
            async with live.lock:
                current = await self._store.get_session(session.id)
                if current is None or live.ending is not None:
                    return False
                reason = await self._due_reason(current, live)
                if reason is None:
                    return False
                task = self._begin_end(current, reason)
            return await asyncio.shield(task)
        reason = await self._due_reason(session)
        return reason is not None and await self.end(session, reason)

    async def _due_reason(self, session: Session, live: LiveSession | None = None) -> str | None:
        if ttl.is_expired(session, self._clock()):
            return "ttl_expired"
        if session.container_id:
            info = await self._runtime.inspect(session.container_id, self._config.docker_network)
            if info is None or not info.running:
                return self._runtime.gone_reason
            if live is not None:
                return await self._follow_task(live, session, info)
        return None

    async def _follow_task(
        self, live: LiveSession, session: Session, info: ContainerInfo
    ) -> str | None:
        """Take in a task the engine started for a running session since it was last
        checked (Swarm restarted or moved it): the row gets the new task's address and
        GPU slice, the replacement is audited (``session_task_replaced``), and a GPU
        session's new task must see exactly its slice (checked as at the create), else
        :data:`GPU_PIN_LOST` is returned: the session must end. A check that cannot be
        made now (the task is not answering yet) is logged and made at the next sweep.

        The first check of a recovered session (no task known yet) checks the GPU, and
        audits a replacement only if the slice changed while the gateway was down.
        """
        previous = live.task_id
        if info.task_id is None or info.task_id == previous or info.ip is None:
            return None
        container_id = info.id
        problem = None
        if info.gpu_uuid is not None:
            try:
                async with asyncio.timeout(TASK_CHECK_SECONDS):
                    problem = await seen_problem(self._runtime, container_id, info.gpu_uuid)
            except (GatewayError, TimeoutError) as exc:
                why = exc.log_message if isinstance(exc, GatewayError) else "timed out"
                log.warning("session %s: the GPU of its task %s is not checked yet: %s",
                            session.id, info.task_id[:12], why)  # fmt: skip
                return None
        live.task_id = info.task_id
        moved = info.gpu_uuid is not None and info.gpu_uuid != session.gpu_uuid
        if previous is None and not moved:
            return GPU_PIN_LOST if problem else None  # recovered; nothing seen changed
        if not await self._store.mark_running(session.id, container_id, info.ip, info.gpu_uuid):
            return None  # it is ending
        live.session = replace(
            session, container_ip=info.ip, gpu_uuid=info.gpu_uuid or session.gpu_uuid
        )
        node = self._runtime.node_of(container_id)
        log.info("session %s: its task was replaced by %s on %s (GPU %s)",
                 session.id, info.task_id[:12], node, info.gpu_uuid)  # fmt: skip
        await _quietly(
            self._audit.session_event(
                "session_task_replaced",
                live.session,
                previous_task=previous,
                task=info.task_id,
                node=node,
                previous_gpu_uuid=session.gpu_uuid,
                gpu_problem=problem,
            ),
            "audit",
        )
        return GPU_PIN_LOST if problem else None

    async def _remove_orphans(self, owned: list[ContainerInfo]) -> None:
        """Remove containers labelled by this gateway whose session has no row. ``owned``
        must be listed before the rows are read: a create inserts its row first."""
        rows = {s.id for s in await self._store.list_sessions()}
        for container in owned:
            if container.labels.get(LABEL_SESSION) not in rows:
                log.info("removing orphan container %s (%s)", container.name, container.id[:12])
                await _quietly(self._runtime.remove(container.id), "orphan removal")

    async def watch_containers(self) -> None:
        """Forever: end a running session as soon as Docker reports its container died or
        was removed (the sweep is the backstop while the event stream is down)."""
        while True:
            try:
                async for session_id in self._runtime.container_exits(self._instance_id):
                    live = self._live.get(session_id)
                    running = live is not None and live.session.state is SessionState.RUNNING
                    if running and live.ending is None:
                        log.info("session %s: its container is gone", session_id)
                        ending = self.end(live.session, self._runtime.gone_reason)
                        what = "end (the sweep retries)"
                        self._spawn(_quietly(ending, what), f"gone:{session_id}")
            except GatewayError as exc:
                log.warning("container events unavailable: %s", exc.log_message)
            except Exception:  # never die silently: the stream is followed again
                log.exception("following container events failed")
            await asyncio.sleep(WATCH_RETRY_SECONDS)

    # -- restart ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """Adopt what the database says is live; finish or clean what is not; remove
        orphans. Each session is handled on its own: one that fails is logged and left
        ``ending`` for the sweep, and the gateway serves. Connection records a crash left
        open are closed with reason ``error``, each with its ``disconnect`` event.
        """
        self._audit.stored(
            await self._store.end_open_connections(self._clock(), describe=disconnect_data)
        )
        owned = await self._runtime.list_owned(self._instance_id, self._config.docker_network)
        by_id = {c.id: c for c in owned}
        for session in await self._store.list_sessions():
            try:
                await self._recover_one(session, by_id)
            except Exception:
                log.exception("session %s: recovery failed; left for the sweep", session.id)
                await _quietly(
                    self._store.begin_ending(session.id, "recovery_failed"), "marking ending"
                )
        await self._remove_orphans(owned)

    async def _recover_one(self, session: Session, owned: dict[str, ContainerInfo]) -> None:
        info = owned.get(session.container_id or "")
        if session.state is SessionState.ENDING:
            await self.end(session, session.end_reason or "session_deleted")
            return
        if session.state is SessionState.STARTING:
            await self.end(session, CREATE_FAILED)
            return
        if info is None:
            await self.end(session, "recovered_gone")
            return
        if ttl.is_expired(session, self._clock()):
            await self.end(session, "ttl_expired")
            return
        if not info.running:
            info = await self._runtime.start(info.id, self._config.docker_network)
        listener = self._listener(session.id, session.user_id, session.ssh_port)
        try:
            await listener.bind(self._config.ssh_bind)
        except OSError as exc:
            listener = await self._move_port(session, exc)
        # the owner from here: if a step below fails, an end closes this listener
        live = self._live[session.id] = LiveSession(session, listener=listener, files_written=True)
        lookup = self._runtime.address_lookup(info.id, self._config.docker_network)
        listener.set_upstream(info.ip or session.container_ip or "", info.ssh_port, lookup)
        if info.ip and info.ip != session.container_ip:
            await self._store.mark_running(session.id, info.id, info.ip, info.gpu_uuid)
        if listener.port != session.ssh_port:
            await self._store.move_port(session.id, session.user_id, listener.port, self._clock())
            live.session = replace(session, ssh_port=listener.port)
            await _quietly(
                self._audit.session_event(
                    "session_port_moved", live.session, previous_ssh_port=session.ssh_port
                ),
                "audit",
            )
        self._start_timer(live)
        await _quietly(self._audit.session_event("session_recovered", live.session), "audit")
        log.info("session %s of %s recovered on port %d", session.id, session.user_id,
                 listener.port)  # fmt: skip
        if reason := await self._follow_task(live, live.session, info):  # replaced meanwhile?
            await self.end(live.session, reason)

    async def _move_port(self, session: Session, busy: OSError) -> SessionListener:
        """A listener on another free port for a session whose port another process took
        while the gateway was down: its container (and the user's jobs) keep running.

        Raises:
            NoPortAvailable: no other port is free either.
        """
        log.warning("session %s: port %d is taken (%s); moving it to another port",
                    session.id, session.ssh_port, busy)  # fmt: skip
        user = User(session.user_id, session.uid, None)
        return await self._bind_free_port(session.id, user)

    def stop_starting(self) -> None:
        """Gateway shutdown begins: cancel the starts in progress. Their creates roll back
        (answering 503 ``gateway_stopping``) while the database and Docker are still there,
        instead of holding the shutdown for up to ``--start-timeout``."""
        self._stopping = True
        for live in self._live.values():
            if live.starting is not None:
                live.starting.cancel()

    async def close(self) -> None:
        """Gateway shutdown: stop timers and background work, cut connections
        (``gateway_shutdown``) and close every listener. Sessions and containers stay for
        the next start."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        lives, self._live = list(self._live.values()), {}
        listeners = [live.listener for live in lives if live.listener is not None]
        connections = sum(listener.active for listener in listeners)
        await asyncio.gather(
            *(listener.close(CloseReason.GATEWAY_SHUTDOWN) for listener in listeners)
        )
        self._pipes.close()
        log.info(
            "shutdown: cut %d SSH connections (gateway_shutdown), closed %d session ports, "
            "stopped %d background tasks; %d sessions and their containers stay for the "
            "next start",
            connections, len(listeners), len(tasks), len(lives),
        )  # fmt: skip

    def _spawn(self, work: Awaitable[object], name: str, *, report: bool = True) -> asyncio.Task:
        """A named background task, referenced until it ends. Unless a caller awaits its
        outcome (``report=False``), a failure is logged when it ends: none dies silently."""
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        if report:
            task.add_done_callback(_report)
        return task


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task %s failed", task.get_name(), exc_info=exc)


def _error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, GatewayError) else GatewayError.code


def _ending(session_id: str) -> SessionEnding:
    return SessionEnding(f"session {session_id!r} is ending; its TTL can no longer change")


async def _cancel_and_wait(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (unless it is the caller) and wait until it has finished."""
    if task is None or task is asyncio.current_task():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _quietly(work: Awaitable[object], what: str) -> None:
    """Await best-effort work after the fact (audit, rollback): a failure is logged, never
    turned into the caller's error."""
    try:
        await work
    except Exception:
        log.exception("%s failed", what)


async def _ready(creds: Credentials) -> Credentials:
    return creds


async def _credentials(keys: tuple[str | None, tuple[str, ...]]) -> Credentials:
    return Credentials(*keys, *await asyncio.to_thread(new_password))
