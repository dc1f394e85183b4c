import asyncio
import json
import re
from pathlib import Path

import pytest

from gateway.errors import GpuError, NoGpuAvailable, UnknownMigProfile
from gateway.gpu import open_backend
from gateway.gpu.sim import SimBackend

EXAMPLES = Path(__file__).parents[2] / "examples"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
MIB = 1 << 20


def topology(tmp_path: Path, gpus: list, name: str = "topo.json", **extra) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"gpus": gpus, **extra}))
    return path


@pytest.fixture
def a100(tmp_path):
    return topology(tmp_path, [{"model": "A100-80GB", "mig": True}])


async def test_mixed_example_topology():
    sim = SimBackend(EXAMPLES / "topology-mixed.json")
    gpus = await sim.inventory()
    assert [(g.index, g.name, g.mig_enabled) for g in gpus] == [
        (0, "NVIDIA A100-SXM4-80GB", True),
        (1, "NVIDIA H100 80GB HBM3", True),
        (2, "NVIDIA A100-SXM4-40GB", False),
    ]
    assert all(re.fullmatch(f"GPU-{UUID}", g.uuid) for g in gpus)
    assert gpus[0].mig_devices == ()
    h100 = gpus[1].mig_devices
    assert [(d.profile, d.gi_id, d.ci_id) for d in h100] == [
        ("3g.40gb", 1, 0),
        ("2g.20gb", 2, 0),
        ("1g.10gb", 3, 0),
    ]
    assert all(re.fullmatch(f"MIG-{UUID}", d.uuid) and d.gpu_uuid == gpus[1].uuid for d in h100)
    assert h100[0].memory_bytes == 40448 * MIB
    assert gpus[2].memory_total == 40960 * MIB
    assert gpus[0].power_limit == 400.0
    assert sim.needs_device_request is False


@pytest.mark.parametrize("name", ["a100-80gb", "mixed", "h200"])
async def test_every_example_loads(name):
    assert await SimBackend(EXAMPLES / f"topology-{name}.json").inventory()


async def test_uuids_are_stable_across_reloads_and_distinct_per_host(tmp_path):
    gpus = [{"model": "H100-80GB", "mig": True, "instances": ["1g.10gb", "1g.10gb"]}]
    first = await SimBackend(topology(tmp_path, gpus, host="lab")).inventory()
    again = await SimBackend(topology(tmp_path, gpus, host="lab")).inventory()
    other = await SimBackend(topology(tmp_path, gpus, host="elsewhere")).inventory()
    assert first == again
    assert first[0].uuid != other[0].uuid
    assert len({d.uuid for d in first[0].mig_devices}) == 2


async def test_profiles_of_mig_enabled_models_only():
    sim = SimBackend(EXAMPLES / "topology-mixed.json")
    profiles = await sim.profiles()
    assert {p.gpu_name for p in profiles} == {"NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"}
    one = next(p for p in profiles if p.gpu_name.startswith("NVIDIA A1") and p.name == "1g.10gb")
    assert (one.profile_id, one.compute_slices, one.memory_slices, one.max_instances) == (
        19,
        1,
        1,
        7,
    )
    assert one.memory_bytes == 9856 * MIB


async def test_a100_80gb_takes_exactly_seven_1g_instances(a100):
    sim = SimBackend(a100)
    gpu = (await sim.inventory())[0].uuid
    made = [await sim.create_instance(gpu, "1g.10gb") for _ in range(7)]
    assert len({d.uuid for d in made}) == 7
    assert sorted(d.gi_id for d in made) == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(NoGpuAvailable):
        await sim.create_instance(gpu, "1g.10gb")
    assert len((await sim.inventory())[0].mig_devices) == 7


async def test_concurrent_creates_never_overfill(a100):
    sim = SimBackend(a100)
    gpu = (await sim.inventory())[0].uuid
    results = await asyncio.gather(
        *(sim.create_instance(gpu, "1g.10gb") for _ in range(10)), return_exceptions=True
    )
    made = [r for r in results if not isinstance(r, Exception)]
    assert len(made) == 7 and len({d.uuid for d in made}) == 7
    assert sum(isinstance(r, NoGpuAvailable) for r in results) == 3


async def test_placement_rules_apply(a100):
    sim = SimBackend(a100)
    gpu = (await sim.inventory())[0].uuid
    await sim.create_instance(gpu, "4g.40gb")
    await sim.create_instance(gpu, "3g.40gb")
    with pytest.raises(NoGpuAvailable):
        await sim.create_instance(gpu, "1g.10gb")


async def test_destroy_frees_and_never_reuses_a_uuid(a100):
    sim = SimBackend(a100)
    gpu = (await sim.inventory())[0].uuid
    first = await sim.create_instance(gpu, "3g.40gb")
    await sim.create_instance(gpu, "3g.40gb")
    with pytest.raises(NoGpuAvailable):
        await sim.create_instance(gpu, "3g.40gb")
    await sim.destroy_instance(first.uuid)
    await sim.destroy_instance(first.uuid)  # already gone: fine
    again = await sim.create_instance(gpu, "3g.40gb")
    assert again.uuid != first.uuid
    assert len((await sim.inventory())[0].mig_devices) == 2


async def test_destroy_accepts_the_old_uuid_form(a100):
    sim = SimBackend(a100)
    gpu = (await sim.inventory())[0].uuid
    made = await sim.create_instance(gpu, "2g.20gb")
    await sim.destroy_instance(f"MIG-{gpu}/{made.gi_id}/{made.ci_id}")
    assert (await sim.inventory())[0].mig_devices == ()


async def test_legacy_uuid_topology(tmp_path):
    path = topology(tmp_path, [{"model": "A100-40GB", "mig": True, "legacy_mig_uuids": True}])
    sim = SimBackend(path)
    gpu = (await sim.inventory())[0].uuid
    made = await sim.create_instance(gpu, "1g.5gb")
    assert made.uuid == f"MIG-{gpu}/1/0"
    await sim.destroy_instance(made.uuid)
    assert (await sim.inventory())[0].mig_devices == ()


async def test_create_errors(tmp_path):
    path = topology(tmp_path, [{"model": "A100-80GB", "mig": True}, {"model": "A100-40GB"}])
    sim = SimBackend(path)
    mig, whole = (g.uuid for g in await sim.inventory())
    with pytest.raises(UnknownMigProfile):
        await sim.create_instance(mig, "1g.5gb")
    with pytest.raises(GpuError, match="MIG is not enabled"):
        await sim.create_instance(whole, "1g.5gb")
    with pytest.raises(GpuError, match="no GPU"):
        await sim.create_instance("GPU-nope", "1g.10gb")


async def test_state_file_keeps_instances_across_restarts(tmp_path):
    path = topology(tmp_path, [{"model": "H100-80GB", "mig": True, "instances": ["3g.40gb"]}])
    state = tmp_path / "state" / "sim.json"
    sim = SimBackend(path, state)
    gpu = (await sim.inventory())[0]
    created = await sim.create_instance(gpu.uuid, "1g.10gb")
    await sim.destroy_instance(gpu.mig_devices[0].uuid)  # the topology's pre-created one
    assert state.exists()

    reborn = SimBackend(path, state)
    devices = (await reborn.inventory())[0].mig_devices
    assert devices == (created,)
    later = await reborn.create_instance(gpu.uuid, "1g.10gb")
    assert later.uuid not in {created.uuid, gpu.mig_devices[0].uuid}


async def test_without_state_path_nothing_is_written(tmp_path, a100):
    sim = SimBackend(a100)
    await sim.create_instance((await sim.inventory())[0].uuid, "1g.10gb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topo.json"]
    assert (await SimBackend(a100).inventory())[0].mig_devices == ()


async def test_unwritable_state_refuses_the_change(tmp_path, a100):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sim = SimBackend(a100, blocker / "state.json")
    with pytest.raises(GpuError):
        await sim.create_instance((await sim.inventory())[0].uuid, "1g.10gb")
    assert (await sim.inventory())[0].mig_devices == ()


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        ([{"model": "V100"}], "model"),
        ([{"model": "A100-80GB", "mig": True, "colour": "red"}], "keys"),
        ([{"model": "A100-80GB", "instances": ["1g.10gb"]}], "mig"),
        ([{"model": "A100-80GB", "mig": True, "instances": ["3g.40gb"] * 2 + ["1g.10gb"]}], "fit"),
        ([{"model": "A100-80GB", "mig": True, "instances": ["3g.20gb"]}], "3g.20gb"),
        (
            [
                {
                    "model": "A100-80GB",
                    "mig": True,
                    "instances": [{"profile": "3g.40gb", "start": 2}],
                }
            ],
            "slice 2",
        ),
        ("not a list", "gpus"),
    ],
)
def test_invalid_topologies_are_refused(tmp_path, gpus, message):
    with pytest.raises(ValueError, match=message):
        SimBackend(topology(tmp_path, gpus))


def test_pre_created_instance_at_a_given_start(tmp_path):
    gpus = [
        {
            "model": "A100-40GB",
            "mig": True,
            "instances": [{"profile": "1g.5gb", "start": 0}, "4g.20gb"],
        }
    ]
    # 1g at slice 0 leaves no room for a 4g (its only start is 0)
    with pytest.raises(ValueError, match="fit"):
        SimBackend(topology(tmp_path, gpus))


async def test_open_backend_sim_keeps_state_in_state_dir(tmp_path, a100):
    backend = await open_backend(f"sim:{a100}", state_dir=tmp_path / "st")
    await backend.create_instance((await backend.inventory())[0].uuid, "7g.80gb")
    assert (tmp_path / "st" / "gpu-sim-topo.json").exists()
    reopened = await open_backend(f"sim:{a100}", state_dir=tmp_path / "st")
    assert [d.profile for d in (await reopened.inventory())[0].mig_devices] == ["7g.80gb"]
    await reopened.close()
