"""The ledger of created MIG instances: destroy by id across restarts, reclaim at start-up,
and never destroy an instance that only shares a recorded id (ids are reused, instances
vanish at a reboot or GPU reset, MIG may be turned off)."""

import json

import pytest

from gateway.errors import GpuError, GpuInstanceInUse
from gateway.gpu.allocator import GpuAllocator
from gateway.gpu.ledger import Created, Ledger
from gateway.gpu.nvml import NvmlBackend
from gateway.models import CreateRequest
from tests.unit.fake_pynvml import FakeGpu, FakeNvml

A80 = "GPU-a80-0000"


@pytest.fixture
def nv():
    return FakeNvml([FakeGpu(A80)])


@pytest.fixture
def path(tmp_path):
    return tmp_path / "state" / "nvml-instances.json"


def test_ledger_persists_and_survives_a_reload(path):
    ledger = Ledger(path)
    ledger.add(Created("MIG-a", A80, 1, 0))
    ledger.add(Created("MIG-b", A80, 2, 0))
    ledger.remove("MIG-a")
    ledger.remove("MIG-unknown")
    assert list(Ledger(path)) == [Created("MIG-b", A80, 2, 0)]
    assert list(Ledger()) == []  # memory only


@pytest.mark.parametrize("text", ["not json", '{"version": 9, "instances": []}', "[]"])
def test_an_unreadable_ledger_refuses_to_start(path, text):
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(GpuError) as caught:
        Ledger(path)
    assert str(path) in caught.value.log_message


async def test_a_create_that_cannot_be_recorded_is_rolled_back(nv, path):
    backend = await NvmlBackend.open(nv, ledger_path=path)
    path.mkdir(parents=True)  # a directory: the ledger can't be written there
    with pytest.raises(GpuError, match="could not record"):
        await backend.create_instance(A80, "1g.10gb")
    assert nv.gpus[0].gis == {}
    await backend.close()


async def test_a_half_destroyed_instance_is_destroyed_by_id_after_a_restart(nv, path):
    first = await NvmlBackend.open(nv, ledger_path=path)
    device = await first.create_instance(A80, "3g.40gb")
    nv.gpus[0].gis[device.gi_id].held = True
    with pytest.raises(GpuInstanceInUse):
        await first.destroy_instance(device.uuid)
    await first.close()
    nv.gpus[0].gis[device.gi_id].held = False
    second = await NvmlBackend.open(nv, ledger_path=path)
    await second.destroy_instance(device.uuid)  # the session's row still names it
    assert nv.gpus[0].gis == {}
    assert json.loads(path.read_text())["instances"] == []
    await second.close()


async def test_start_up_reclaims_what_no_session_holds(nv, path):
    first = await NvmlBackend.open(nv, ledger_path=path)
    kept = await first.create_instance(A80, "1g.10gb")  # a live session's
    orphan = await first.create_instance(A80, "1g.10gb")  # crashed before its row was stored
    bare = await first.create_instance(A80, "2g.20gb")  # its rollback's destroy was refused
    nv.gpus[0].gis[bare.gi_id].held = True
    with pytest.raises(GpuInstanceInUse):
        await first.destroy_instance(bare.uuid)
    await first.close()
    before = set(nv.gpus[0].gis)
    admin = nv.precreate(nv.gpus[0], "1g.20gb", 4)  # made by an admin: never touched
    (admin_gi,) = set(nv.gpus[0].gis) - before
    del nv.gpus[0].gis[admin_gi].cis[admin.id]  # even when left without a compute instance

    second = await NvmlBackend.open(nv, ledger_path=path)
    await second.reclaim({kept.uuid})  # the bare one is still held: left, retried later
    assert bare.gi_id in nv.gpus[0].gis and orphan.gi_id not in nv.gpus[0].gis
    nv.gpus[0].gis[bare.gi_id].held = False
    await second.reclaim({kept.uuid})
    assert sorted(nv.gpus[0].gis) == sorted([kept.gi_id, admin_gi])
    assert [d.uuid for d in (await second.inventory())[0].mig_devices] == [kept.uuid]
    assert [e["mig_uuid"] for e in json.loads(path.read_text())["instances"]] == [kept.uuid]
    await second.close()


async def test_reclaim_forgets_instances_of_a_gpu_that_is_gone(nv, path):
    first = await NvmlBackend.open(nv, ledger_path=path)
    await first.create_instance(A80, "1g.10gb")
    await first.close()
    second = await NvmlBackend.open(FakeNvml([FakeGpu("GPU-other")]), ledger_path=path)
    await second.reclaim(set())
    assert list(Ledger(path)) == []
    await second.close()


async def test_a_dynamic_create_first_reclaims_what_a_failed_rollback_left(nv):
    backend = await NvmlBackend.open(nv)
    await backend.create_instance(A80, "7g.80gb")  # its session's rollback could not destroy it
    allocator = GpuAllocator(backend, default_profile=None, dynamic=True)
    request = CreateRequest(user_id="ann", ttl_seconds=60, image="img", mig_profile="3g.40gb")
    allocation = await allocator.allocate(request, set())
    assert allocation.created and allocation.profile == "3g.40gb"
    assert [gi.profile.name for gi in nv.gpus[0].gis.values()] == ["3g.40gb"]
    await backend.close()


def gi_at(gpu, start):
    return next(gi for gi in gpu.gis.values() if gi.start == start)


async def held_and_released(nv, path, profile="3g.40gb", boot_id="boot-1"):
    """A session's instance whose release a host process refused: CI gone, GI kept."""
    backend = await NvmlBackend.open(nv, ledger_path=path, boot_id=boot_id)
    device = await backend.create_instance(A80, profile)
    nv.gpus[0].gis[device.gi_id].held = True
    with pytest.raises(GpuInstanceInUse):
        await backend.destroy_instance(device.uuid)
    assert [t.mig_uuid for t in backend.to_destroy()] == [device.uuid]
    nv.gpus[0].gis[device.gi_id].held = False
    return backend, device


async def test_an_instance_made_by_someone_else_on_a_reused_id_survives(nv, path):
    backend, device = await held_and_released(nv, path)
    del nv.gpus[0].gis[device.gi_id]  # the admin cleans up with nvidia-smi mig -dgi
    admin = nv.precreate(nv.gpus[0], "3g.40gb", 4)  # same id, profile and placement
    assert gi_at(nv.gpus[0], 4).id == device.gi_id
    await backend.destroy_released()
    assert nv.mig_uuids(nv.gpus[0]) == [admin.uuid]  # its MIG UUID is not the recorded one
    assert backend.to_destroy() == [] and list(Ledger(path, boot_id="boot-1")) == []
    await backend.close()


async def test_a_gpu_instance_of_another_profile_on_a_reused_id_survives(nv, path):
    backend, device = await held_and_released(nv, path)
    del nv.gpus[0].gis[device.gi_id]
    nv.precreate(nv.gpus[0], "1g.10gb", 0)
    bare = gi_at(nv.gpus[0], 0)
    bare.cis.clear()  # only its GPU instance, as a half-destroyed one would be
    assert bare.id == device.gi_id
    await backend.reclaim(set())
    assert bare.id in nv.gpus[0].gis and list(Ledger(path, boot_id="boot-1")) == []
    await backend.close()


async def test_a_new_instance_evicts_older_entries_for_its_id(nv, path):
    backend, device = await held_and_released(nv, path)
    del nv.gpus[0].gis[device.gi_id]
    newer = await backend.create_instance(A80, "3g.40gb")  # another session's, same GI id
    assert newer.gi_id == device.gi_id
    assert [e.mig_uuid for e in Ledger(path, boot_id="boot-1")] == [newer.uuid]
    await backend.destroy_released()
    await backend.reclaim({newer.uuid})
    assert nv.mig_uuids(nv.gpus[0]) == [newer.uuid]
    await backend.close()


async def test_after_a_reboot_the_ledger_forgets_and_the_admins_instances_survive(nv, path):
    backend, _ = await held_and_released(nv, path)
    await backend.close()
    nv.reset()  # reboot: MIG instances are gone; an admin (or mig-manager) re-creates some
    admin = nv.precreate(nv.gpus[0], "3g.40gb", 4)
    after = await NvmlBackend.open(nv, ledger_path=path, boot_id="boot-2")
    assert after.to_destroy() == [] and json.loads(path.read_text())["instances"] == []
    await after.reclaim(set())
    assert nv.mig_uuids(nv.gpus[0]) == [admin.uuid]
    await after.close()


async def test_after_a_gpu_reset_only_matching_instances_are_destroyed(nv, path):
    backend = await NvmlBackend.open(nv, ledger_path=path, boot_id="boot-1")
    lost = await backend.create_instance(A80, "3g.40gb")  # a session's; the GPU is reset
    nv.reset()
    admin = nv.precreate(nv.gpus[0], "3g.40gb", 4)  # same id, profile, placement
    await backend.destroy_instance(lost.uuid)  # the session ends: already gone
    assert nv.mig_uuids(nv.gpus[0]) == [admin.uuid] and list(Ledger(path, boot_id="boot-1")) == []
    await backend.close()


async def test_release_after_mig_was_turned_off_counts_as_gone(nv, path):
    backend = await NvmlBackend.open(nv, ledger_path=path, boot_id="boot-1")
    device = await backend.create_instance(A80, "1g.10gb")
    nv.reset()
    nv.gpus[0].mig = False  # nvml.h: GetGpuInstanceById is NotSupported without MIG
    await backend.destroy_instance(device.uuid)
    assert list(Ledger(path, boot_id="boot-1")) == []
    await backend.close()


async def test_an_instance_a_crash_left_before_it_was_recorded_is_reclaimed(nv, path):
    crashed = Created(None, A80, None, None, 9, 4, "boot-1")  # an intent: 3g.40gb at 4
    unfinished = Created(None, A80, None, None, 19, 0, "boot-1")  # 1g.10gb at 0
    ledger = Ledger(path, boot_id="boot-1")
    ledger.add(crashed)
    ledger.add(unfinished)
    nv.precreate(nv.gpus[0], "3g.40gb", 4)
    gi_at(nv.gpus[0], 4).cis.clear()  # the crash came before its compute instance
    other = nv.precreate(nv.gpus[0], "1g.10gb", 0)  # has a compute instance: not ours to take
    backend = await NvmlBackend.open(nv, ledger_path=path, boot_id="boot-1")
    await backend.reclaim(set())
    assert nv.mig_uuids(nv.gpus[0]) == [other.uuid] and len(nv.gpus[0].gis) == 1
    assert list(Ledger(path, boot_id="boot-1")) == []
    await backend.close()


async def test_a_create_writes_its_intent_before_creating(nv, path):
    backend = await NvmlBackend.open(nv, ledger_path=path, boot_id="boot-1")
    seen = []
    real = nv.nvmlDeviceCreateGpuInstanceWithPlacement

    def create(*args):
        seen.extend(Ledger(path, boot_id="boot-1"))
        return real(*args)

    nv.nvmlDeviceCreateGpuInstanceWithPlacement = create
    device = await backend.create_instance(A80, "3g.40gb")
    assert seen == [Created(None, A80, None, None, 9, 4, "boot-1")]
    assert list(Ledger(path, boot_id="boot-1")) == [
        Created(device.uuid, A80, device.gi_id, device.ci_id, 9, 4, "boot-1")
    ]
    await backend.close()


def test_a_version_1_ledger_is_read(path):
    path.parent.mkdir()
    path.write_text(json.dumps({"version": 1, "instances": [
        {"mig_uuid": "MIG-a", "gpu_uuid": A80, "gi_id": 1, "ci_id": 0}]}))  # fmt: skip
    assert list(Ledger(path, boot_id="boot-1")) == [Created("MIG-a", A80, 1, 0)]
