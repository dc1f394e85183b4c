"""HTTP handlers: thin translations between requests and the session orchestrator."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from gateway.api.keys import (
    AUDIT,
    BUDGETS,
    CONFIG,
    GPUS,
    IDENTITY,
    IDLE,
    METRICS,
    RUNTIME,
    SESSIONS,
    STORE,
    WAITING,
)
from gateway.api.schemas import parse_audit_query, parse_create, parse_limits, parse_patch
from gateway.api.views import (
    available_view,
    created_view,
    enqueued_view,
    gpu_view,
    node_view,
    profile_view,
    queued_view,
    session_view,
    unhealthy_gpu_view,
    usage_view,
)
from gateway.audit import connection_data, event_data
from gateway.core.validation import validate_user_id
from gateway.errors import GatewayError, QuotaExceeded, RequestTimeout, SessionNotFound
from gateway.gpu.allocator import GpuAllocator
from gateway.metrics import CONTENT_TYPE
from gateway.models import CreatedSession, Session

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 3.0
SERVICE = "gpu-ssh-gateway-orchestrator"

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """200 healthy; 200 degraded with ``unhealthy_gpus`` when NVML fails on some GPUs (the
    others are served); 503 degraded when the database, Docker or NVML as a whole fails.
    The route is public: it names the failing dependency and whether it failed or timed
    out; the exception's text (socket paths, SQL, driver messages) goes to the log only.
    With GPUs, ``gpu_path`` says whether Docker hands them over through CDI and whether MIG
    instances made after its CDI spec can start (versions and paths: the log, the probe)."""
    failing: dict[str, str] = {}
    unhealthy: list[dict[str, object]] = []
    details: dict[str, object] = {}

    async def gpus() -> None:
        allocator = request.app[GPUS]
        if allocator.needs_device_request:  # how Docker hands GPUs over (CDI or the hook)
            path = await request.app[RUNTIME].gpu_path()
            details["gpu_path"] = {
                "through_cdi": path.through_cdi,
                "delivery": path.delivery,
                "late_instances_start": path.warning is None,
            }
        inventory = await allocator.health_inventory()
        unhealthy.extend(unhealthy_gpu_view(gpu) for gpu in inventory if not gpu.healthy)

    for name, check in (
        ("database", request.app[STORE].ping),
        ("docker", request.app[RUNTIME].ping),
        ("gpus", gpus),
    ):
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await check()
        except TimeoutError:
            log.warning("healthz: %s did not answer within %g s", name, HEALTH_TIMEOUT)
            failing[name] = "timeout"
        except Exception as exc:  # whatever fails, that dependency is degraded
            detail = exc.log_message if isinstance(exc, GatewayError) else repr(exc)
            log.warning("healthz: %s failed: %s", name, detail)  # one line per probe
            failing[name] = "unavailable"
    if failing:
        return web.json_response(
            {"status": "degraded", "service": SERVICE, "failing": failing, **details}, status=503
        )
    if unhealthy:
        return web.json_response(
            {"status": "degraded", "service": SERVICE, "unhealthy_gpus": unhealthy, **details}
        )
    return web.json_response({"status": "healthy", "service": SERVICE, **details})


@routes.get("/ssh/known_hosts")
async def known_hosts(request: web.Request) -> web.Response:
    """The host CA line for ``~/.ssh/known_hosts`` (public: it holds only a public key)."""
    return web.Response(text=request.app[IDENTITY].known_hosts_line + "\n")


async def _body(request: web.Request) -> bytes:
    """The request body, read within ``--http-timeout`` (a body dribbled byte by byte
    must not hold a handler for ever).

    Raises:
        RequestTimeout: it did not arrive in time.
    """
    try:
        async with asyncio.timeout(request.app[CONFIG].http_timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time") from None


async def _view(request: web.Request, session: Session) -> dict[str, Any]:
    active = request.app[SESSIONS].active_connections(session.id)
    node = request.app[RUNTIME].node_of(session.container_id or "")
    view = session_view(session, active, request.app[CONFIG], request.app[IDENTITY], node=node)
    return {**view, "idle": await request.app[IDLE].view(session)}


@routes.post("/sessions")
async def create_session(request: web.Request) -> web.Response:
    """201 with the session; with ``wait`` and nothing free, 202 ``queued``; 403
    ``quota_exceeded`` when the user's GPU-hour budget is spent (audited, counted)."""
    config = request.app[CONFIG]
    create = parse_create(await _body(request), config)
    try:
        result = await request.app[WAITING].submit(create)
    except QuotaExceeded as exc:
        await _quota_refused(request, create.user_id, None, exc)
        raise
    identity = request.app[IDENTITY]
    if isinstance(result, CreatedSession):
        return web.json_response(created_view(result, config, identity), status=201)
    return web.json_response(enqueued_view(result, config, identity), status=202)


async def _quota_refused(
    request: web.Request, user_id: str, session_id: str | None, exc: QuotaExceeded
) -> None:
    """Count and audit a budget's refusal (``quota_exceeded``)."""
    request.app[METRICS].quota_refusals.inc()
    await request.app[AUDIT].user_event(
        "quota_exceeded", session_id=session_id, user_id=user_id, **exc.details
    )


@routes.get("/queue")
async def list_queue(request: web.Request) -> web.Response:
    """The waiting list in the order it starts."""
    config, identity = request.app[CONFIG], request.app[IDENTITY]
    ordered = await request.app[WAITING].ordered()
    views = [queued_view(q, i, config, identity) for i, q in enumerate(ordered, start=1)]
    return web.json_response({"queue": views, "count": len(views)})


@routes.get("/users/{user_id}/usage")
async def user_usage(request: web.Request) -> web.Response:
    user_id = validate_user_id(request.match_info["user_id"])
    return web.json_response(usage_view(await request.app[BUDGETS].usage(user_id)))


@routes.put("/users/{user_id}/limits")
async def set_user_limits(request: web.Request) -> web.Response:
    """Set one user's GPU-hours per week (null: the gateway's default); answers the usage."""
    user_id = validate_user_id(request.match_info["user_id"])
    hours = parse_limits(await _body(request))
    budgets = request.app[BUDGETS]
    await budgets.set_limit(user_id, hours)
    await request.app[AUDIT].user_event(
        "user_limits_set", session_id=None, user_id=user_id, gpu_hours_per_week=hours
    )
    return web.json_response(usage_view(await budgets.usage(user_id)))


@routes.get("/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    sessions = await request.app[SESSIONS].list()
    return web.json_response([await _view(request, s) for s in sessions])


@routes.get("/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    """A session, or a request still waiting (``state: "queued"``, ``queue_position``)."""
    session_id = request.match_info["session_id"]
    try:
        session = await request.app[SESSIONS].get(session_id)
    except SessionNotFound:
        queued, position = await request.app[WAITING].get(session_id)
        view = queued_view(queued, position, request.app[CONFIG], request.app[IDENTITY])
        return web.json_response(view)
    return web.json_response(await _view(request, session))


@routes.patch("/sessions/{session_id}")
async def extend_session(request: web.Request) -> web.Response:
    change = parse_patch(await _body(request))
    manager, session_id = request.app[SESSIONS], request.match_info["session_id"]
    if change.idle_hold_minutes is not None:
        await request.app[IDLE].hold(session_id, change.idle_hold_minutes)
        session = await manager.get(session_id)
    else:
        try:
            session = await manager.extend(
                session_id,
                new_total_seconds=change.new_total_seconds,
                extend_seconds=change.extend_seconds,
            )
        except QuotaExceeded as exc:
            user_id = (await manager.get(session_id)).user_id
            await _quota_refused(request, user_id, session_id, exc)
            raise
    return web.json_response(await _view(request, session))


@routes.get("/sessions/{session_id}/connections")
async def list_connections(request: web.Request) -> web.Response:
    """Live and ended connections of a session; kept after the session has ended."""
    session_id = request.match_info["session_id"]
    records = await request.app[STORE].connections(session_id=session_id)
    if not records and await request.app[STORE].get_session(session_id) is None:
        raise SessionNotFound(f"no session {session_id!r}")
    return web.json_response(
        {"connections": [connection_data(r) for r in records], "count": len(records)}
    )


@routes.get("/audit")
async def list_audit(request: web.Request) -> web.Response:
    """Audit events, newest first; pass ``next_cursor`` back as ``cursor`` for more."""
    query = parse_audit_query(request.query)
    events = await request.app[STORE].events(
        user_id=query.user_id,
        session_id=query.session_id,
        since=query.since,
        until=query.until,
        before_id=query.before_id,
        limit=query.limit,
    )
    more = len(events) == query.limit
    return web.json_response(
        {
            "events": [event_data(e) for e in events],
            "next_cursor": str(events[-1].id) if events and more else None,
        }
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    app_metrics = request.app[METRICS]
    manager = request.app[SESSIONS]
    app_metrics.sessions_live.set(manager.live_sessions)
    app_metrics.connections_live.set(manager.live_connections)
    app_metrics.queue_length.set(len(await request.app[STORE].queued()))
    free, used = await _gpu_slices(request.app[GPUS], await request.app[STORE].allocated_gpus())
    app_metrics.gpu_slices.labels("free").set(free)
    app_metrics.gpu_slices.labels("used").set(used)
    response = web.Response(body=app_metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def _gpu_slices(gpus: GpuAllocator, allocated: set[str]) -> tuple[int, int]:
    free = len(await gpus.available(allocated))
    return free, len(allocated)


@routes.delete("/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    if await request.app[WAITING].withdraw(session_id):
        return web.json_response({"message": f"queued request {session_id} withdrawn"})
    await request.app[SESSIONS].delete(session_id)
    return web.json_response({"message": f"session {session_id} deleted"})


@routes.delete("/sessions")
async def delete_all_sessions(request: web.Request) -> web.Response:
    """End every session and withdraw every waiting request (which would start next)."""
    waiting = request.app[WAITING]
    withdrawn = [await waiting.withdraw(q.id) for q in await request.app[STORE].queued()]
    deleted = await request.app[SESSIONS].delete_all()
    return web.json_response(
        {
            "message": f"{deleted} session(s) deleted",
            "deleted": deleted,
            "withdrawn": sum(withdrawn),
        }
    )


@routes.get("/gpus")
async def list_gpus(request: web.Request) -> web.Response:
    allocated = await request.app[STORE].allocated_gpus()
    allocator = request.app[GPUS]
    to_destroy = allocator.to_destroy()
    gpus = [gpu_view(gpu, allocated, to_destroy) for gpu in await allocator.inventory()]
    return web.json_response({"gpus": gpus, "count": len(gpus)})


@routes.get("/gpus/profiles")
async def list_profiles(request: web.Request) -> web.Response:
    profiles = [profile_view(p) for p in await request.app[GPUS].profiles()]
    return web.json_response({"profiles": profiles})


@routes.get("/gpus/available")
async def list_available(request: web.Request) -> web.Response:
    free = await request.app[GPUS].available(await request.app[STORE].allocated_gpus())
    available = [available_view(item) for item in free]
    return web.json_response({"available_instances": available, "count": len(available)})


@routes.get("/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    """The machines sessions can run on: this one with plain Docker; the Swarm's nodes,
    with their state and GPU slices (generic resources), with ``--runtime swarm``."""
    nodes = [node_view(node) for node in await request.app[RUNTIME].nodes()]
    return web.json_response({"nodes": nodes, "count": len(nodes)})
