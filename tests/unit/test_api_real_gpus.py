"""The REST API over NVML (a fake pynvml) as a real MIG host behaves: start-up checks, GPU
health, the in-container pin check, and a MIG instance another process holds."""

import asyncio
import logging

import pynvml
import pytest
from aiohttp import web

from gateway.api import create_app, keys
from gateway.api.routes import HEALTH_TIMEOUT
from gateway.config import config_from_args, parse
from gateway.errors import GpuError
from gateway.gpu import open_backend
from gateway.gpu.nvml import NvmlBackend
from tests.fakes import CDI_DOCKER, CDI_DOCKER_NO_RUNTIME
from tests.unit.conftest import unit_config
from tests.unit.fake_pynvml import A100_40GB, FakeGpu, FakeNvml, h100, h200
from tests.unit.helpers import create

H100 = "GPU-h100-0000"
WHOLE = "GPU-whole-0001"


def nvml(*gpus: FakeGpu) -> FakeNvml:
    nv = FakeNvml(list(gpus))
    nv.nvmlInit()
    return nv


# --- the default profile is checked at start-up ------------------------------------------


async def test_a_default_profile_this_host_lacks_refuses_to_start(tmp_path, runtime):
    nv = nvml(h100(H100))
    config = unit_config(tmp_path, default_mig_profile="3g.20gb")
    app = create_app(config, runtime_factory=lambda: runtime, gpu_factory=lambda: NvmlBackend(nv))
    runner = web.AppRunner(app)
    with pytest.raises(GpuError) as caught:
        await runner.setup()
    await runner.cleanup()
    message = caught.value.log_message
    assert "3g.20gb" in message and "NVIDIA H100 80GB HBM3" in message
    assert "1g.10gb" in message and "7g.80gb" in message and "'any'" in message
    assert nv.initialised == 0  # the backend was closed again


async def test_default_any_hands_out_any_free_instance(make_client):
    nv = nvml(h100(H100))
    mig = nv.precreate(nv.gpus[0], "1g.20gb", 2)
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv), default_mig_profile="any")
    body = await (await create(client)).json()
    assert body["gpu_uuid"] == mig.uuid


async def test_unset_default_follows_each_model_of_a_mixed_host(make_client):
    nv = nvml(h100(H100), h200("GPU-h200-0002"), FakeGpu("GPU-a40-0003", profiles=A100_40GB))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv), mig_dynamic=True)
    given = []
    for user in ("ann", "bob", "cid", "dan", "eve", "fay"):
        response = await create(client, user_id=user)
        assert response.status == 201, await response.text()
        body = await response.json()
        given.append((body["gpu_uuid"][:4], body["mig_profile"]))
    # two 3-slice instances fit each GPU, each of its own model's profile
    assert [profile for _, profile in given] == ["3g.40gb"] * 2 + ["3g.71gb"] * 2 + ["3g.20gb"] * 2
    assert {uuid for uuid, _ in given} == {"MIG-"}
    assert (await create(client, user_id="gil")).status == 503


def test_any_on_the_command_line_is_kept_and_unset_follows_the_host():
    assert config_from_args(parse(["serve"], env={}), {}).default_mig_profile is None
    args = parse(["serve", "--default-mig-profile", "any"], env={})
    assert config_from_args(args, {}).default_mig_profile == "any"
    args = parse(["serve"], env={"SANDMAN_DEFAULT_MIG_PROFILE": "3g.40gb"})
    assert config_from_args(args, {}).default_mig_profile == "3g.40gb"


async def test_a_pending_mig_change_says_to_stop_the_gateway(make_client):
    nv = nvml(FakeGpu(WHOLE, mig=False, mig_pending=True), h100(H100))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv))
    pending, settled = (await (await client.get("/gpus")).json())["gpus"]
    assert (pending["mig_enabled"], pending["mig_pending"]) == (False, True)
    assert "stop the gateway" in pending["mig_change"] and "reset" in pending["mig_change"]
    assert settled["mig_change"] is None


async def test_health_does_not_wait_for_a_slow_mig_create(make_client):
    nv = nvml(h100(H100))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv), mig_dynamic=True)
    assert (await client.get("/healthz")).status == 200  # read once before
    reached, release = nv.block("nvmlDeviceCreateGpuInstanceWithPlacement")
    creating = asyncio.create_task(create(client))
    await asyncio.to_thread(reached.wait, 30)  # NVML's one worker is busy creating
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT / 2):
            health = await client.get("/healthz")
        assert health.status == 200 and (await health.json())["status"] == "healthy"
    finally:
        release.set()
    assert (await creating).status == 201


# --- NVML failing at start ------------------------------------------------------------


async def test_a_broken_nvml_at_start_fails_gpu_work_but_keeps_sessions(
    make_client, tmp_path, caplog
):
    before = await make_client()  # a GPU-less session from before the driver upgrade
    session = await (await create(before)).json()
    await before.close()
    nv = FakeNvml([h100(H100)], init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    backend = await open_backend("auto", state_dir=tmp_path, nv=nv)
    client = await make_client(gpu_factory=lambda: backend)  # starts anyway

    with caplog.at_level(logging.WARNING):
        health = await client.get("/healthz")
    assert health.status == 503 and (await health.json())["failing"]["gpus"] == "unavailable"
    assert "RM has detected an NVML/RM version mismatch" in caplog.text  # the reason: the log
    refused = await create(client, user_id="bob")
    assert (refused.status, (await refused.json())["code"]) == (503, "gpu_error")
    assert (await client.get("/gpus")).status == 503
    kept = await client.get(f"/sessions/{session['session_id']}")
    assert kept.status == 200 and (await kept.json())["state"] == "running"
    assert (await client.delete(f"/sessions/{session['session_id']}")).status == 200


# --- one failing GPU ------------------------------------------------------------------


async def test_a_lost_gpu_is_reported_and_the_others_served(make_client):
    nv = nvml(FakeGpu("GPU-lost", mig=False), FakeGpu(WHOLE, mig=False))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv))
    nv.gpus[0].fault = pynvml.NVML_ERROR_GPU_IS_LOST
    health = await client.get("/healthz", headers={"Authorization": ""})
    assert health.status == 200
    body = await health.json()
    assert body["status"] == "degraded"
    assert body["unhealthy_gpus"] == [
        {"index": 0, "uuid": None, "error": "GPU is lost (NVML error 15)"}
    ]
    listed = (await (await client.get("/gpus")).json())["gpus"]
    assert [(g["index"], g["healthy"]) for g in listed] == [(0, False), (1, True)]
    created = await create(client)
    assert created.status == 201 and (await created.json())["gpu_uuid"] == WHOLE
    nv.failures["nvmlDeviceGetCount"] = pynvml.NVML_ERROR_UNKNOWN  # NVML as a whole fails
    health = await client.get("/healthz", headers={"Authorization": ""})
    assert health.status == 503 and "gpus" in (await health.json())["failing"]


# --- Docker >= 29.2 resolving GPU requests through CDI -------------------------------------


async def test_on_the_cdi_path_dynamic_instances_start_through_the_nvidia_runtime(
    make_client, runtime
):
    runtime.daemon_info = CDI_DOCKER  # its spec was written before any instance existed
    nv = nvml(h100(H100))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv), mig_dynamic=True)
    resp = await create(client)
    assert resp.status == 201, await resp.text()
    (container,) = runtime.containers.values()
    host = container.body["HostConfig"]
    assert host["Runtime"] == "nvidia" and "DeviceRequests" not in host
    assert f"NVIDIA_VISIBLE_DEVICES={(await resp.json())['gpu_uuid']}" in container.body["Env"]
    health = await (await client.get("/healthz", headers={"Authorization": ""})).json()
    assert health["gpu_path"] == {
        "through_cdi": True,
        "delivery": "nvidia-runtime",
        "late_instances_start": True,
    }


async def test_on_the_cdi_path_without_the_runtime_only_listed_devices_start(
    make_client, runtime, caplog
):
    runtime.daemon_info = CDI_DOCKER_NO_RUNTIME
    nv = nvml(h100(H100), FakeGpu(WHOLE, mig=False))
    with caplog.at_level(logging.ERROR):
        client = await make_client(
            gpu_factory=lambda: NvmlBackend(nv), mig_dynamic=True, default_mig_profile="any"
        )
    assert "nvidia-ctk runtime configure" in caplog.text  # said at start
    late = await create(client, mig_profile="1g.10gb")  # made now: not in the spec
    body = await late.json()
    assert (late.status, body["code"]) == (502, "container_start_failed")
    assert "unresolvable CDI devices" in body["error"] and nv.gpus[0].gis == {}
    whole = await create(client, user_id="bob")  # the spec lists the whole GPU
    assert whole.status == 201 and (await whole.json())["gpu_uuid"] == WHOLE
    (container,) = runtime.containers.values()
    assert container.body["HostConfig"]["DeviceRequests"][0]["DeviceIDs"] == [WHOLE]
    health = await (await client.get("/healthz", headers={"Authorization": ""})).json()
    assert health["gpu_path"]["late_instances_start"] is False  # the how-to: log and probe


# --- the container must see exactly its GPU -------------------------------------------


async def test_a_container_seeing_exactly_its_gpu_is_accepted(make_client, runtime):
    nv = nvml(FakeGpu(WHOLE, mig=False))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv))
    resp = await create(client)
    assert resp.status == 201
    (container,) = runtime.containers.values()
    assert container.spec.device_request and container.spec.gpu_uuid == WHOLE
    assert runtime.gpu_checks == [container.id]


@pytest.mark.parametrize(
    ("visible", "error"),
    [
        (("GPU-whole-0001", "GPU-other-0002"), "GPU isolation failed"),  # the toolkit exposed all
        ((), "could not check which GPU"),  # or none: nvidia-smi fails
    ],
)
async def test_a_container_seeing_other_gpus_is_rolled_back(make_client, runtime, visible, error):
    nv = nvml(FakeGpu(WHOLE, mig=False))
    client = await make_client(gpu_factory=lambda: NvmlBackend(nv))
    runtime.seen_gpus = visible
    resp = await create(client)
    body = await resp.json()
    assert (resp.status, body["code"]) == (502, "container_start_failed")
    assert error in body["error"]
    assert runtime.containers == {} and runtime.removed
    assert await (await client.get("/sessions")).json() == []
    runtime.seen_gpus = None
    assert (await create(client)).status == 201  # the GPU was released


async def test_a_mig_container_seeing_every_slice_is_rolled_back_and_the_slice_destroyed(
    make_client, runtime
):
    nv = nvml(h100(H100))
    other = nv.precreate(nv.gpus[0], "1g.10gb", 6)
    client = await make_client(
        gpu_factory=lambda: NvmlBackend(nv), default_mig_profile="3g.40gb", mig_dynamic=True
    )
    runtime.seen_gpus = (H100, other.uuid, "MIG-made-for-this-session")
    resp = await create(client)
    assert resp.status == 502
    assert "instead of only MIG-" in (await resp.json())["error"]
    assert nv.mig_uuids(nv.gpus[0]) == [other.uuid]


async def test_gpu_less_sessions_run_no_check(make_client, runtime):
    client = await make_client()
    assert (await create(client)).status == 201
    assert runtime.gpu_checks == []


async def test_a_swarm_task_must_see_exactly_the_slice_the_engine_assigned_it(make_client, runtime):
    """With Swarm the gateway's own GPUs say nothing (simulated or none here): the task is
    checked against the slice the engine gave it, which the row then records."""
    runtime.engine_slices = {"1g.10gb": "MIG-node-slice-1"}
    client = await make_client(runtime="swarm")
    runtime.seen_gpus = ("GPU-node-parent", "MIG-node-slice-2")  # the node's toolkit ignores it
    failed = await create(client, mig_profile="1g.10gb")
    body = await failed.json()
    assert (failed.status, body["code"]) == (502, "container_start_failed")
    assert (
        "GPU isolation failed: the container sees GPU-node-parent, MIG-node-slice-2 instead "
        "of only MIG-node-slice-1" in body["error"]
    )
    assert runtime.containers == {} and len(runtime.gpu_checks) == 1
    runtime.seen_gpus = None
    created = await create(client, mig_profile="1g.10gb")
    assert created.status == 201 and (await created.json())["gpu_uuid"] == "MIG-node-slice-1"
    assert len(runtime.gpu_checks) == 2
    assert (await create(client, user_id="bob")).status == 201  # no slice: nothing to check
    assert len(runtime.gpu_checks) == 2


# --- a MIG instance another process holds --------------------------------------------


async def test_a_held_instance_ends_the_session_and_is_kept_to_destroy(make_client, runtime):
    nv = nvml(h100(H100))
    client = await make_client(
        gpu_factory=lambda: NvmlBackend(nv), default_mig_profile="3g.40gb", mig_dynamic=True
    )
    created = await (await create(client)).json()
    (gi,) = nv.gpus[0].gis.values()
    gi.held = True  # a monitoring daemon on the host (DCGM)
    resp = await client.delete(f"/sessions/{created['session_id']}")
    assert resp.status == 200, await resp.text()
    assert runtime.containers == {} and await client.app[keys.SESSIONS].list() == []

    listed = (await (await client.get("/gpus")).json())["gpus"][0]
    assert listed["to_destroy"] == [{"uuid": created["gpu_uuid"], "gpu_instance_id": gi.id}]
    again = await create(client)  # no lock-out, and never the held instance
    assert again.status == 201, await again.text()
    assert (await again.json())["gpu_uuid"] != created["gpu_uuid"]
    assert len(nv.gpus[0].gis) == 2

    allocator = client.app[keys.GPUS]
    await allocator.destroy_released()  # still held: logged, kept
    assert gi.id in nv.gpus[0].gis and allocator.to_destroy()
    gi.held = False
    await allocator.destroy_released()
    assert gi.id not in nv.gpus[0].gis and allocator.to_destroy() == []
