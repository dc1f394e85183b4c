"""Idle reclaim through the API, with a settable clock, the fake runtime (CPU time) and a
fake NVML (GPU utilisation): clocks, warnings, the reclaim, holds and exemptions."""

import asyncio
import os

import pytest

from gateway.api import keys
from gateway.config import config_from_args, parse
from gateway.core.idle import IdlePolicy, is_busy
from gateway.gpu.none import NoneBackend
from gateway.gpu.nvml import NvmlBackend
from gateway.idle_reclaim import HOLD_FILE, IDLE_INFO
from tests.unit.fake_pynvml import FakeGpu, FakeNvml, h100
from tests.unit.helpers import CLIENT_BANNER, CLIENT_KEX

#: idle after 1 min with no connection and 2 min of idle compute; warned 1 min before
POLICY = IdlePolicy(no_connection=60, compute=120, warnings=(60,), hold_max=3600)


@pytest.fixture
async def client(make_client):
    return await make_client(idle=POLICY, idle_sample=3600)


async def start(client, **body):
    body.setdefault("user_id", "alice")
    response = await client.post("/sessions", json=body)
    assert response.status == 201, await response.text()
    return (await response.json())["session_id"]


async def idle_view(client, session_id):
    response = await client.get(f"/sessions/{session_id}")
    return (await response.json())["idle"] if response.status == 200 else None


async def events(client, session_id):
    body = await (await client.get(f"/audit?session_id={session_id}")).json()
    return [e for e in reversed(body["events"])]


async def sample(client, clock, minutes=0.0):
    clock.advance(minutes * 60)
    return await client.app[keys.IDLE].sample()


async def test_an_unused_session_is_warned_then_reclaimed(client, clock, runtime):
    session_id = await start(client)
    await sample(client, clock)  # clocks start: no connection, no CPU verdict yet
    view = await idle_view(client, session_id)
    assert view["compute"] == "cpu" and view["kept_because"] == ["compute_busy"]
    await sample(client, clock, 0.5)  # CPU idle from here: reclaim at +2.5 min
    view = await idle_view(client, session_id)
    assert view["kept_because"] == [] and view["reclaim_at"] is not None
    assert view["utilization"] == 0.0
    await sample(client, clock, 1.5)  # one minute before: the warning
    warning = [e for e in await events(client, session_id) if e["event"] == "session_idle_warning"]
    assert len(warning) == 1
    assert warning[0]["reclaim_at"] == view["reclaim_at"]
    assert "no connection since" in warning[0]["reason"]
    wall = [argv for _, argv, _ in runtime.execs if argv[0] == "wall"]
    assert len(wall) == 1 and "sandman-session hold" in wall[0][1]
    await sample(client, clock, 0.25)  # each warning once
    assert len([e for e in await events(client, session_id) if "idle" in e["event"]]) == 1
    assert await sample(client, clock, 0.25) == 1
    assert await idle_view(client, session_id) is None  # gone
    ended = [e for e in await events(client, session_id) if e["event"] == "session_idle_reclaimed"]
    assert ended and ended[0]["reason"] == "idle"
    metrics = await (await client.get("/metrics")).text()
    assert 'sandman_sessions_ended_total{reason="idle"} 1.0' in metrics


async def test_a_short_login_between_two_samples_restarts_the_connection_clock(client, clock):
    session_id = await start(client)
    await sample(client, clock)
    created = (await idle_view(client, session_id))["no_connection_since"]
    clock.advance(30)
    port = (await (await client.get(f"/sessions/{session_id}")).json())["ssh_port"]
    squatter = await asyncio.open_connection("127.0.0.1", port)
    squatter[1].write(CLIENT_BANNER)  # never gets past the key exchange: not a login
    await squatter[0].readline()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(CLIENT_KEX)
    await reader.readline()  # the container's SSH banner: relayed
    writer.close()
    sessions = client.app[keys.SESSIONS]
    for _ in range(100):  # the relay notices the close
        if sessions.connection_activity(session_id) == (0, clock()):
            break
        await asyncio.sleep(0.02)
    await sample(client, clock, 0.5)
    view = await idle_view(client, session_id)
    assert view["no_connection_since"] != created
    assert view["no_connection_since"] == view["last_connection_at"]
    assert view["no_connection_since"] == (clock() - _minutes(0.5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "connection" not in view["kept_because"]  # the squatter still open keeps nothing
    squatter[1].close()


async def test_busy_cpu_keeps_a_session_nobody_is_connected_to(client, clock, runtime):
    session_id = await start(client)
    (container,) = runtime.containers.values()
    for _ in range(10):
        container.cpu_seconds += 600  # a job that never stops
        await sample(client, clock, 1)
    view = await idle_view(client, session_id)
    assert view["kept_because"] == ["compute_busy"] and view["reclaim_at"] is None
    assert view["no_connection_since"] is not None and view["utilization"] > 10


async def test_a_hold_keeps_the_session_and_is_bounded(client, clock):
    session_id = await start(client)
    before = await (await client.get(f"/sessions/{session_id}")).json()
    refused = await client.patch(f"/sessions/{session_id}", json={"idle_hold_minutes": 61})
    assert refused.status == 400
    assert (await refused.json())["code"] == "invalid_idle_hold"
    held = await client.patch(f"/sessions/{session_id}", json={"idle_hold_minutes": 30})
    assert held.status == 200
    body = await held.json()
    assert body["expires_at"] == before["expires_at"]  # a hold never moves the expiry
    assert "hold" in body["idle"]["kept_because"]
    for _ in range(20):  # 20 idle minutes
        await sample(client, clock, 1)
    assert "hold" in (await idle_view(client, session_id))["kept_because"]
    released = await client.patch(f"/sessions/{session_id}", json={"idle_hold_minutes": 0})
    assert (await released.json())["idle"]["hold_until"] is None
    assert await sample(client, clock, 0) == 1


async def test_an_exempt_session_stays(client, clock):
    session_id = await start(client, idle_reclaim=False)
    for _ in range(10):
        assert await sample(client, clock, 5) == 0
    assert (await idle_view(client, session_id))["kept_because"] == ["exempt"]


async def test_idle_reclaim_must_be_a_boolean(client):
    response = await client.post("/sessions", json={"user_id": "alice", "idle_reclaim": 0})
    assert response.status == 400


async def test_a_hold_file_in_the_workspace_holds_and_releases(client, clock, tmp_path):
    session_id = await start(client)
    hold = tmp_path / "workspaces" / "alice" / HOLD_FILE
    await sample(client, clock)
    hold.write_text((clock().replace(microsecond=0) + _minutes(600)).isoformat())
    os.utime(hold, (clock().timestamp(), clock().timestamp()))  # written now, by the fake clock
    await sample(client, clock, 0.1)
    view = await idle_view(client, session_id)
    assert "hold" in view["kept_because"]
    assert view["hold_until"] < (clock() + _minutes(61)).strftime("%Y-%m-%dT%H:%M:%SZ")  # bound
    hold.write_text("release")
    os.utime(hold, (clock().timestamp() + 60, clock().timestamp() + 60))
    await sample(client, clock, 0.1)
    assert "hold" not in (await idle_view(client, session_id))["kept_because"]


@pytest.mark.parametrize("text", ["2099-01-01T00:00:00", "soon", "x" * 200])
async def test_a_hold_file_that_is_garbled_changes_nothing(client, clock, tmp_path, text):
    session_id = await start(client)
    await client.patch(f"/sessions/{session_id}", json={"idle_hold_minutes": 30})
    hold = tmp_path / "workspaces" / "alice" / HOLD_FILE
    hold.write_text(text)
    os.utime(hold, (clock().timestamp() + 60, clock().timestamp() + 60))
    await sample(client, clock, 0.1)
    assert "hold" in (await idle_view(client, session_id))["kept_because"]  # the API's stays


async def test_a_hold_file_that_is_a_link_is_ignored(client, clock, tmp_path):
    session_id = await start(client)
    target = tmp_path / "elsewhere"
    target.write_text((clock() + _minutes(30)).isoformat())
    (tmp_path / "workspaces" / "alice" / HOLD_FILE).symlink_to(target)
    await sample(client, clock)
    assert "hold" not in (await idle_view(client, session_id))["kept_because"]


async def test_the_container_gets_the_idle_facts(client, clock, runtime):
    await start(client)
    await sample(client, clock)
    (container,) = runtime.containers.values()
    assert b'"kept_because"' in container.files[IDLE_INFO]


async def test_off_keeps_todays_behaviour(make_client, clock):
    client = await make_client(idle=POLICY, idle_sample=3600, idle_reclaim=False)
    session_id = await start(client)
    assert await idle_view(client, session_id) is None


def test_settings_take_durations_and_are_checked():
    args = parse(
        ["serve", "--idle-no-connection", "90s", "--idle-compute", "2h", "--idle-warn", "1d,5m"],
        env={"SANDMAN_IDLE_HOLD_MAX": "1d"},
    )
    policy = config_from_args(args, {}).idle
    assert (policy.no_connection, policy.compute) == (90, 7200)
    assert policy.warnings == (86400, 300) and policy.hold_max == 86400
    for bad in (["--idle-reclaim", "maybe"], ["--idle-mig-unknown", "?"], ["--idle-sample", "0"]):
        with pytest.raises(ValueError):
            config_from_args(parse(["serve", *bad], env={}), {})


# --- GPU sessions (fake NVML) ----------------------------------------------------------


async def gpu_client(make_client, nv, **overrides):
    nv.nvmlInit()
    return await make_client(
        gpu_factory=lambda: NvmlBackend(nv), idle=POLICY, idle_sample=3600,
        default_mig_profile=None, **overrides,
    )  # fmt: skip


@pytest.mark.parametrize(("utilization", "kept"), [(80, ["compute_busy"]), (1, [])])
async def test_whole_gpu_busy_and_idle(make_client, clock, utilization, kept):
    nv = FakeNvml([FakeGpu("GPU-whole", mig=None, profiles=[], utilization=utilization)])
    client = await gpu_client(make_client, nv)
    session_id = await start(client)
    await sample(client, clock)
    view = await idle_view(client, session_id)
    assert view["compute"] == "gpu" and view["utilization"] == utilization
    assert view["kept_because"] == kept


@pytest.mark.parametrize(
    ("processes", "mig_unknown", "kept"),
    [(True, "busy", ["compute_busy"]), (False, "busy", []), (True, "idle", [])],
)
async def test_ampere_slice_is_busy_while_processes_run(
    make_client, clock, processes, mig_unknown, kept
):
    nv = FakeNvml([FakeGpu("GPU-a100")])
    nv.precreate(nv.gpus[0], "3g.40gb", 0).held = processes
    policy = IdlePolicy(**{**_fields(POLICY), "mig_unknown": mig_unknown})
    client = await gpu_client(make_client, nv)
    client.app[keys.IDLE]._policy = policy
    session_id = await start(client)
    await sample(client, clock)
    view = await idle_view(client, session_id)
    assert view["utilization"] is None and view["kept_because"] == kept


async def test_hopper_slice_reads_gpm(make_client, clock):
    nv = FakeNvml([h100("GPU-h100")])
    nv.precreate(nv.gpus[0], "3g.40gb", 0)
    (gi,) = nv.gpus[0].gis.values()
    gi.sm_util = 42.0
    client = await gpu_client(make_client, nv)
    session_id = await start(client)
    await sample(client, clock)
    await sample(client, clock, 1)
    view = await idle_view(client, session_id)
    assert view["utilization"] == 42.0 and view["kept_because"] == ["compute_busy"]
    gi.sm_util = 0.5
    await sample(client, clock, 1)
    assert (await idle_view(client, session_id))["kept_because"] == []


def _minutes(n):
    from datetime import timedelta

    return timedelta(minutes=n)


def _fields(policy):
    return {name: getattr(policy, name) for name in IdlePolicy.__dataclass_fields__}


async def test_a_gpu_this_host_cannot_see_is_unknown_so_busy():
    """A slice Swarm placed on a worker, seen from a GPU-less manager: no reading is work."""
    reading = await NoneBackend().utilization("MIG-on-a-worker")
    assert is_busy(reading, 5.0, IdlePolicy())
    assert not is_busy(reading, 5.0, IdlePolicy(mig_unknown="idle"))  # the operator's choice


# --- GPU sessions on a Swarm node (read from inside the task) --------------------------


async def swarm_gpu_session(make_client, runtime):
    """A GPU-less manager (no NVML) whose task got a node's slice: read through the task."""
    runtime.engine_slices = {"1g.10gb": "MIG-node-slice-1"}
    runtime.gpu_inside = True
    client = await make_client(runtime="swarm", idle=POLICY, idle_sample=3600)
    session_id = await start(client, mig_profile="1g.10gb")
    (container,) = runtime.containers.values()
    return client, session_id, container


async def test_a_swarm_gpu_session_with_no_gpu_process_is_reclaimed(make_client, clock, runtime):
    client, session_id, _ = await swarm_gpu_session(make_client, runtime)
    await sample(client, clock)  # the GPU is idle: the CPU decides, no verdict yet
    await sample(client, clock, 0.5)
    view = await idle_view(client, session_id)
    assert view["compute"] == "gpu" and view["utilization"] is None  # a MIG device
    assert view["kept_because"] == [] and view["reclaim_at"] is not None
    await sample(client, clock, 1.5)
    warned = [e for e in await events(client, session_id) if e["event"] == "session_idle_warning"]
    assert len(warned) == 1 and "GPU idle since" in warned[0]["reason"]
    assert await sample(client, clock, 0.5) == 1
    ended = [e for e in await events(client, session_id) if e["event"] == "session_idle_reclaimed"]
    assert ended and ended[0]["reason"] == "idle"


async def test_a_swarm_gpu_session_running_a_gpu_process_is_kept(make_client, clock, runtime):
    client, session_id, container = await swarm_gpu_session(make_client, runtime)
    container.gpu_apps = "4242, 310 MiB\n"  # a training run nobody watches
    for _ in range(10):
        assert await sample(client, clock, 1) == 0
    view = await idle_view(client, session_id)
    assert view["kept_because"] == ["compute_busy"] and view["no_connection_since"] is not None
    container.gpu_apps = ""  # it ends: from now on idle
    await sample(client, clock, 1)
    await sample(client, clock, 1)
    assert (await idle_view(client, session_id))["kept_because"] == []


async def test_a_swarm_gpu_session_with_busy_cpu_is_kept(make_client, clock, runtime):
    """``nvidia-smi`` in a container may list none of its processes (the driver reports host
    PIDs): with the GPU idle, the CPU still keeps a job that works."""
    client, session_id, container = await swarm_gpu_session(make_client, runtime)
    for _ in range(10):
        container.cpu_seconds += 600
        await sample(client, clock, 1)
    assert (await idle_view(client, session_id))["kept_because"] == ["compute_busy"]


async def test_a_swarm_gpu_session_whose_gpu_cannot_be_read_is_kept(make_client, clock, runtime):
    client, session_id, container = await swarm_gpu_session(make_client, runtime)
    container.gpu_apps = "Failed to initialize NVML: Unknown Error\n"
    for _ in range(10):
        assert await sample(client, clock, 1) == 0
    assert (await idle_view(client, session_id))["kept_because"] == ["compute_busy"]
