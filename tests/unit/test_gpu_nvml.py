import asyncio
import json
import logging
import math
import threading
import time

import pynvml
import pytest

from gateway.errors import GpuError, GpuInstanceInUse, NoGpuAvailable, UnknownMigProfile
from gateway.gpu import create_on_first, open_backend
from gateway.gpu.failed import FailedBackend
from gateway.gpu.none import NoneBackend
from gateway.gpu.nvml import NvmlBackend, probe
from tests.unit.fake_pynvml import A100_40GB, MIB, FakeGpu, FakeNvml, MigHandle, h100, h200

GIB = 1 << 30

A80 = "GPU-a80-0000"
A40 = "GPU-a40-0001"
L4 = "GPU-l4-0002"


def host(**options) -> FakeNvml:
    return FakeNvml(
        [
            FakeGpu(A80),
            FakeGpu(
                A40,
                name="NVIDIA A100-SXM4-40GB",
                memory_total=40960 * MIB,
                memory_used=1024 * MIB,
                utilization=37,
                power_mw=123_456,
                mig=False,
                mig_pending=True,
                profiles=list(A100_40GB),
            ),
            FakeGpu(L4, name="NVIDIA L4", mig=None, profiles=[], power_limit_mw=72_000),
        ],
        **options,
    )


@pytest.fixture
def nv():
    return host()


@pytest.fixture
async def backend(nv):
    backend = await NvmlBackend.open(nv)
    yield backend
    await backend.close()


# --- lifecycle -------------------------------------------------------------------------


async def test_open_initialises_and_close_shuts_down_once(nv):
    backend = await NvmlBackend.open(nv)
    assert nv.initialised == 1
    await backend.close()
    await backend.close()
    assert nv.initialised == 0
    assert nv.calls.count("nvmlShutdown") == 1


async def test_open_without_library_is_a_gpu_error():
    with pytest.raises(GpuError):
        await NvmlBackend.open(host(library=False))


async def test_auto_falls_back_to_none_and_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        backend = await open_backend("auto", state_dir=tmp_path, nv=host(library=False))
    assert isinstance(backend, NoneBackend)
    assert "running without GPUs" in caplog.text
    assert await backend.inventory() == []


async def test_auto_uses_nvml_when_it_starts(tmp_path, nv):
    backend = await open_backend("auto", state_dir=tmp_path, nv=nv)
    assert isinstance(backend, NvmlBackend) and backend.needs_device_request
    await backend.close()


@pytest.mark.parametrize(
    "code",
    [
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,  # driver upgraded, not yet reloaded
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_NO_PERMISSION,
    ],
)
@pytest.mark.parametrize("spec", ["auto", "nvml"])
async def test_nvml_there_but_broken_gives_a_failed_backend(tmp_path, code, spec):
    backend = await open_backend(spec, state_dir=tmp_path, nv=host(init_error=code))
    assert isinstance(backend, FailedBackend)
    assert str(pynvml.NVMLError(code)) in backend.reason and "nvidia-smi" in backend.reason
    with pytest.raises(GpuError, match="NVML is unavailable") as caught:
        await backend.inventory()
    assert caught.value.status == 503
    await backend.reclaim(set())  # waits for a restart with a working NVML


async def test_explicit_nvml_does_not_fall_back(tmp_path):
    with pytest.raises(GpuError):
        await open_backend("nvml", state_dir=tmp_path, nv=host(library=False))


async def test_unknown_spec(tmp_path):
    with pytest.raises(ValueError, match="auto, nvml, none"):
        await open_backend("cuda", state_dir=tmp_path)
    assert isinstance(await open_backend("none", state_dir=tmp_path), NoneBackend)


# --- inventory -------------------------------------------------------------------------


async def test_inventory_values_and_watts(backend):
    a80, a40, l4 = await backend.inventory()
    assert (a80.uuid, a80.index, a80.name) == (A80, 0, "NVIDIA A100-SXM4-80GB")
    assert (a80.mig_enabled, a80.mig_pending) == (True, True)
    assert a80.utilization is None  # NVML: NotSupported in MIG mode, so unknown, not 0
    assert a80.healthy and a80.memory_total == 81920 * MIB
    assert (a80.power_usage, a80.power_limit) == (61.5, 400.0)
    assert (a40.memory_total, a40.memory_used) == (40960 * MIB, 1024 * MIB)
    assert a40.memory_free == 39936 * MIB
    assert (a40.utilization, a40.temperature, a40.power_usage) == (37, 34, 123.456)
    assert (a40.mig_enabled, a40.mig_pending) == (False, True)
    assert (l4.mig_enabled, l4.mig_pending, l4.power_limit) == (False, False, 72.0)
    assert a40.mig_devices == () and l4.mig_devices == ()


async def test_mig_devices_skip_empty_slots_and_match_gi_ids(nv, backend):
    a80 = nv.gpus[0]
    gone = nv.precreate(a80, "1g.10gb", 0)  # slot 0
    big = nv.precreate(a80, "3g.40gb", 4)  # slot 1
    small = nv.precreate(a80, "1g.20gb", 2)  # slot 2
    del a80.gis[1].cis[0]  # the 1g.10gb's compute instance is destroyed: slot 0 empty
    del a80.gis[2]  # and the 3g.40gb's GPU instance: its id goes back to the pool
    bigger = nv.precreate(a80, "3g.40gb", 4)  # slot 1 again, GI id 2 again
    devices = (await backend.inventory())[0].mig_devices
    assert [(d.uuid, d.profile, d.gi_id, d.ci_id) for d in devices] == [
        (bigger.uuid, "3g.40gb", 2, 0),
        (small.uuid, "1g.20gb", 3, 0),
    ]
    assert big.uuid != bigger.uuid  # a reused id, a new MIG device
    assert devices[0].memory_bytes == 40192 * MIB
    assert gone.uuid not in {d.uuid for d in devices}
    assert nv.calls.count("nvmlDeviceGetMigDeviceHandleByIndex") == 7  # every slot tried


async def test_unprivileged_inventory_names_devices_from_their_name():
    nv = host(privileged=False)
    nv.precreate(nv.gpus[0], "2g.20gb", 4)
    backend = await NvmlBackend.open(nv)
    a80, a40, _ = await backend.inventory()
    (device,) = a80.mig_devices
    assert (device.profile, device.gi_id) == ("2g.20gb", 1)
    assert "nvmlDeviceGetGpuInstances" in nv.calls  # tried, refused, fell back
    # nvml.h: a MIG-mode GPU's own memory info needs privileges; unknown, not a failure
    assert a80.healthy and (a80.memory_total, a80.memory_used) == (None, None)
    assert a40.memory_total == 40960 * MIB  # MIG off: readable by anyone
    await backend.close()


async def test_monitor_rights_read_everything_but_change_nothing():
    nv = host(privileged=False, monitor=True)
    nv.precreate(nv.gpus[0], "2g.20gb", 4)
    backend = await NvmlBackend.open(nv)
    a80 = (await backend.inventory())[0]
    assert a80.memory_total == 81920 * MIB
    assert [p.memory_slices for p in await backend.profiles()][:2] == [1, 1]
    with pytest.raises(GpuError, match="NVIDIA_MIG_CONFIG_DEVICES"):
        await backend.create_instance(A80, "1g.10gb")
    await backend.close()


async def test_mig_devices_report_their_used_memory(nv, backend):
    nv.precreate(nv.gpus[0], "3g.40gb", 4)
    nv.gpus[0].gis[1].memory_used = 5 * GIB
    (device,) = (await backend.inventory())[0].mig_devices
    assert (device.memory_bytes, device.memory_used) == (40192 * MIB, 5 * GIB)


@pytest.mark.parametrize("privileged", [True, False])
async def test_a_split_gpu_instance_is_reported_by_compute_instance(privileged):
    nv = host(privileged=privileged)
    nv.precreate(nv.gpus[0], "3g.40gb", 0, split=(1, 2))
    nv.precreate(nv.gpus[0], "3g.40gb", 4)
    backend = await NvmlBackend.open(nv)
    devices = (await backend.inventory())[0].mig_devices
    assert [(d.profile, d.gi_id, d.ci_id, d.split) for d in devices] == [
        ("1c.3g.40gb", 1, 0, True),
        ("2c.3g.40gb", 1, 1, True),
        ("3g.40gb", 2, 0, False),
    ]
    assert devices[0].memory_bytes == devices[1].memory_bytes == 40192 * MIB  # shared
    await backend.close()


async def test_a_lone_small_compute_instance_counts_as_split(nv, backend):
    nv.precreate(nv.gpus[0], "4g.40gb", 0, split=(2,))
    (device,) = (await backend.inventory())[0].mig_devices
    assert (device.profile, device.split) == ("2c.4g.40gb", True)


async def test_split_is_read_from_the_name_where_attributes_are_missing(nv, backend):
    nv.failures["nvmlDeviceGetAttributes"] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    nv.precreate(nv.gpus[0], "3g.40gb", 0, split=(1, 1, 1))
    devices = (await backend.inventory())[0].mig_devices
    assert {(d.profile, d.split) for d in devices} == {("1c.3g.40gb", True)}


async def test_old_style_mig_uuids_are_reported_as_nvml_gives_them():
    nv = host()
    nv.gpus[0].legacy_uuids = True
    nv.precreate(nv.gpus[0], "1g.10gb", 6)
    backend = await NvmlBackend.open(nv)
    (device,) = (await backend.inventory())[0].mig_devices
    assert device.uuid == f"MIG-{A80}/1/0"
    await backend.destroy_instance(device.uuid)
    assert (await backend.inventory())[0].mig_devices == ()
    await backend.close()


async def test_nvml_failure_becomes_gpu_error(nv, backend):
    nv.failures["nvmlDeviceGetCount"] = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuError, match="GPU is lost"):
        await backend.inventory()


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN])
async def test_one_failing_gpu_is_unhealthy_and_the_others_are_served(nv, backend, code, caplog):
    nv.gpus[1].fault = code
    with caplog.at_level(logging.ERROR):
        a80, a40, l4 = await backend.inventory()
        await backend.inventory()
    assert a80.healthy and l4.healthy and l4.uuid == L4
    assert (a40.index, a40.uuid, a40.name, a40.healthy) == (1, None, None, False)
    assert str(pynvml.NVMLError(code)) in a40.error
    assert caplog.text.count("GPU 1 (None) is unhealthy") == 1  # logged once, not per call
    assert {p.gpu_name for p in await backend.profiles()} == {"NVIDIA A100-SXM4-80GB"}
    nv.gpus[0].fault = code  # the MIG GPU too: its profiles are skipped, not an error
    assert await backend.profiles() == []
    nv.gpus[0].fault = nv.gpus[1].fault = None
    assert all(g.healthy for g in await backend.inventory())


async def test_destroy_skips_a_failing_gpu_when_looking_up_by_uuid(nv, backend):
    mig = nv.precreate(nv.gpus[0], "1g.10gb", 6)  # not the gateway's: found by UUID
    nv.gpus.insert(0, FakeGpu("GPU-lost", fault=pynvml.NVML_ERROR_GPU_IS_LOST))
    await backend.destroy_instance(mig.uuid)
    assert nv.gpus[1].gis == {}


async def test_one_lost_gpu_does_not_stop_create_and_destroy_on_the_others(tmp_path):
    nv = FakeNvml([FakeGpu("GPU-lost-0"), FakeGpu(A80)])
    backend = await NvmlBackend.open(nv, ledger_path=tmp_path / "ledger.json")
    on_lost = await backend.create_instance("GPU-lost-0", "1g.10gb")
    nv.gpus[0].fault = pynvml.NVML_ERROR_GPU_IS_LOST  # Xid 79: off the bus
    device = await backend.create_instance(A80, "1g.10gb")
    await backend.destroy_instance(device.uuid)
    assert nv.gpus[1].gis == {}
    await backend.destroy_instance(on_lost.uuid)  # its GPU needs a reset anyway: gone
    assert json.loads((tmp_path / "ledger.json").read_text())["instances"] == []
    await backend.close()


@pytest.mark.parametrize(
    ("removed", "temperature"),
    [
        (["nvmlDeviceGetTemperature"], 34),  # NVML 13 deprecates it; CUDA 14 removes it
        (["nvmlDeviceGetTemperatureV"], 34),  # a driver older than the versioned call
        (["nvmlDeviceGetTemperature", "nvmlDeviceGetTemperatureV"], None),
    ],
)
async def test_a_missing_telemetry_call_is_unknown_not_unhealthy(nv, backend, removed, temperature):
    for name in removed:
        nv.failures[name] = pynvml.NVML_ERROR_FUNCTION_NOT_FOUND
    a80, _, l4 = await backend.inventory()
    assert a80.healthy and l4.healthy and l4.temperature == temperature


async def test_a_mig_device_failing_mid_walk_degrades_only_that_device(nv, backend):
    a80 = nv.gpus[0]
    vanishing = nv.precreate(a80, "1g.10gb", 0)  # slot 0
    kept = nv.precreate(a80, "3g.40gb", 4)  # slot 1
    real_handle, real_memory = nv.nvmlDeviceGetMigDeviceHandleByIndex, nv.nvmlDeviceGetMemoryInfo

    def handle_then_dci(gpu, slot):  # an outside nvidia-smi mig -dci, right after the lookup
        mig = real_handle(gpu, slot)
        if slot == 0:
            gpu.gis[mig.gi_id].cis.clear()
        return mig

    def memory(handle):
        if isinstance(handle, MigHandle):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return real_memory(handle)

    nv.nvmlDeviceGetMigDeviceHandleByIndex = handle_then_dci
    nv.nvmlDeviceGetMemoryInfo = memory
    gpu = (await backend.inventory())[0]
    assert gpu.healthy
    (device,) = gpu.mig_devices
    assert device.uuid == kept.uuid and device.uuid != vanishing.uuid
    assert (device.memory_bytes, device.memory_used) == (40192 * MIB, None)  # the profile's


# --- profiles --------------------------------------------------------------------------


async def test_profiles_use_info_id_not_enum_index(backend):
    profiles = await backend.profiles()
    assert {p.gpu_name for p in profiles} == {"NVIDIA A100-SXM4-80GB"}  # MIG-enabled only
    table = [
        (p.name, p.profile_id, p.compute_slices, p.memory_slices, p.max_instances) for p in profiles
    ]
    assert table == [
        ("1g.10gb", 19, 1, 1, 7),
        ("1g.10gb+me", 20, 1, 1, 1),
        ("1g.20gb", 15, 1, 2, 4),
        ("2g.20gb", 14, 2, 2, 3),
        ("3g.40gb", 9, 3, 4, 2),
        ("4g.40gb", 5, 4, 4, 1),
        ("7g.80gb", 0, 7, 8, 1),
    ]
    assert profiles[0].memory_bytes == 9856 * MIB


async def test_h100_and_h200_profiles_as_nvml_names_them():
    nv = FakeNvml([h100("GPU-h100"), h200("GPU-h200")])
    backend = await NvmlBackend.open(nv)
    table = {
        (p.gpu_name, p.name): (p.profile_id, p.memory_bytes // MIB)
        for p in await backend.profiles()
    }
    assert table[("NVIDIA H100 80GB HBM3", "3g.40gb")] == (9, 40448)
    assert table[("NVIDIA H100 80GB HBM3", "7g.80gb")] == (0, 81152)
    assert table[("NVIDIA H200", "3g.71gb")][0] == 9
    for (model, name), (_, mib) in table.items():  # NVML's naming rule fits the sizes
        assert name.split("+")[0].endswith(f".{math.ceil(mib / 1024)}gb"), (model, name)
    assert not any(name == "3g.20gb" for _, name in table)  # the seed default is A100-40GB's
    device = await backend.create_instance("GPU-h200", "2g.35gb")
    mib = table[("NVIDIA H200", "2g.35gb")][1]
    assert (device.profile, device.memory_bytes) == ("2g.35gb", mib * MIB)
    await backend.close()


async def test_profiles_once_per_model():
    nv = FakeNvml([FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    backend = await NvmlBackend.open(nv)
    assert len(await backend.profiles()) == 7
    await backend.close()


async def test_old_driver_profile_names_are_derived():
    nv = host(old_driver=True)
    backend = await NvmlBackend.open(nv)
    names = [p.name for p in await backend.profiles()]
    assert names[:5] == ["1g.10gb", "1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb"]
    await backend.close()


async def test_unprivileged_profiles_have_unknown_memory_slices():
    backend = await NvmlBackend.open(host(privileged=False))
    assert {p.memory_slices for p in await backend.profiles()} == {0}
    await backend.close()


# --- create ----------------------------------------------------------------------------


async def test_create_places_and_returns_the_mig_device(nv, backend):
    device = await backend.create_instance(A80, "3g.40gb")
    assert (device.gpu_uuid, device.profile, device.gi_id, device.ci_id) == (A80, "3g.40gb", 1, 0)
    assert device.memory_bytes == 40192 * MIB
    assert nv.mig_uuids(nv.gpus[0]) == [device.uuid]
    gi = nv.gpus[0].gis[1]
    assert (gi.profile.id, gi.start) == (9, 4)  # info.id 9 (enum index 2), highest start
    assert (await backend.inventory())[0].mig_devices == (device,)


async def test_create_until_full(nv, backend):
    made = [await backend.create_instance(A80, "1g.10gb") for _ in range(7)]
    assert len({d.uuid for d in made}) == 7
    with pytest.raises(NoGpuAvailable):
        await backend.create_instance(A80, "1g.10gb")
    assert "nvmlDeviceGetGpuInstanceRemainingCapacity" in nv.calls


async def test_create_respects_existing_placements(nv, backend):
    nv.precreate(nv.gpus[0], "4g.40gb", 0)
    await backend.create_instance(A80, "3g.40gb")
    with pytest.raises(NoGpuAvailable):
        await backend.create_instance(A80, "1g.10gb")


async def test_insufficient_resources_on_create_is_no_gpu(nv, backend):
    nv.failures["nvmlDeviceCreateGpuInstanceWithPlacement"] = (
        pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES
    )
    with pytest.raises(NoGpuAvailable):
        await backend.create_instance(A80, "1g.10gb")


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES, NoGpuAvailable),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuError),
        (pynvml.NVML_ERROR_UNKNOWN, GpuError),
    ],
)
async def test_compute_instance_failure_rolls_back_the_gpu_instance(nv, backend, code, error):
    nv.failures["nvmlGpuInstanceCreateComputeInstance"] = code
    with pytest.raises(error):
        await backend.create_instance(A80, "2g.20gb")
    assert nv.gpus[0].gis == {}
    assert nv.calls[-1] == "nvmlGpuInstanceDestroy"


async def test_no_permission_says_what_rights_are_missing():
    backend = await NvmlBackend.open(host(privileged=False))
    with pytest.raises(GpuError) as caught:
        await backend.create_instance(A80, "1g.10gb")
    hint = caught.value.message
    assert "CAP_SYS_ADMIN" in hint and "SYS_ADMIN" in hint
    assert "NVIDIA_MIG_CONFIG_DEVICES=all" in hint and "NVIDIA_MIG_MONITOR_DEVICES=all" in hint
    assert "capabilities" not in hint  # the deprecated /proc capabilities path
    await backend.close()


@pytest.mark.parametrize("profile", ["1g.5gb", "9g.1tb"])
async def test_profile_the_gpu_lacks_is_unknown(backend, profile):
    with pytest.raises(UnknownMigProfile):
        await backend.create_instance(A80, profile)


async def test_create_on_a_gpu_without_mig_or_unknown_gpu(backend):
    with pytest.raises(GpuError, match="MIG is not enabled"):
        await backend.create_instance(A40, "1g.5gb")
    with pytest.raises(GpuError, match="no GPU"):
        await backend.create_instance("GPU-missing", "1g.10gb")


async def test_cancelled_create_destroys_what_it_made(nv, backend):
    reached, release = nv.block("nvmlGpuInstanceCreateComputeInstance")
    task = asyncio.create_task(backend.create_instance(A80, "1g.10gb"))
    await asyncio.to_thread(reached.wait, 30)  # its GPU instance exists now
    assert len(nv.gpus[0].gis) == 1
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nv.gpus[0].gis == {}


async def test_a_hung_nvml_call_marks_nvml_failed_until_it_returns(nv):
    nv.nvmlInit()
    backend = NvmlBackend(nv, call_timeout=0.2)
    reached, release = nv.block("nvmlDeviceGetCount")
    with pytest.raises(GpuError, match="reading the GPU inventory has not returned"):
        await backend.inventory()
    assert reached.is_set() and backend.hung is not None
    for _ in range(40):  # later callers fail at once and hold no thread of the shared pool
        with pytest.raises(GpuError, match="NVML is not answering"):
            await backend.profiles()
    assert await asyncio.to_thread(lambda: "the shared pool works") == "the shared pool works"
    release.set()
    for _ in range(100):  # the hung call returns on the worker thread
        if backend.hung is None:
            break
        await asyncio.sleep(0.05)
    assert len(await backend.inventory()) == 3
    await backend.close()


async def test_create_on_first_skips_full_gpus():
    nv = FakeNvml([FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    backend = await NvmlBackend.open(nv)
    nv.precreate(nv.gpus[0], "7g.80gb", 0)
    targets = [("GPU-1", "3g.40gb"), ("GPU-2", "3g.40gb")]
    device = await create_on_first(backend, targets)
    assert device.gpu_uuid == "GPU-2"
    await create_on_first(backend, targets)
    with pytest.raises(NoGpuAvailable):
        await create_on_first(backend, targets)
    await backend.close()


# --- destroy ---------------------------------------------------------------------------


async def test_destroy_removes_compute_then_gpu_instance(nv, backend):
    device = await backend.create_instance(A80, "1g.10gb")
    nv.calls.clear()
    await backend.destroy_instance(device.uuid)
    assert nv.gpus[0].gis == {}
    destroys = [c for c in nv.calls if c.endswith("Destroy")]
    assert destroys == ["nvmlComputeInstanceDestroy", "nvmlGpuInstanceDestroy"]


async def test_destroy_of_a_gone_instance_is_success(nv, backend):
    device = await backend.create_instance(A80, "1g.10gb")
    await backend.destroy_instance(device.uuid)
    await backend.destroy_instance(device.uuid)
    await backend.destroy_instance("MIG-00000000-0000-0000-0000-000000000000")
    await backend.destroy_instance(f"MIG-{A80}/3/0")
    await backend.destroy_instance("MIG-GPU-unknown/1/0")


async def test_destroy_by_old_form_of_a_modern_device(nv, backend):
    device = await backend.create_instance(A80, "2g.20gb")
    await backend.destroy_instance(f"MIG-{A80}/{device.gi_id}/{device.ci_id}")
    assert nv.gpus[0].gis == {}


async def test_destroy_without_rights(nv, backend):
    device = await backend.create_instance(A80, "1g.10gb")
    nv.privileged = False
    with pytest.raises(GpuError, match="CAP_SYS_ADMIN"):
        await backend.destroy_instance(device.uuid)


async def test_a_held_gpu_instance_is_destroyed_by_id_on_retry(nv, backend):
    device = await backend.create_instance(A80, "3g.40gb")
    gi = nv.gpus[0].gis[device.gi_id]
    gi.held = True  # e.g. a monitoring daemon has it open
    with pytest.raises(GpuInstanceInUse) as caught:
        await backend.destroy_instance(device.uuid)
    assert caught.value.code == "gpu_instance_in_use" and caught.value.status == 409
    assert gi.cis == {} and device.gi_id in nv.gpus[0].gis  # half done: the MIG UUID is gone
    assert (await backend.inventory())[0].mig_devices == ()
    with pytest.raises(GpuInstanceInUse):
        await backend.destroy_instance(device.uuid)  # still held: still not "already gone"
    gi.held = False
    await backend.destroy_instance(device.uuid)
    assert nv.gpus[0].gis == {}
    await backend.create_instance(A80, "3g.40gb")
    await backend.create_instance(A80, "3g.40gb")  # both 3g slots are free again


async def test_a_compute_instance_in_use_is_left_whole(nv, backend):
    device = await backend.create_instance(A80, "1g.10gb")
    nv.gpus[0].gis[device.gi_id].cis[device.ci_id].held = True
    with pytest.raises(GpuInstanceInUse):
        await backend.destroy_instance(device.uuid)
    assert [d.uuid for d in (await backend.inventory())[0].mig_devices] == [device.uuid]


# --- serialisation and the probe -------------------------------------------------------


async def test_nvml_calls_never_overlap(nv, backend):
    active, peak = 0, 0
    guard = threading.Lock()
    real = nv.nvmlDeviceGetCount

    def count():
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with guard:
            active -= 1
        return real()

    nv.nvmlDeviceGetCount = count
    await asyncio.gather(*(backend.inventory() for _ in range(5)))
    assert peak == 1


async def test_probe_reports_everything_and_changes_nothing(nv):
    nv.precreate(nv.gpus[0], "3g.40gb", 4)
    report = await probe(nv)
    json.dumps(report)
    assert nv.initialised == 0
    assert not [c for c in nv.calls if any(w in c for w in ("Create", "Destroy", "Set"))]
    assert report["driver_version"] == "550.54.15"
    a80, a40, l4 = report["gpus"]
    assert a80["power_usage_mw"] == 61_500
    assert [d["gi_id"] for d in a80["mig_devices"]] == [1]
    assert a80["mig_devices"][0]["slices"] == {"gpu_instance": 3, "compute_instance": 3}
    three = next(p for p in a80["profiles"] if p.get("name") == "3g.40gb")
    assert (three["enum_index"], three["id"], three["remaining_capacity"]) == (2, 9, 1)
    assert three["placements"] == [{"start": 0, "size": 4}, {"start": 4, "size": 4}]
    assert three["gpu_instances"] == [{"id": 1, "start": 4, "size": 4}]
    assert "profiles" not in a40 and l4["mig_mode"] is None
    failed = {e["call"] for e in report["errors"]}
    assert "nvmlDeviceGetUtilizationRates(0)" in failed
    assert "nvmlDeviceGetMigMode(2)" in failed


async def test_probe_without_nvml():
    report = await probe(host(library=False))
    assert report["nvml"] is False
    assert report["errors"][0]["code"] == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND


# --- utilisation (idle reclaim) --------------------------------------------------------


async def test_whole_gpu_utilisation_busy_and_idle(nv, backend):
    assert (await backend.utilization(A40)).utilization == 37
    nv.gpus[1].utilization = 0
    assert (await backend.utilization(A40)).utilization == 0


@pytest.mark.parametrize("running", [True, False])
async def test_ampere_mig_slice_reports_only_its_processes(nv, backend, running):
    ci = nv.precreate(nv.gpus[0], "3g.40gb", 0)
    ci.held = running  # a CUDA process runs on the slice
    reading = await backend.utilization(ci.uuid)
    assert reading.utilization is None
    assert reading.processes is running
    assert "nvmlGpmMigSampleGet" not in nv.calls  # Ampere has no GPM


async def test_hopper_mig_slice_reads_gpm_sm_utilisation():
    nv = FakeNvml([h100("GPU-h100")])
    backend = await NvmlBackend.open(nv)
    ci = nv.precreate(nv.gpus[0], "3g.40gb", 0)
    gi = nv.gpus[0].gis[next(iter(nv.gpus[0].gis))]
    gi.sm_util = 63.0
    first = await backend.utilization(ci.uuid)  # one sample is not a rate yet
    assert first.utilization is None and first.processes is False
    assert (await backend.utilization(ci.uuid)).utilization == 63.0
    gi.sm_util = 0.0
    assert (await backend.utilization(ci.uuid)).utilization == 0.0
    assert len(nv.gpm_samples) == 1  # each older sample was freed
    await backend.destroy_instance(ci.uuid)
    assert nv.gpm_samples == {}  # and the last one with its slice
    await backend.close()


async def test_utilisation_of_the_others_is_read_while_one_gpu_is_lost(nv, backend):
    ci = nv.precreate(nv.gpus[0], "3g.40gb", 0)
    nv.gpus[1].fault = pynvml.NVML_ERROR_GPU_IS_LOST  # lookups by UUID fail for every GPU
    assert (await backend.utilization(ci.uuid)).processes is False
    assert (await backend.utilization(L4)).utilization is not None


async def test_utilisation_of_a_lost_gpu_is_an_error(nv, backend):
    nv.gpus[1].fault = pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GpuError):
        await backend.utilization(A40)
