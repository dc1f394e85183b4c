from pathlib import Path

import pytest
from aiohttp import web

from gateway.api import create_app
from gateway.api.app import run_settings, server_settings
from gateway.config import Config
from gateway.core.ports import PortRange
from gateway.gpu.none import NoneBackend
from tests.fakes import Clock, FakeRuntime
from tests.net import UNIT_PORT_BASE as FIRST_PORT

TOKEN = "test-token"


def unit_config(tmp_path: Path, **overrides) -> Config:
    values = dict(
        host="127.0.0.1",
        ssh_bind="127.0.0.1",
        public_host="gpu01.test",
        state_dir=tmp_path / "state",
        workspace_root=tmp_path / "workspaces",
        ssh_ports=PortRange(FIRST_PORT, FIRST_PORT + 19),
        api_token=TOKEN,
        gpus="none",
        start_timeout=5,
        reap_interval=3600,
        max_ttl_minutes=120,
    )
    values.update(overrides)
    return Config(**values)


@pytest.fixture
async def runtime():
    fake = FakeRuntime()
    yield fake
    fake.shut_down()  # the gateway's close leaves the "containers" running, as Docker does


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def plain_workspaces(monkeypatch):
    """Workspaces are plain folders: unit tests don't chown to the user's uid."""
    monkeypatch.setattr(
        "gateway.provisioning.prepare_workspace",
        lambda path, uid: path.mkdir(parents=True, exist_ok=True),
    )


@pytest.fixture
def make_client(aiohttp_client, tmp_path, runtime, clock, plain_workspaces):
    async def make(gpu_factory=NoneBackend, **overrides):
        config = unit_config(tmp_path, **overrides)
        app = create_app(
            config, runtime_factory=lambda: runtime, gpu_factory=gpu_factory, clock=clock
        )
        client = await aiohttp_client(app, headers={"Authorization": f"Bearer {TOKEN}"})
        return client

    return make


@pytest.fixture
def make_server(aiohttp_server, tmp_path, runtime, plain_workspaces):
    """A gateway on a real loopback port with the wall clock, for clients outside the test's
    event loop (the CLI, a browser)."""

    async def make(gpu_factory=NoneBackend, **overrides):
        config = unit_config(tmp_path, **overrides)
        app = create_app(config, runtime_factory=lambda: runtime, gpu_factory=gpu_factory)
        return await aiohttp_server(app, **server_settings(config))

    return make


@pytest.fixture
async def make_runner(tmp_path, runtime, clock, plain_workspaces):
    """A gateway served as ``sandman serve`` serves it (``web.run_app``'s runner and
    settings), unlike aiohttp's TestServer, which cancels handlers whatever it is told.
    Returns the app, its base URL and the runner (``runner.cleanup()`` is the SIGTERM)."""
    runners: list[web.AppRunner] = []

    async def make(gpu_factory=NoneBackend, **overrides):
        config = unit_config(tmp_path, **overrides)
        app = create_app(
            config, runtime_factory=lambda: runtime, gpu_factory=gpu_factory, clock=clock
        )
        runner = web.AppRunner(app, **run_settings(config))
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return app, f"http://{host}:{port}", runner

    yield make
    for runner in runners:
        await runner.cleanup()
