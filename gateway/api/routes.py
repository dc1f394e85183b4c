"""HTTP handlers: thin translations between requests and the session orchestrator."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.api.keys import CONFIG, GPUS, RUNTIME, SESSIONS, STORE
from gateway.api.schemas import parse_create
from gateway.api.views import created_view, session_view
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 3.0
SERVICE = "gpu-ssh-gateway-orchestrator"

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    failing: dict[str, str] = {}
    for name, check in (
        ("database", request.app[STORE].ping),
        ("docker", request.app[RUNTIME].ping),
    ):
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await check()
        except (GatewayError, OSError, TimeoutError, Exception) as exc:
            failing[name] = str(exc) or type(exc).__name__
    if failing:
        return web.json_response(
            {"status": "degraded", "service": SERVICE, "failing": failing}, status=503
        )
    return web.json_response({"status": "healthy", "service": SERVICE})


@routes.post("/sessions")
async def create_session(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    create = parse_create(await request.read(), config)
    created = await request.app[SESSIONS].create(create)
    return web.json_response(created_view(created, config), status=201)


@routes.get("/sessions")
async def list_sessions(request: web.Request) -> web.Response:
    manager = request.app[SESSIONS]
    return web.json_response(
        [session_view(s, manager.active_connections(s.id)) for s in await manager.list()]
    )


@routes.get("/sessions/{session_id}")
async def get_session(request: web.Request) -> web.Response:
    manager = request.app[SESSIONS]
    session = await manager.get(request.match_info["session_id"])
    return web.json_response(session_view(session, manager.active_connections(session.id)))


@routes.delete("/sessions/{session_id}")
async def delete_session(request: web.Request) -> web.Response:
    session_id = request.match_info["session_id"]
    await request.app[SESSIONS].delete(session_id)
    return web.json_response({"message": f"session {session_id} deleted"})


@routes.delete("/sessions")
async def delete_all_sessions(request: web.Request) -> web.Response:
    deleted = await request.app[SESSIONS].delete_all()
    return web.json_response({"message": f"{deleted} session(s) deleted", "deleted": deleted})


@routes.get("/gpus")
async def list_gpus(request: web.Request) -> web.Response:
    gpus = await request.app[GPUS].gpus_view(await request.app[STORE].allocated_gpus())
    return web.json_response({"gpus": gpus, "count": len(gpus)})


@routes.get("/gpus/profiles")
async def list_profiles(request: web.Request) -> web.Response:
    return web.json_response({"profiles": await request.app[GPUS].profiles_view()})


@routes.get("/gpus/available")
async def list_available(request: web.Request) -> web.Response:
    available = await request.app[GPUS].available_view(await request.app[STORE].allocated_gpus())
    return web.json_response({"available_instances": available, "count": len(available)})
