"""The session orchestrator: the only place that sequences store, runtime, GPU and relay.

It owns time and rollback. ``create`` reserves a row, a port (by binding its listener)
and a GPU under one lock, then starts the container under ``--start-timeout``; every
step registers its undo, so any failure unwinds in reverse and re-raises a typed error.
``end`` is the single cleanup path (DELETE, TTL timer or sweep, vanished container,
restart recovery): connections and listener, container, GPU, row — in that order.
Each live session has a timer task that warns the user's terminals before expiry and
ends the session at ``expires_at``; the periodic sweep is the backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

from gateway import session_files
from gateway.config import Config
from gateway.core import ttl
from gateway.errors import (
    ContainerStartFailed,
    GatewayError,
    InvalidTtl,
    NoPortAvailable,
    SessionNotFound,
)
from gateway.gpu.allocator import GpuAllocator
from gateway.metrics import Metrics
from gateway.models import (
    CloseReason,
    CreatedSession,
    CreateRequest,
    Credentials,
    Session,
    SessionState,
    User,
    rfc3339,
    utcnow,
)
from gateway.relay import RelayLimits, SessionListener
from gateway.relay.audit import Audit
from gateway.runtime.base import (
    LABEL_INSTANCE,
    LABEL_SESSION,
    LABEL_USER,
    SSHD_CAPABILITIES,
    ContainerFile,
    ContainerSpec,
    Runtime,
)
from gateway.ssh.credentials import new_credentials
from gateway.ssh.identity import HostIdentity
from gateway.ssh.probe import Probe, probe_sshd
from gateway.store import Store

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
READY_POLL_SECONDS = 0.1
TTY_GROUP = 5  # wall writes to ptys of mode 0620, group tty; root here lacks DAC_OVERRIDE

#: How an ending session closes its live connections, by why it ends.
_CONNECTION_REASON = {
    "ttl_expired": CloseReason.TTL_EXPIRED,
    "session_deleted": CloseReason.SESSION_DELETED,
    "container_gone": CloseReason.SERVER_CLOSED,
}
#: The audit event of a session ending, by why it ends.
_END_EVENT = {"ttl_expired": "session_expired", "session_deleted": "session_deleted"}


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
    ) -> None:
        self._config = config
        self._identity = identity
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
        self._listeners: dict[str, SessionListener] = {}
        self._timers: dict[str, asyncio.Task[None]] = {}
        self._ending: dict[str, asyncio.Task[None]] = {}
        self._reserve_lock = asyncio.Lock()

    # -- queries ---------------------------------------------------------------------------

    async def get(self, session_id: str) -> Session:
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}")
        return session

    async def list(self) -> list[Session]:
        return await self._store.list_sessions()

    def active_connections(self, session_id: str) -> int:
        listener = self._listeners.get(session_id)
        return listener.active if listener else 0

    @property
    def live_sessions(self) -> int:
        return len(self._listeners)

    @property
    def live_connections(self) -> int:
        return sum(listener.active for listener in self._listeners.values())

    # -- create ----------------------------------------------------------------------------

    async def create(self, request: CreateRequest) -> CreatedSession:
        """Start a session and return it once its sshd answers through the session port.

        Raises:
            SessionExists, NoPortAvailable, NoGpuAvailable, ...: nothing was created.
            ContainerStartFailed: the container did not answer SSH within the start
                timeout; container, port, GPU and row were released.
        """
        started = time.monotonic()
        creds = await asyncio.to_thread(new_credentials, request.public_keys)
        async with contextlib.AsyncExitStack() as undo:
            session, listener = await self._reserve(request, creds.public_keys, undo)
            try:
                async with asyncio.timeout(self._config.start_timeout):
                    session = await self._start_container(session, creds, listener, undo)
            except TimeoutError:
                raise ContainerStartFailed(
                    f"the session container did not answer SSH within "
                    f"{self._config.start_timeout:g} s"
                ) from None
            undo.pop_all()
        self._metrics.create_seconds.observe(time.monotonic() - started)
        self._start_timer(session)
        await self._audit.session_event(
            "session_created", session, image=session.image, ttl_seconds=session.ttl_seconds
        )
        log.info(
            "session %s created for %s on port %d (gpu %s)",
            session.id, session.user_id, session.ssh_port, session.gpu_uuid,
        )  # fmt: skip
        return CreatedSession(session=session, credentials=creds)

    async def _reserve(
        self,
        request: CreateRequest,
        authorized_keys: tuple[str, ...],
        undo: contextlib.AsyncExitStack,
    ) -> tuple[Session, SessionListener]:
        """Reserve user uid, GPU, port and row atomically with respect to other creates."""
        session_id = str(uuid.uuid4())
        now = self._clock().replace(microsecond=0)  # so the shown expires_at is exact
        async with self._reserve_lock:
            user = await self._store.ensure_user(request.user_id, now)
            allocation = await self._gpus.allocate(request, await self._store.allocated_gpus())
            if allocation.created:
                _push_undo(undo, "GPU release", lambda: self._gpus.release(allocation))
            listener = await self._bind_free_port(session_id, user)
            _push_undo(undo, "listener close", listener.close)
            session = Session(
                id=session_id,
                user_id=request.user_id,
                uid=user.uid,
                ssh_port=listener.port,
                image=request.image,
                workspace=str(self._config.workspace_root / request.user_id),
                ttl_seconds=request.ttl_seconds,
                created_at=now,
                expires_at=ttl.expires_at(now, request.ttl_seconds),
                gpu_uuid=allocation.uuid,
                mig_profile=allocation.profile,
                gpu_created=allocation.created,
                authorized_keys=authorized_keys,
            )
            await self._store.insert_session(session)
            _push_undo(undo, "row delete", lambda: self._store.delete_session(session_id))
        return session, listener

    def _listener(self, session_id: str, user_id: str, port: int) -> SessionListener:
        return SessionListener(
            session_id, user_id, port, limits=self._limits, observer=self._audit, clock=self._clock
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

    async def _start_container(
        self,
        session: Session,
        creds: Credentials,
        listener: SessionListener,
        undo: contextlib.AsyncExitStack,
    ) -> Session:
        workspace = Path(session.workspace)
        await asyncio.to_thread(_prepare_workspace, workspace, session.uid)
        spec = self._container_spec(session)
        container_id = await self._runtime.create(spec)
        _push_undo(undo, "container remove", lambda: self._runtime.remove(container_id))
        await self._store.set_container(session.id, container_id)
        await self._runtime.put_files(container_id, self._container_files(session, creds))
        info = await self._runtime.start(container_id, self._config.docker_network)
        if info.ip is None:
            raise ContainerStartFailed(
                f"the session container has no address on network {self._config.docker_network}"
            )
        await self._wait_ready(session, container_id, (info.ip, info.ssh_port))
        listener.set_upstream(info.ip, info.ssh_port)
        await self._store.mark_running(session.id, container_id, info.ip)
        self._listeners[session.id] = listener
        return replace(
            session, state=SessionState.RUNNING, container_id=container_id, container_ip=info.ip
        )

    def _container_files(self, session: Session, creds: Credentials) -> list[ContainerFile]:
        """Host key and certificate, expiring authorized keys, password hash, session facts."""
        issued = utcnow()  # clients check validity against their wall clocks, so use ours
        keys = self._identity.certify(
            session.user_id,
            session.id,
            valid_after=issued - session_files.CERT_BACKDATE,
            valid_before=issued
            + timedelta(minutes=self._config.max_ttl_minutes)
            + session_files.CERT_MARGIN,
        )
        files = session_files.host_key_files(keys)
        if self._config.ssh_password_auth:
            files.append(session_files.password_file(creds.password_hash))
        return files + session_files.expiring_files(session, self._config)

    def _container_spec(self, session: Session) -> ContainerSpec:
        user = session.user_id
        env = {
            "SANDMAN_USER": user,
            "SANDMAN_UID": str(session.uid),
            "SANDMAN_GID": str(session.uid),
            "SANDMAN_PASSWORD_AUTH": "yes" if self._config.ssh_password_auth else "no",
            **self._gpus.container_env(session.gpu_uuid),
        }
        return ContainerSpec(
            name=f"sandman-{user}-{session.id[:8]}",
            image=session.image,
            hostname=f"{user}-{session.id[:8]}",
            env=env,
            labels={
                LABEL_SESSION: session.id,
                LABEL_USER: user,
                LABEL_INSTANCE: self._instance_id,
            },
            workspace=Path(session.workspace),
            home=f"/home/{user}",
            network=self._config.docker_network,
            pids_limit=self._config.pids_limit,
            gpu_uuid=session.gpu_uuid,
            device_request=self._gpus.needs_device_request and session.gpu_uuid is not None,
            cap_add=SSHD_CAPABILITIES,
        )

    async def _wait_ready(
        self, session: Session, container_id: str, address: tuple[str, int]
    ) -> None:
        """Return once the container's own sshd answers on ``address`` with this session's
        certified host key (checked directly, not through the session port, so no user
        connection is recorded).

        Raises:
            ContainerStartFailed: the container exited before answering, or another
                SSH server answered at its address.
        """
        known_hosts = self._identity.session_known_hosts(session.id)
        alias = self._identity.session_principal(session.id)
        while True:
            probe = await probe_sshd(*address, known_hosts=known_hosts, alias=alias)
            if probe is Probe.READY:
                return
            if probe is Probe.WRONG_HOST:
                raise ContainerStartFailed(
                    "an SSH server without this session's host key answered at the "
                    "container's address",
                    log_message=f"container {container_id[:12]} at {address}: wrong host key",
                )
            info = await self._runtime.inspect(container_id, self._config.docker_network)
            if info is None or not info.running:
                tail = await self._runtime.logs(container_id)
                raise ContainerStartFailed(
                    "the session container exited before its SSH server started",
                    log_message=f"container {container_id[:12]} exited; log tail:\n{tail}",
                )
            await asyncio.sleep(READY_POLL_SECONDS)

    # -- time ------------------------------------------------------------------------------

    async def extend(
        self, session_id: str, *, new_total_seconds: int | None, extend_seconds: int | None
    ) -> Session:
        """Change the session's TTL (counted from creation); its timer and warnings move.

        Raises:
            SessionNotFound: no such session.
            InvalidTtl: beyond ``--max-ttl-minutes``, or ending in the past.
        """
        session = await self.get(session_id)
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
        updated = replace(session, ttl_seconds=total, expires_at=expires)
        if session.container_id:  # authorized keys expire with the session: move them first
            files = session_files.expiring_files(updated, self._config)
            await self._runtime.put_files(session.container_id, files)
        await self._store.update_ttl(session.id, total, expires)
        timer = self._timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
            self._start_timer(updated)
        await self._audit.session_event(
            "session_extended", updated, previous_expires_at=rfc3339(session.expires_at)
        )
        return updated

    def _start_timer(self, session: Session) -> None:
        self._timers[session.id] = asyncio.create_task(
            self._expire_on_time(session), name=f"ttl:{session.id}"
        )

    async def _sleep_until(self, moment: datetime) -> None:
        await asyncio.sleep(max(0.0, (moment - self._clock()).total_seconds()))

    async def _expire_on_time(self, session: Session) -> None:
        """Warn the user's terminals at the configured offsets, then end the session at
        ``expires_at`` (within the event loop's timer precision)."""
        now = self._clock()
        for moment in ttl.warning_schedule(session.expires_at, self._config.expiry_warnings, now):
            await self._sleep_until(moment)
            await self._warn(session)
        await self._sleep_until(session.expires_at)
        try:
            await self.end(session, "ttl_expired")
        except GatewayError as exc:
            log.warning("session %s: expiry failed, the sweep retries: %s", session.id, exc)

    async def _warn(self, session: Session) -> None:
        if not session.container_id:
            return
        message = ttl.warning_message(session.expires_at, self._clock())
        try:
            await self._runtime.exec(session.container_id, ["wall", message], user=f"0:{TTY_GROUP}")
        except GatewayError as exc:
            log.warning("session %s: expiry warning failed: %s", session.id, exc.log_message)

    # -- end -------------------------------------------------------------------------------

    async def delete(self, session_id: str) -> None:
        """End the session now.

        Raises:
            SessionNotFound: no such session.
        """
        await self.end(await self.get(session_id), "session_deleted")

    async def delete_all(self) -> int:
        sessions = await self.list()
        results = await asyncio.gather(
            *(self.end(s, "session_deleted") for s in sessions), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(sessions)

    async def end(self, session: Session, reason: str) -> None:
        """Clean one session up: connections and listener, container, GPU, row.

        Concurrent calls for one session share a single cleanup. If a step fails
        (e.g. Docker unreachable) the row stays, so the next sweep retries.
        """
        task = self._ending.get(session.id)
        if task is None:
            task = asyncio.create_task(self._end(session, reason), name=f"end:{session.id}")
            self._ending[session.id] = task
            task.add_done_callback(lambda _: self._ending.pop(session.id, None))
        await asyncio.shield(task)

    async def _end(self, session: Session, reason: str) -> None:
        timer = self._timers.pop(session.id, None)
        if timer is not None:
            timer.cancel()
        listener = self._listeners.pop(session.id, None)
        if listener is not None:
            await listener.close(_CONNECTION_REASON.get(reason, CloseReason.SESSION_DELETED))
        if session.container_id:
            await self._runtime.remove(session.container_id)
        if session.gpu_uuid:
            await self._gpus.release_session(session)
        await self._store.delete_session(session.id)
        await self._audit.session_event(
            _END_EVENT.get(reason, "session_ended"), session, reason=reason
        )
        log.info("session %s of %s ended: %s", session.id, session.user_id, reason)

    async def sweep(self) -> int:
        """End every expired session and every session whose container is gone; prune
        audit records past their retention."""
        ended = 0
        for session in await self._store.list_sessions():
            reason = await self._due_reason(session)
            if reason is None:
                continue
            try:
                await self.end(session, reason)
                ended += 1
            except GatewayError as exc:
                log.warning("session %s: cleanup failed, will retry: %s", session.id, exc)
        retention = timedelta(days=self._config.audit_retention_days)
        await self._store.prune_audit(self._clock() - retention)
        return ended

    async def _due_reason(self, session: Session) -> str | None:
        if ttl.is_expired(session, self._clock()):
            return "ttl_expired"
        if session.state is SessionState.RUNNING and session.container_id:
            info = await self._runtime.inspect(session.container_id, self._config.docker_network)
            if info is None or not info.running:
                return "container_gone"
        return None

    # -- restart ---------------------------------------------------------------------------

    async def recover(self) -> None:
        """Adopt what the database says is live; clean what is not; remove orphans.

        Runs once at start, before the API serves. Connection records a crash left
        open are closed with reason ``error``.
        """
        await self._store.end_open_connections(self._clock())
        sessions = await self._store.list_sessions()
        owned = {
            c.id: c
            for c in await self._runtime.list_owned(self._instance_id, self._config.docker_network)
        }
        for session in sessions:
            info = owned.get(session.container_id or "")
            if session.state is not SessionState.RUNNING or info is None:
                await self.end(session, "recovered_gone")
                continue
            if ttl.is_expired(session, self._clock()):
                await self.end(session, "ttl_expired")
                continue
            if not info.running:
                info = await self._runtime.start(info.id, self._config.docker_network)
            listener = self._listener(session.id, session.user_id, session.ssh_port)
            try:
                await listener.bind(self._config.ssh_bind)
            except OSError as exc:
                log.error(
                    "session %s: cannot re-open port %d: %s", session.id, session.ssh_port, exc
                )
                await self.end(session, "recovered_port_busy")
                continue
            listener.set_upstream(info.ip or session.container_ip or "", info.ssh_port)
            self._listeners[session.id] = listener
            if info.ip and info.ip != session.container_ip:
                await self._store.mark_running(session.id, info.id, info.ip)
            self._start_timer(session)
            await self._audit.session_event("session_recovered", session)
            log.info("session %s of %s recovered on port %d", session.id, session.user_id,
                     session.ssh_port)  # fmt: skip
        known = {s.container_id for s in sessions}
        for container in owned.values():
            if container.id not in known:
                log.info("removing orphan container %s (%s)", container.name, container.id[:12])
                await self._runtime.remove(container.id)

    async def close(self) -> None:
        """Gateway shutdown: stop the timers, cut connections (``gateway_shutdown``) and
        close every listener. Sessions and containers stay for the next start."""
        timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        listeners, self._listeners = list(self._listeners.values()), {}
        await asyncio.gather(
            *(listener.close(CloseReason.GATEWAY_SHUTDOWN) for listener in listeners)
        )


def _push_undo(
    stack: contextlib.AsyncExitStack, what: str, undo: Callable[[], Awaitable[object]]
) -> None:
    async def run() -> None:
        try:
            await undo()
        except Exception:
            log.exception("rollback step failed: %s", what)

    stack.push_async_callback(run)


def _prepare_workspace(path: Path, uid: int) -> None:
    """Create the user's workspace owned by ``uid`` (gid = uid), keeping what it holds."""
    path.mkdir(parents=True, exist_ok=True)
    stat = path.stat()
    if (stat.st_uid, stat.st_gid) != (uid, uid):
        os.chown(path, uid, uid)
    path.chmod(0o750)
