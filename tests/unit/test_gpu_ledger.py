"""The ledger of created MIG instances: destroy by id across restarts, reclaim at start-up."""

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
    admin = nv.precreate(nv.gpus[0], "1g.20gb", 6)  # made by an admin: never touched
    del nv.gpus[0].gis[7].cis[admin.id]  # even when left without a compute instance

    second = await NvmlBackend.open(nv, ledger_path=path)
    await second.reclaim({kept.uuid})  # the bare one is still held: left, retried later
    assert bare.gi_id in nv.gpus[0].gis and orphan.gi_id not in nv.gpus[0].gis
    nv.gpus[0].gis[bare.gi_id].held = False
    await second.reclaim({kept.uuid})
    assert sorted(nv.gpus[0].gis) == sorted([kept.gi_id, 7])
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
