"""The application factory: every resource is one cleanup-context entry, in dependency order.

Start-up opens the database, resolves the API token and the SSH host CA, opens the audit
trail and metrics, connects to Docker (creating the session network), opens the GPU
backend (refusing a default MIG profile this host lacks, reclaiming MIG instances it made
that no session holds), recovers sessions (before serving), and starts the TTL sweeper,
the idle sampler and the waiting list (which starts queued requests as capacity frees).
Shutdown undoes that in reverse; sessions and containers stay.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api import admin_page, keys, middleware, openapi
from gateway.api.access_log import AccessLogger
from gateway.api.routes import routes
from gateway.audit import Audit
from gateway.budgets import Budgets
from gateway.config import Config
from gateway.errors import ApiTokenUnavailable
from gateway.gpu import open_backend
from gateway.gpu.allocator import GpuAllocator
from gateway.gpu.base import GpuBackend
from gateway.idle_reclaim import IdleReclaimer
from gateway.metrics import Metrics
from gateway.models import utcnow
from gateway.runtime import open_runtime
from gateway.runtime.base import Runtime
from gateway.sessions import Clock, SessionManager
from gateway.ssh.identity import HostIdentity
from gateway.store import Store
from gateway.waiting import WaitingList

log = logging.getLogger(__name__)


def resolve_api_token(config: Config) -> str:
    """The bearer token: from the environment, the token file, or generated once (0600).

    Raises:
        ApiTokenUnavailable: ``--api-token-file`` names a missing, unreadable or empty file,
            or ``SANDMAN_API_TOKEN`` is set too (which one was meant is unknown).
    """
    if config.api_token and config.api_token_file is not None:
        raise ApiTokenUnavailable(
            "SANDMAN_API_TOKEN and --api-token-file (SANDMAN_API_TOKEN_FILE) are both set; set one"
        )
    if config.api_token:
        return config.api_token
    path = config.token_path
    if config.api_token_file is not None:
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiTokenUnavailable(f"cannot read the API token file {path}: {exc}") from exc
        if not token:
            raise ApiTokenUnavailable(f"the API token file {path} is empty")
        return token
    if path.is_file() and (token := path.read_text().strip()):
        return token
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    log.warning("generated an API token; it is in %s", path)
    return token


def _state_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def server_settings(config: Config) -> dict[str, Any]:
    """aiohttp server settings: a connection that has not sent a whole request head within
    ``--http-timeout`` of opening or of its last answer is closed (slow-loris headers), and
    the rest of a body answered early (413, 408) is read for at most that long. Routine
    reads are access-logged at DEBUG (:mod:`gateway.api.access_log`)."""
    return {
        "keepalive_timeout": config.http_timeout,
        "lingering_time": config.http_timeout,
        "access_log_class": AccessLogger,
    }


#: How long a shutdown waits for requests in flight (a create can take ``--start-timeout``)
#: before cancelling them, so the connections are cut and the audit drained well inside
#: the 30 s that systemd and compose give before SIGKILL. A cancelled create rolls back.
SHUTDOWN_GRACE_SECONDS = 5.0


def run_settings(config: Config) -> dict[str, Any]:
    """What ``web.run_app`` serves with: :func:`server_settings`, plus a request whose
    caller disconnects is cancelled (a create nobody will receive rolls back and the user's
    next POST gets 201; aiohttp's default would finish it into a closed socket, holding a
    GPU with the only copy of its key lost), and shutdown waits at most
    :data:`SHUTDOWN_GRACE_SECONDS` for requests (aiohttp's default is 60 s, then 60 more)."""
    return {
        **server_settings(config),
        "handler_cancellation": True,
        "shutdown_timeout": SHUTDOWN_GRACE_SECONDS,
    }


def create_app(
    config: Config,
    *,
    runtime_factory: Callable[[], Runtime] | None = None,
    gpu_factory: Callable[[], GpuBackend] | None = None,
    clock: Clock = utcnow,
) -> web.Application:
    """Build the gateway application. Factories replace Docker and the GPU backend in tests."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[middleware.cors, middleware.errors, middleware.auth],
    )
    app[keys.CONFIG] = config
    app.router.add_routes(routes)
    app.router.add_routes(admin_page.routes)
    app.router.add_routes(openapi.routes)

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(_state_dir, config.state_dir)
        app[keys.API_TOKEN] = await asyncio.to_thread(resolve_api_token, config)
        app[keys.IDENTITY] = await asyncio.to_thread(
            HostIdentity.load_or_create, config.state_dir, config.ssh_hosts
        )
        async with await Store.open(config.db_path) as store:
            app[keys.STORE] = store
            yield

    async def audit_ctx(app: web.Application) -> AsyncIterator[None]:
        metrics = Metrics()
        audit = await asyncio.to_thread(
            Audit, app[keys.STORE], metrics, config.audit_log_path, clock
        )
        app[keys.METRICS] = metrics
        app[keys.AUDIT] = audit
        try:
            yield
        finally:
            await audit.aclose()

    async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
        runtime = (
            open_runtime(config, app[keys.IDENTITY])
            if runtime_factory is None
            else runtime_factory()
        )
        try:
            await runtime.ensure_network(config.docker_network, egress=config.network_egress)
            app[keys.RUNTIME] = runtime
            yield
        finally:
            await runtime.close()

    async def gpu_ctx(app: web.Application) -> AsyncIterator[None]:
        if gpu_factory is None:
            backend = await open_backend(config.gpus, state_dir=config.state_dir)
        else:
            backend = gpu_factory()
        try:
            allocator = GpuAllocator(
                backend,
                default_profile=config.default_mig_profile,
                dynamic=config.mig_dynamic,
                engine_places=config.runtime == "swarm",
            )
            await allocator.check_default_profile()
            if backend.needs_device_request:
                await _log_gpu_path(app[keys.RUNTIME], dynamic=config.mig_dynamic)
            await allocator.reclaim(await app[keys.STORE].allocated_gpus())
            app[keys.GPUS] = allocator
            yield
        finally:
            await backend.close()

    async def sessions_ctx(app: web.Application) -> AsyncIterator[None]:
        budgets = Budgets(config, store=app[keys.STORE], gpus=app[keys.GPUS], clock=clock)
        waiting = WaitingList(
            config,
            store=app[keys.STORE],
            budgets=budgets,
            audit=app[keys.AUDIT],
            metrics=app[keys.METRICS],
            clock=clock,
        )
        manager = SessionManager(
            config,
            store=app[keys.STORE],
            runtime=app[keys.RUNTIME],
            gpus=app[keys.GPUS],
            audit=app[keys.AUDIT],
            metrics=app[keys.METRICS],
            identity=app[keys.IDENTITY],
            instance_id=await app[keys.STORE].instance_id(),
            clock=clock,
            budgets=budgets,
            on_end=waiting.wake,
        )
        waiting.attach(manager)
        await manager.recover()
        app[keys.SESSIONS] = manager
        app[keys.IDLE] = IdleReclaimer(
            config,
            sessions=manager,
            store=app[keys.STORE],
            runtime=app[keys.RUNTIME],
            gpus=app[keys.GPUS],
            audit=app[keys.AUDIT],
            metrics=app[keys.METRICS],
            clock=clock,
        )
        app[keys.BUDGETS] = budgets
        app[keys.WAITING] = waiting
        try:
            yield
        finally:
            await waiting.close()
            await manager.close()

    async def sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
        manager = app[keys.SESSIONS]

        async def sweep_forever() -> None:
            while True:
                await asyncio.sleep(config.reap_interval)
                try:
                    await manager.sweep()
                    await app[keys.GPUS].destroy_released()
                except Exception:
                    log.exception("TTL sweep failed")

        tasks = [
            asyncio.create_task(sweep_forever(), name="ttl-sweeper"),
            asyncio.create_task(manager.watch_containers(), name="container-events"),
            asyncio.create_task(app[keys.WAITING].run(), name="waiting-list"),
        ]
        if config.idle_reclaim:
            tasks.append(asyncio.create_task(app[keys.IDLE].run(), name="idle-sampler"))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop_starting(app: web.Application) -> None:
        if keys.SESSIONS in app:  # shutdown hooks run before requests in flight are awaited
            app[keys.SESSIONS].stop_starting()

    app.on_shutdown.append(stop_starting)
    app.cleanup_ctx.extend([store_ctx, audit_ctx, runtime_ctx, gpu_ctx, sessions_ctx, sweeper_ctx])
    return app


async def _log_gpu_path(runtime: Runtime, *, dynamic: bool) -> None:
    """Say at start how Docker hands GPUs to session containers, and what fails on it."""
    path = await runtime.gpu_path()
    log.info(
        "GPUs reach session containers by %s (Docker %s, CDI %s)",
        path.delivery, path.docker_version, "on" if path.through_cdi else "off",
    )  # fmt: skip
    if path.warning is not None:
        log.log(logging.ERROR if dynamic else logging.WARNING, "%s", path.warning)
