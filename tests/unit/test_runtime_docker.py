"""The Docker runtime against an engine that takes calls and never answers (``docker rm -f``
of a GPU process stuck in the kernel, a wedged dockerd): every call is bounded and
becomes ``DockerUnavailable``, so the sweep and the API go on."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway.errors import DockerUnavailable
from gateway.runtime.base import ContainerFile, ContainerSpec
from gateway.runtime.docker import DockerRuntime

TIMEOUT = 0.05


async def _never(*args: object, **kwargs: object) -> None:
    await asyncio.Event().wait()


def _hung_engine() -> SimpleNamespace:
    container = SimpleNamespace(
        show=_never, delete=_never, log=_never, put_archive=_never, start=_never, exec=_never
    )
    return SimpleNamespace(
        containers=SimpleNamespace(
            container=lambda container_id: container, create=_never, list=_never
        ),
        networks=SimpleNamespace(get=_never, create=_never),
        version=_never,
    )


SPEC = ContainerSpec(
    name="sandman-a-1", image="img", hostname="h", env={}, labels={},
    workspace=Path("/tmp/w"), home="/home/a", network="net", pids_limit=64,
)  # fmt: skip
CALLS = {
    "ping": lambda r: r.ping(),
    "ensure_network": lambda r: r.ensure_network("net", egress=False),
    "create": lambda r: r.create(SPEC),
    "start": lambda r: r.start("c1", "net"),
    "inspect": lambda r: r.inspect("c1", "net"),
    "remove": lambda r: r.remove("c1"),
    "put_files": lambda r: r.put_files("c1", [ContainerFile("/etc/x", b"x")]),
    "list_owned": lambda r: r.list_owned("i1", "net"),
    "exec": lambda r: r.exec("c1", ["wall", "hi"], user="0:5"),
    "tell": lambda r: r.tell("c1", "hi"),
    "visible_gpus": lambda r: r.visible_gpus("c1"),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
async def test_a_hung_engine_call_is_docker_unavailable_within_the_timeout(call):
    runtime = DockerRuntime(_hung_engine(), timeout=TIMEOUT)
    async with asyncio.timeout(5):  # far above TIMEOUT: a hang fails here, not forever
        with pytest.raises(DockerUnavailable, match="did not answer in time"):
            await call(runtime)


async def test_the_log_tail_of_a_hung_engine_is_empty():
    runtime = DockerRuntime(_hung_engine(), timeout=TIMEOUT)
    async with asyncio.timeout(5):
        assert await runtime.logs("c1") == ""
