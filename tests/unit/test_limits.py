"""CPU and memory limits: the operator's policy, per-session overrides within its maxima,
stored on the row, shown in the view and handed to Docker."""

import os
from dataclasses import replace

import pytest

from gateway.config import config_from_args, parse
from gateway.core.validation import (
    MIN_MEMORY,
    LimitPolicy,
    parse_size,
    session_limits,
)
from gateway.errors import InvalidLimit
from gateway.runtime.base import SSHD_CAPABILITIES, ContainerSpec
from gateway.runtime.docker import container_config

GIB = 1024**3
POLICY = LimitPolicy(default_cpus=1.0, max_cpus=4.0, default_memory=2 * GIB, max_memory=8 * GIB)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1073741824", GIB), ("512m", 512 * 1024**2), ("4g", 4 * GIB), ("4GiB", 4 * GIB),
     ("1.5g", int(1.5 * GIB)), ("2 GB", 2 * GIB), ("100k", 102400)],
)  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "g", "-1g", "4x", "1e3", "4 g g", "9" * 400 + "t", "nan"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("cpus", "memory", "policy", "expected"),
    [
        (None, None, LimitPolicy(), (None, None)),  # unlimited by default
        (None, None, POLICY, (1.0, 2 * GIB)),
        (None, None, LimitPolicy(max_cpus=2.0, max_memory=GIB), (2.0, GIB)),  # the maximum
        (3.5, "8g", POLICY, (3.5, 8 * GIB)),
        (2, 4 * GIB, POLICY, (2, 4 * GIB)),
        (0.01, MIN_MEMORY, POLICY, (0.01, MIN_MEMORY)),
        (8, "100g", LimitPolicy(), (8, 100 * GIB)),  # no maximum but the host's CPUs
    ],
)
def test_session_limits(cpus, memory, policy, expected):
    assert session_limits(cpus, memory, policy=policy, host_cpus=8) == expected


@pytest.mark.parametrize(
    ("cpus", "memory", "policy"),
    [
        (4.5, None, POLICY),
        (0, None, POLICY),
        (-1, None, POLICY),
        (float("nan"), None, POLICY),
        (float("inf"), None, LimitPolicy()),
        (9, None, LimitPolicy()),  # more than the host has
        (None, "9g", POLICY),
        (None, 8 * GIB + 1, POLICY),
        (None, MIN_MEMORY - 1, POLICY),
        (None, -5, LimitPolicy()),
        (None, "lots", POLICY),
        (None, 10**20, LimitPolicy()),  # beyond int64: Docker and SQLite cannot hold it
        (None, "100000000000t", LimitPolicy()),
        (None, 2**63, LimitPolicy()),
    ],
)
def test_session_limits_refuses(cpus, memory, policy):
    with pytest.raises(InvalidLimit):
        session_limits(cpus, memory, policy=policy, host_cpus=8)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"default_cpus": 2.0, "max_cpus": 1.0},
        {"default_memory": 2 * GIB, "max_memory": GIB},
        {"max_cpus": 0.0},
        {"default_memory": 1024},
    ],
)
def test_policy_refuses_contradictions(kwargs):
    with pytest.raises(ValueError):
        LimitPolicy(**kwargs)


def test_options_build_the_policy():
    args = parse(
        ["serve", "--cpu-limit", "0.5", "--max-cpu-limit", "1", "--max-memory-limit", "8g"],
        env={"SANDMAN_MEMORY_LIMIT": "2g"},
    )
    assert config_from_args(args, {}).limits == LimitPolicy(0.5, 1.0, 2 * GIB, 8 * GIB)
    assert config_from_args(parse(["serve"], env={}), {}).limits == LimitPolicy()
    for wrong in (
        ["--cpu-limit", "1", "--max-cpu-limit", "0.5"],
        ["--max-cpu-limit", str((os.cpu_count() or 1) + 1)],
        ["--memory-limit", "lots"],
        ["--max-memory-limit", "1m"],
    ):
        with pytest.raises(ValueError):
            config_from_args(parse(["serve", *wrong], env={}), {})


def test_docker_gets_nano_cpus_and_memory_without_extra_swap(tmp_path):
    spec = ContainerSpec(
        name="n", image="i", hostname="h", env={}, labels={}, workspace=tmp_path, home="/home/u",
        network="net", pids_limit=10, cpu_limit=1.5, memory_limit=GIB,
    )  # fmt: skip
    host = container_config(spec)["HostConfig"]
    assert host["NanoCpus"] == 1_500_000_000
    assert host["Memory"] == host["MemorySwap"] == GIB
    unlimited = container_config(replace(spec, cpu_limit=None, memory_limit=None))
    assert not {"NanoCpus", "Memory", "MemorySwap"} & set(unlimited["HostConfig"])


async def test_docker_gets_the_pids_limit_and_the_hardening(make_client, runtime):
    client = await make_client(pids_limit=77)
    assert (await client.post("/sessions", json={"user_id": "alice"})).status == 201
    (container,) = runtime.containers.values()
    host = container_config(container.spec)["HostConfig"]
    assert host["PidsLimit"] == 77  # --pids-limit, as given
    assert host["CapDrop"] == ["ALL"] and host["CapAdd"] == list(SSHD_CAPABILITIES)
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert not host.get("Privileged") and host["RestartPolicy"] == {"Name": "no"}


async def test_limits_are_stored_shown_and_applied(make_client, runtime):
    client = await make_client(limits=POLICY)
    resp = await client.post(
        "/sessions", json={"user_id": "alice", "cpu_limit": 1.5, "memory_limit": "4g"}
    )
    assert resp.status == 201
    created = await resp.json()
    assert (created["cpu_limit"], created["memory_limit"]) == (1.5, 4 * GIB)
    view = await (await client.get(f"/sessions/{created['session_id']}")).json()
    assert (view["cpu_limit"], view["memory_limit"]) == (1.5, 4 * GIB)
    (container,) = runtime.containers.values()
    assert (container.spec.cpu_limit, container.spec.memory_limit) == (1.5, 4 * GIB)

    bob = await (await client.post("/sessions", json={"user_id": "bob"})).json()
    assert (bob["cpu_limit"], bob["memory_limit"]) == (1.0, 2 * GIB)  # the defaults


@pytest.mark.parametrize(
    "body",
    [
        {"cpu_limit": 5},
        {"memory_limit": "9g"},
        {"memory_limit": 1},
        {"cpu_limit": "2"},
        {"cpu_limit": True},
        {"memory_limit": [1]},
    ],
)
async def test_limits_beyond_the_maxima_are_400_and_create_nothing(make_client, runtime, body):
    client = await make_client(limits=POLICY)
    resp = await client.post("/sessions", json={"user_id": "alice", **body})
    assert resp.status == 400
    assert (await resp.json())["code"] in ("invalid_limit", "invalid_request")
    assert runtime.containers == {}
    assert await (await client.get("/sessions")).json() == []
