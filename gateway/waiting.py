"""The waiting list: requests that found no free GPU wait as rows and start, fairly, when
capacity frees.

- **submit**: a ``wait`` request goes straight to :meth:`SessionManager.create` while
  nobody waits; when nothing fits (or others already wait) it is queued: a row holding
  the request and the public parts of its fresh credentials, which the 202 returns.
- **dequeue** (:meth:`WaitingList.step`, run whenever a session ends and at least every
  ``--reap-interval``): the queue in fair order (lowest decayed GPU usage, then
  submission); the first that fits starts; behind a head that does not fit, a request
  starts only if it ends before any capacity now held frees (it cannot delay the head).
- **start**: storing its session marks the row ``starting`` (off the list, still the user's);
  the row goes when the session runs. A create that fails (or a crash mid-start, which
  recovery ends as a failed create) puts it back with its submission time, deadline and
  credentials, in the transaction that deletes the session's row; after
  :data:`~gateway.core.fairshare.MAX_START_ATTEMPTS` failures it ends
  (``session_dequeue_failed``). A Swarm that places the task nowhere (``no_capacity``) is
  "nothing fits": the request goes back uncounted and is tried again when capacity frees,
  else after :data:`NO_CAPACITY_RETRY_SECONDS` (each try costs a service and up to
  ``--place-timeout``).
- **deadlines**: a request waiting past ``--queue-timeout`` ends (``queue_timeout``); a
  session started from the list with no connection within ``--claim-timeout`` ends
  (``not_claimed``); ``DELETE`` withdraws a waiting request.

Positions are computed from the rows on every read, so a restart keeps order and
positions. Bookings (a GPU for a time window) would be one more holder whose end the
backfill rule counts, and one more reason a head does not fit.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from gateway.audit import Audit
from gateway.budgets import Budgets
from gateway.config import Config
from gateway.core import fairshare, ttl
from gateway.core.fairshare import Waiting
from gateway.errors import (
    GatewayError,
    GatewayStopping,
    NoCapacity,
    NoGpuAvailable,
    NoPortAvailable,
    QuotaExceeded,
    SessionDeleted,
    SessionExists,
    SessionNotFound,
)
from gateway.metrics import Metrics
from gateway.models import CreatedSession, CreateRequest, QueuedRequest, Session, rfc3339
from gateway.sessions import SessionManager
from gateway.ssh.credentials import new_key_pair, new_password
from gateway.store import Store

log = logging.getLogger(__name__)

#: What "nothing fits" means: a ``wait`` request queues on these instead of failing.
_NO_ROOM = (NoGpuAvailable, NoPortAvailable, NoCapacity)
_NO_ROOM_LEFT = object()  # a start found nothing that fits
MIN_STEP_SECONDS = 0.5
#: A request no Swarm node took is tried again when capacity frees, else after this long.
NO_CAPACITY_RETRY_SECONDS = 30.0
CLOSE_GRACE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Queued:
    """A request just put on the waiting list, with the credentials its 202 shows once."""

    queued: QueuedRequest
    position: int
    private_key: str | None
    password: str


class WaitingList:
    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        budgets: Budgets,
        audit: Audit,
        metrics: Metrics,
        clock: Callable[[], datetime],
    ) -> None:
        self._config = config
        self._store = store
        self._budgets = budgets
        self._audit = audit
        self._metrics = metrics
        self._clock = clock
        self._manager: SessionManager | None = None
        self._wake = asyncio.Event()
        self._freed = 0  # capacity freed this many times: a step's view of it is stale
        self._step_lock = asyncio.Lock()
        self._starts: dict[str, asyncio.Task[bool]] = {}  # by request: its create
        #: requests no node took (Swarm), by id: ``_freed`` then, and when to try again
        self._no_node: dict[str, tuple[int, datetime]] = {}

    def attach(self, manager: SessionManager) -> None:
        self._manager = manager

    @property
    def manager(self) -> SessionManager:
        assert self._manager is not None, "attach() the session manager first"
        return self._manager

    @property
    def starting(self) -> int:
        """Starts from the list in progress (until their create returns)."""
        return len(self._starts)

    def wake(self) -> None:
        """Capacity may have freed: run a step soon. Called right after a GPU release,
        under the lock creates choose GPUs under, so a backfill's guard sees it."""
        self._freed += 1
        self._wake.set()

    # -- requests --------------------------------------------------------------------------

    async def submit(self, request: CreateRequest) -> CreatedSession | Queued:
        """Create the session, or with ``request.wait`` queue it when nothing fits.

        Raises:
            QuotaExceeded: the user's budget is spent (never queued).
            SessionExists: the user has a live session.
            TooManyQueued: the user has ``--max-queued-per-user`` requests waiting.
            GatewayError: whatever :meth:`SessionManager.create` raises.
        """
        if not request.wait:
            return await self.manager.create(request)
        no_node = False
        if not await self._store.queued():
            try:
                return await self.manager.create(request)
            except _NO_ROOM as exc:
                no_node = isinstance(exc, NoCapacity)
        return await self._enqueue(request, no_node=no_node)

    async def _enqueue(self, request: CreateRequest, *, no_node: bool) -> Queued:
        await self._budgets.precheck(request.user_id)
        if await self._store.session_of_user(request.user_id) is not None:
            raise SessionExists(f"user {request.user_id!r} already has a live session")
        private_key, public_keys = new_key_pair(request.public_keys)
        password, password_hash = await asyncio.to_thread(new_password)
        now = self._clock()
        await self._store.ensure_user(request.user_id, now)
        queued = QueuedRequest(
            id=str(uuid.uuid4()),
            request=request,
            submitted_at=now,
            expires_at=now + timedelta(seconds=self._config.queue_timeout),
            authorized_keys=public_keys,
            password_hash=password_hash,
        )
        if no_node:  # it just met no_capacity: not again at once
            self._hold_back(queued.id)
        await self._store.enqueue(queued, max_per_user=self._config.max_queued_per_user)
        position = await self.position(queued.id)
        await self._event("session_queued", queued, queue_position=position)
        log.info("request %s of %s queued at %s", queued.id, request.user_id, position)
        self._wake.set()  # it may fit ahead of a blocked head (nothing freed: no wake())
        return Queued(queued, position or 1, private_key, password)

    async def ordered(self) -> list[QueuedRequest]:
        """The waiting list in the order it starts."""
        rows = await self._store.queued()
        by_id = {q.id: q for q in rows}
        order = fairshare.queue_order(
            (Waiting(q.id, q.request.user_id, q.submitted_at) for q in rows),
            await self._budgets.decayed(),
        )
        return [by_id[w.id] for w in order]

    async def position(self, queued_id: str) -> int | None:
        """1 = next; None if it is not waiting (any more)."""
        try:
            return (await self.get(queued_id))[1]
        except SessionNotFound:
            return None

    async def get(self, queued_id: str) -> tuple[QueuedRequest, int]:
        """A waiting request and its position.

        Raises:
            SessionNotFound: it is not waiting.
        """
        for index, queued in enumerate(await self.ordered(), start=1):
            if queued.id == queued_id:
                return queued, index
        raise SessionNotFound(f"no session {queued_id!r}")

    async def withdraw(self, queued_id: str) -> bool:
        """Take a waiting request off the list (DELETE); False if it is not waiting."""
        queued = await self._store.get_queued(queued_id)
        if queued is None or not await self._store.withdraw(queued_id):
            return False
        await self._event("session_queue_withdrawn", queued, reason="session_deleted")
        return True

    # -- the scheduler ---------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: a step whenever woken, or at the next deadline, at least every
        ``--reap-interval``."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("waiting list step failed")
            timeout = await self._until_next_deadline()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

    async def _until_next_deadline(self) -> float:
        now = self._clock()
        deadlines = [q.expires_at for q in await self._store.queued()]
        deadlines += [s.claim_by for s in await self._store.list_sessions() if s.claim_by]
        deadlines += [retry_at for _, retry_at in self._no_node.values()]
        wait = self._config.reap_interval
        for deadline in deadlines:
            # a deadline a failed step left behind is retried, but never in a tight loop
            wait = min(wait, max((deadline - now).total_seconds() + 0.05, MIN_STEP_SECONDS))
        return wait

    async def step(self) -> None:
        """Time out waiting requests, end unclaimed sessions, start what fits; forget usage
        that no longer counts anywhere."""
        async with self._step_lock:
            await self._time_out()
            await self._check_claims()
            await self._dequeue()
            self._metrics.queue_length.set(len(await self._store.queued()))
            await self._store.prune_usage(self._clock() - self._budgets.memory)

    async def _time_out(self) -> None:
        now = self._clock()
        for queued in await self._store.queued():
            if queued.expires_at <= now and await self._store.withdraw(queued.id):
                log.info("request %s of %s timed out", queued.id, queued.request.user_id)
                await self._event("session_queue_timeout", queued, reason="queue_timeout")

    async def _check_claims(self) -> None:
        now = self._clock()
        for session in await self._store.list_sessions():
            if session.claim_by is None:
                continue
            open_now, last_open = self.manager.connection_activity(session.id)
            connected = open_now > 0 or last_open is not None
            if connected or await self._store.connections(session_id=session.id):
                await self._store.claimed(session.id)
            elif session.claim_by <= now:
                log.info("session %s of %s was not claimed", session.id, session.user_id)
                try:
                    await self.manager.end(session, "not_claimed")
                except GatewayError as exc:
                    log.warning("session %s: cleanup failed, will retry: %s", session.id, exc)

    async def _dequeue(self) -> None:
        sessions = await self._store.list_sessions()
        busy_users = {s.user_id for s in sessions}
        holding = [s.expires_at for s in sessions if s.gpu_uuid is not None]
        head_blocked = False
        now = self._clock()
        freed = self._freed
        ordered = await self.ordered()
        self._no_node = {q.id: self._no_node[q.id] for q in ordered if q.id in self._no_node}
        for queued in ordered:
            request = queued.request
            if request.user_id in busy_users:
                continue  # a later request of a user with a session: after it ends
            if queued.id in self._starts or self._held_back(queued.id):
                # its failed start is still rolling back, or no node took it (Swarm): it
                # blocks like a head that does not fit, and is tried again later
                head_blocked = True
                continue
            if head_blocked:
                end = ttl.expires_at(now, request.ttl_seconds)
                if not fairshare.may_backfill(end, holding):
                    continue
                started = await self._start(queued, self._guard(freed))
            else:
                freed = self._freed  # what the head's attempt finds free
                started = await self._start(queued, lambda: None)
                head_blocked = started is _NO_ROOM_LEFT
            if started is _NO_ROOM_LEFT and self._freed != freed:
                self._wake.set()  # capacity freed meanwhile: start over from the head
                return
            elif isinstance(started, Session):
                busy_users.add(request.user_id)
                if started.gpu_uuid is not None:
                    holding.append(started.expires_at)

    def _hold_back(self, queued_id: str) -> None:
        """No node took ``queued_id``: try it again when capacity frees, or after
        :data:`NO_CAPACITY_RETRY_SECONDS`."""
        retry_at = self._clock() + timedelta(seconds=NO_CAPACITY_RETRY_SECONDS)
        self._no_node[queued_id] = (self._freed, retry_at)

    def _held_back(self, queued_id: str) -> bool:
        held = self._no_node.get(queued_id)
        if held is None:
            return False
        freed, retry_at = held
        if freed == self._freed and self._clock() < retry_at:
            return True
        del self._no_node[queued_id]
        return False

    def _guard(self, freed: int) -> Callable[[], None]:
        """A backfill's guard: refuse if capacity freed since the head found none (the head
        may fit now, and goes first)."""

        def check() -> None:
            if self._freed != freed:
                raise NoGpuAvailable("capacity freed: the head of the waiting list goes first")

        return check

    async def _start(self, queued: QueuedRequest, guard: Callable[[], None]) -> Session | object:
        """Start ``queued`` in the background: the reserved session once GPU, port and row
        are, :data:`_NO_ROOM_LEFT` if nothing fits it (it stays queued), or None when it
        could not start for another reason (see :meth:`_create`)."""
        reserved: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._create(queued, reserved, guard), name=f"dequeue:{queued.id}"
        )
        self._starts[queued.id] = task

        def done(_: object) -> None:  # a failed start is back on the list: step again
            self._starts.pop(queued.id, None)
            self._wake.set()

        task.add_done_callback(done)
        await asyncio.wait({reserved, task}, return_when=asyncio.FIRST_COMPLETED)
        if reserved.done():
            return reserved.result()
        return _NO_ROOM_LEFT if task.result() else None

    async def _create(
        self,
        queued: QueuedRequest,
        reserved: asyncio.Future[Session],
        guard: Callable[[], None],
    ) -> bool:
        """Create the session of ``queued`` (``reserved`` is set once its row is stored);
        True if nothing fits it. A budget now spent takes it off the list (audited); a start
        that failed puts it back, counted (:meth:`Store.start_failed`, or with its row's
        deletion once stored); a user who has a session meanwhile leaves it waiting."""
        request = queued.request
        try:
            created = await self.manager.create(
                request, queued=queued, reserved=reserved.set_result, guard=guard
            )
        except _NO_ROOM as exc:
            if isinstance(exc, NoCapacity):
                log.info("request %s of %s: %s", queued.id, request.user_id, exc.log_message)
                self._hold_back(queued.id)
            return True
        except (SessionExists, SessionDeleted, GatewayStopping):
            return False  # it waits on; or it was withdrawn, or the gateway stops: as stored
        except QuotaExceeded as exc:
            if await self._store.withdraw(queued.id):
                await self._event("session_quota_exceeded", queued, **exc.details)
            return False
        except GatewayError as exc:
            log.warning("request %s of %s did not start: %s", queued.id, request.user_id, exc)
            if not reserved.done():  # no row was stored, whose deletion would count it
                saved = await self._store.start_failed(queued.id, self._clock(), exc.code)
                self._audit.stored([saved] if saved is not None else [])
            return False
        waited = (created.session.created_at - queued.submitted_at).total_seconds()
        self._metrics.queue_wait_seconds.observe(max(waited, 0.0))
        await self._event(
            "session_dequeued",
            queued,
            waited_seconds=round(waited),
            ssh_port=created.session.ssh_port,
            gpu_uuid=created.session.gpu_uuid,
            expires_at=rfc3339(created.session.expires_at),
        )
        return False

    async def close(self) -> None:
        """Wait (at most :data:`CLOSE_GRACE_SECONDS`) for starts in progress, which the
        shutdown cancelled (:meth:`SessionManager.stop_starting`), to roll back and put
        their requests back on the list; cancel what is left (recovery finishes it)."""
        starts = list(self._starts.values())
        if starts:
            await asyncio.wait(starts, timeout=CLOSE_GRACE_SECONDS)
        for task in starts:
            task.cancel()
        await asyncio.gather(*starts, return_exceptions=True)

    async def _event(self, event: str, queued: QueuedRequest, **data: object) -> None:
        try:
            await self._audit.user_event(
                event, session_id=queued.id, user_id=queued.request.user_id, **data
            )
        except Exception:
            log.exception("audit of %s failed", event)
