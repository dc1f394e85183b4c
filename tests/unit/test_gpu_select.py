import pytest

from gateway.core.gpu_select import (
    ANY_PROFILE,
    AvailableInstance,
    CreateInstance,
    LegacyMigId,
    NoGpu,
    UseDevice,
    available_instances,
    default_profile_problem,
    default_profiles,
    engine_slice,
    parse_mig_uuid,
    select_gpu,
)
from gateway.core.gpu_types import GpuInfo, MigDevice, MigProfile
from gateway.errors import (
    GpuError,
    GpuInstanceBusy,
    GpuInstanceNotFound,
    InvalidRequest,
    NoGpuAvailable,
    UnknownMigProfile,
)

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"
GIB = 1 << 30


def gpu(index, *, mig=True, devices=(), name=A100):
    return GpuInfo(
        uuid=f"GPU-{index}",
        index=index,
        name=name,
        memory_total=80 * GIB,
        memory_free=80 * GIB,
        memory_used=0,
        utilization=0,
        temperature=30,
        power_usage=60.0,
        power_limit=400.0,
        mig_enabled=mig,
        mig_pending=mig,
        mig_devices=tuple(devices),
    )


def dev(gpu_index, gi, profile, *, uuid=None, ci=0, split=False):
    return MigDevice(
        uuid=uuid or f"MIG-{gpu_index}-{gi}" + (f"-{ci}" if ci else ""),
        gpu_uuid=f"GPU-{gpu_index}",
        profile=profile,
        gi_id=gi,
        ci_id=ci,
        memory_bytes=10 * GIB,
        split=split,
    )


def lost(index):
    return GpuInfo(uuid=None, index=index, name=None, error="GPU is lost")


def profiles_of(model, *names):
    shapes = {"1g.10gb": (1, 1), "1g.20gb": (1, 2), "2g.20gb": (2, 2), "3g.40gb": (3, 4),
              "3g.20gb": (3, 4), "3g.71gb": (3, 4), "3g.40gb+gfx": (3, 4),
              "4g.24gb": (4, 4)}  # fmt: skip
    return [MigProfile(n, 0, shapes[n][0], shapes[n][1], 10 * GIB, 7, model) for n in names]


PROFILES = profiles_of(A100, "1g.10gb", "2g.20gb", "3g.40gb")


def select(inventory, *, profile=None, uuid=None, allocated=(), default="3g.40gb",
           dynamic=False, gpu_less=False, profiles=PROFILES):  # fmt: skip
    return select_gpu(
        mig_profile=profile,
        mig_instance_uuid=uuid,
        inventory=inventory,
        profiles=profiles,
        allocated=set(allocated),
        default_profile=default,
        dynamic=dynamic,
        gpu_less=gpu_less,
    )


# --- mig_instance_uuid -----------------------------------------------------------------


def test_named_instance_is_given_exactly():
    inventory = [gpu(0, devices=[dev(0, 1, "3g.40gb"), dev(0, 2, "1g.10gb")])]
    assert select(inventory, uuid="MIG-0-2") == UseDevice("MIG-0-2", "GPU-0", "1g.10gb")


def test_named_instance_in_old_form_matches_gpu_gi_ci():
    inventory = [gpu(0, devices=[dev(0, 3, "1g.10gb", uuid="MIG-5f0b2a3c-modern")])]
    decision = select(inventory, uuid="MIG-GPU-0/3/0")
    assert decision == UseDevice("MIG-5f0b2a3c-modern", "GPU-0", "1g.10gb")


def test_named_instance_reported_in_old_form():
    inventory = [gpu(0, devices=[dev(0, 3, "1g.10gb", uuid="MIG-GPU-0/3/0")])]
    assert select(inventory, uuid="MIG-GPU-0/3/0").uuid == "MIG-GPU-0/3/0"


@pytest.mark.parametrize("uuid", ["MIG-0-9", "MIG-GPU-0/9/0", "MIG-GPU-1/1/0", "GPU-0"])
def test_unknown_named_instance_is_404(uuid):
    with pytest.raises(GpuInstanceNotFound):
        select([gpu(0, devices=[dev(0, 1, "3g.40gb")])], uuid=uuid)


def test_allocated_named_instance_is_409():
    inventory = [gpu(0, devices=[dev(0, 1, "3g.40gb")])]
    with pytest.raises(GpuInstanceBusy):
        select(inventory, uuid="MIG-0-1", allocated={"MIG-0-1"})
    with pytest.raises(GpuInstanceBusy):
        select(inventory, uuid="MIG-GPU-0/1/0", allocated={"MIG-0-1"})


def test_both_selectors_are_refused():
    with pytest.raises(InvalidRequest):
        select([gpu(0)], profile="1g.10gb", uuid="MIG-0-1")


# --- mig_profile -----------------------------------------------------------------------


def test_profile_takes_lowest_gpu_then_lowest_gi():
    inventory = [
        gpu(1, devices=[dev(1, 1, "1g.10gb")]),
        gpu(0, devices=[dev(0, 9, "1g.10gb"), dev(0, 4, "1g.10gb"), dev(0, 2, "2g.20gb")]),
    ]
    assert select(inventory, profile="1g.10gb").uuid == "MIG-0-4"
    assert select(inventory, profile="1g.10gb", allocated={"MIG-0-4"}).uuid == "MIG-0-9"
    assert select(inventory, profile="1g.10gb", allocated={"MIG-0-4", "MIG-0-9"}).uuid == "MIG-1-1"


def test_profile_exhausted_creates_when_dynamic():
    inventory = [
        gpu(2, devices=[dev(2, 1, "1g.10gb")]),
        gpu(0),
        gpu(1, mig=False),
        gpu(3, name=H100),
    ]
    decision = select(inventory, profile="1g.10gb", allocated={"MIG-2-1"}, dynamic=True)
    # only MIG-enabled GPUs whose model has the profile, lowest index first
    assert decision == CreateInstance((("GPU-0", "1g.10gb"), ("GPU-2", "1g.10gb")))


def test_profile_exhausted_without_dynamic_is_503():
    inventory = [gpu(0, devices=[dev(0, 1, "1g.10gb")])]
    with pytest.raises(NoGpuAvailable):
        select(inventory, profile="1g.10gb", allocated={"MIG-0-1"})


def test_free_existing_instance_beats_creating_one():
    inventory = [gpu(0), gpu(1, devices=[dev(1, 5, "2g.20gb")])]
    assert select(inventory, profile="2g.20gb", dynamic=True) == UseDevice(
        "MIG-1-5", "GPU-1", "2g.20gb"
    )


@pytest.mark.parametrize("dynamic", [False, True])
def test_unknown_profile_is_400(dynamic):
    with pytest.raises(UnknownMigProfile):
        select([gpu(0)], profile="3g.20gb", dynamic=dynamic)


def test_profile_known_from_an_existing_instance():
    inventory = [gpu(0, devices=[dev(0, 1, "1g.10gb")])]
    assert select(inventory, profile="1g.10gb", profiles=[]).uuid == "MIG-0-1"


def test_profile_request_never_gets_a_whole_gpu():
    inventory = [gpu(0, devices=[dev(0, 1, "1g.10gb")]), gpu(1, mig=False)]
    with pytest.raises(NoGpuAvailable):
        select(inventory, profile="1g.10gb", allocated={"MIG-0-1"}, dynamic=True, profiles=[])
    with pytest.raises(UnknownMigProfile):
        select([gpu(1, mig=False)], profile="1g.10gb", profiles=[])


# --- neither selector ------------------------------------------------------------------


def test_host_without_mig_gives_lowest_free_whole_gpu():
    inventory = [gpu(1, mig=False), gpu(0, mig=False)]
    assert select(inventory) == UseDevice("GPU-0", "GPU-0", "full")
    assert select(inventory, allocated={"GPU-0"}) == UseDevice("GPU-1", "GPU-1", "full")
    with pytest.raises(NoGpuAvailable):
        select(inventory, allocated={"GPU-0", "GPU-1"})


def test_mig_host_applies_the_default_profile():
    inventory = [gpu(0, devices=[dev(0, 1, "1g.10gb"), dev(0, 2, "3g.40gb")])]
    assert select(inventory).uuid == "MIG-0-2"


def test_default_profile_exhausted_creates_when_dynamic():
    inventory = [gpu(0, devices=[dev(0, 2, "3g.40gb")])]
    decision = select(inventory, allocated={"MIG-0-2"}, dynamic=True)
    assert decision == CreateInstance((("GPU-0", "3g.40gb"),))


def test_default_profile_exhausted_falls_back_to_a_whole_non_mig_gpu():
    inventory = [gpu(0, devices=[dev(0, 2, "3g.40gb")]), gpu(1, mig=False)]
    assert select(inventory, allocated={"MIG-0-2"}) == UseDevice("GPU-1", "GPU-1", "full")
    decision = select(inventory, allocated={"MIG-0-2"}, dynamic=True)
    assert decision == CreateInstance(
        (("GPU-0", "3g.40gb"),), fallback=UseDevice("GPU-1", "GPU-1", "full")
    )


def test_default_profile_exhausted_and_no_whole_gpu_is_503():
    inventory = [gpu(0, devices=[dev(0, 2, "3g.40gb")]), gpu(1, mig=False)]
    with pytest.raises(NoGpuAvailable):
        select(inventory, allocated={"MIG-0-2", "GPU-1"})


def test_default_profile_unknown_here_is_a_configuration_error():
    with pytest.raises(GpuError) as caught:
        select([gpu(0, devices=[dev(0, 1, "3g.40gb")])], default="3g.20gb")
    assert "3g.20gb" in caught.value.log_message
    assert caught.value.status == 503


def test_default_any_takes_any_free_instance_then_a_whole_gpu():
    inventory = [gpu(0, devices=[dev(0, 3, "1g.10gb"), dev(0, 1, "3g.40gb")]), gpu(1, mig=False)]
    assert select(inventory, default="any").uuid == "MIG-0-1"
    assert select(inventory, default="any", allocated={"MIG-0-1", "MIG-0-3"}).uuid == "GPU-1"
    with pytest.raises(NoGpuAvailable):
        select(inventory, default="any", allocated={"MIG-0-1", "MIG-0-3", "GPU-1"})


def test_mig_enabled_gpu_is_never_given_whole():
    with pytest.raises(NoGpuAvailable):
        select([gpu(0)], default="any")


# --- no GPUs ---------------------------------------------------------------------------


def test_gpu_less_host_gives_no_gpu():
    assert select([], gpu_less=True, profiles=[]) == NoGpu()


def test_gpu_host_reporting_no_gpus_is_503():
    with pytest.raises(NoGpuAvailable):
        select([], profiles=[])


def test_selectors_on_a_gpu_less_host():
    with pytest.raises(UnknownMigProfile, match="this host has no GPUs"):
        select([], profile="1g.10gb", gpu_less=True, profiles=[])
    with pytest.raises(GpuInstanceNotFound):
        select([], uuid="MIG-0-1", gpu_less=True, profiles=[])


# --- /gpus/available and UUID parsing --------------------------------------------------


def test_available_lists_free_instances_then_whole_gpus():
    inventory = [
        gpu(1, mig=False),
        gpu(0, devices=[dev(0, 9, "1g.10gb"), dev(0, 2, "3g.40gb"), dev(0, 4, "2g.20gb")]),
        gpu(2, mig=False),
        gpu(3),
    ]
    listed = available_instances(inventory, PROFILES, {"MIG-0-4", "GPU-2"})
    assert listed == [
        AvailableInstance("MIG-0-2", "GPU-0", "3g.40gb", 10 * GIB, 3, 4),
        AvailableInstance("MIG-0-9", "GPU-0", "1g.10gb", 10 * GIB, 1, 1),
        AvailableInstance("GPU-1", "GPU-1", "full", 80 * GIB, None, None),
    ]


def test_available_slices_unknown_for_profiles_of_other_models():
    inventory = [gpu(0, devices=[dev(0, 1, "1g.20gb")], name=H100)]
    (only,) = available_instances(inventory, profiles_of(A100, "1g.20gb"), set())
    assert (only.compute_slices, only.memory_slices) == (None, None)


@pytest.mark.parametrize(
    ("uuid", "parsed"),
    [
        ("MIG-GPU-3e9c9c52/3/0", LegacyMigId("GPU-3e9c9c52", 3, 0)),
        (
            "MIG-GPU-e86cb44c-6756-fd30-cd4a-1e6da3caf9b0/13/2",
            LegacyMigId("GPU-e86cb44c-6756-fd30-cd4a-1e6da3caf9b0", 13, 2),
        ),
        ("MIG-c7384736-a75d-5afc-978f-d2f1294409fd", None),
        ("MIG-GPU-x/1", None),
        ("GPU-x/1/0", None),
    ],
)
def test_parse_mig_uuid(uuid, parsed):
    assert parse_mig_uuid(uuid) == parsed


# --- unhealthy GPUs and split GPU instances ---------------------------------------------


def test_an_unhealthy_gpu_is_never_given_nor_listed():
    broken = GpuInfo(uuid="GPU-0", index=0, name=A100, error="Unknown Error")
    inventory = [lost(1), broken, gpu(2, mig=False)]
    assert select(inventory, default="any") == UseDevice("GPU-2", "GPU-2", "full")
    assert [a.uuid for a in available_instances(inventory, PROFILES, set())] == ["GPU-2"]
    with pytest.raises(NoGpuAvailable, match="no healthy GPU"):
        select([lost(0)])


SPLIT = [
    dev(0, 1, "1c.3g.40gb", split=True),
    dev(0, 1, "2c.3g.40gb", ci=1, split=True),
    dev(0, 5, "3g.40gb"),
]


def test_split_gpu_instances_are_never_handed_out():
    inventory = [gpu(0, devices=SPLIT)]
    assert select(inventory).uuid == "MIG-0-5"
    assert select(inventory, default="any").uuid == "MIG-0-5"
    with pytest.raises(NoGpuAvailable):
        select(inventory, allocated={"MIG-0-5"}, default="any")
    with pytest.raises(UnknownMigProfile):
        select(inventory, profile="1c.3g.40gb")
    with pytest.raises(InvalidRequest, match="sharing"):
        select(inventory, uuid="MIG-0-1")
    assert [a.uuid for a in available_instances(inventory, PROFILES, set())] == ["MIG-0-5"]


def test_default_profile_problem_names_the_valid_profiles():
    h100 = [gpu(0, name=H100), gpu(1, mig=False)]
    problem = default_profile_problem("3g.20gb", h100, profiles_of(H100, "1g.10gb", "3g.40gb"))
    assert "3g.20gb" in problem and H100 in problem
    assert "1g.10gb, 3g.40gb" in problem and "'any'" in problem
    assert default_profile_problem("3g.40gb", h100, profiles_of(H100, "3g.40gb")) is None
    assert default_profile_problem(None, h100, []) is None  # any free instance
    assert default_profile_problem("3g.20gb", [gpu(0, mig=False)], []) is None  # never applies
    assert default_profile_problem("3g.20gb", [], []) is None
    assert default_profile_problem(None, h100, profiles_of(H100, "1g.10gb")) is None  # unset


# --- no --default-mig-profile: each model's 3-slice profile --------------------------------

A100_40 = "NVIDIA A100-SXM4-40GB"
H200 = "NVIDIA H200"
A30 = "NVIDIA A30"
MIXED = (
    profiles_of(A100_40, "1g.10gb", "3g.20gb")
    + profiles_of(H200, "3g.40gb+gfx", "3g.71gb", "1g.10gb")
    + profiles_of(A30, "1g.10gb", "4g.24gb")
)


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([A100_40], {A100_40: "3g.20gb"}),
        ([A100], {}),  # a model MIXED lists no profiles for
        ([H200], {H200: "3g.71gb"}),  # the plain profile, never a +gfx variant
        ([A30], {}),  # no 3-slice profile at all
        ([A100_40, H200, A30], {A100_40: "3g.20gb", H200: "3g.71gb"}),
    ],
)
def test_default_profiles_follow_each_model(models, expected):
    inventory = [gpu(i, name=model) for i, model in enumerate(models)]
    assert default_profiles(inventory, MIXED) == expected


def test_unset_default_gives_the_3_slice_profile_of_each_model():
    inventory = [
        gpu(0, name=A100_40, devices=[dev(0, 1, "1g.10gb"), dev(0, 2, "3g.20gb")]),
        gpu(1, name=H200, devices=[dev(1, 5, "1g.10gb"), dev(1, 2, "3g.71gb")]),
    ]
    chosen = select(inventory, default=None, profiles=MIXED)
    assert chosen == UseDevice("MIG-0-2", "GPU-0", "3g.20gb")
    chosen = select(inventory, default=None, profiles=MIXED, allocated={"MIG-0-2"})
    assert chosen == UseDevice("MIG-1-2", "GPU-1", "3g.71gb")
    with pytest.raises(NoGpuAvailable, match="3-slice"):
        select(inventory, default=None, profiles=MIXED, allocated={"MIG-0-2", "MIG-1-2"})


def test_unset_default_creates_each_models_profile_when_dynamic():
    inventory = [gpu(0, name=A100_40), gpu(1, name=A30), gpu(2, name=H200), gpu(3, mig=False)]
    decision = select(inventory, default=None, profiles=MIXED, dynamic=True)
    assert decision == CreateInstance(
        (("GPU-0", "3g.20gb"), ("GPU-2", "3g.71gb")), fallback=UseDevice("GPU-3", "GPU-3", "full")
    )


def test_unset_default_without_any_3_slice_model_takes_any_free_instance():
    inventory = [gpu(0, name=A30, devices=[dev(0, 3, "4g.24gb")])]
    assert select(inventory, default=None, profiles=MIXED).uuid == "MIG-0-3"


@pytest.mark.parametrize(
    ("mig_profile", "default_profile", "wanted"),
    [
        ("1g.10gb", None, "1g.10gb"),
        ("1g.10gb", "3g.40gb", "1g.10gb"),  # the request's beats the default
        (None, "3g.40gb", "3g.40gb"),
        (None, None, None),  # no GPU
        (None, ANY_PROFILE, None),  # "any instance here" means nothing across nodes
        ("full", None, "full"),  # a whole GPU
        ("1c.3g.40gb", None, "1c.3g.40gb"),
        ("1g.10gb+me", None, "1g.10gb+me"),
    ],
)
def test_where_the_engine_places_gpus_a_session_asks_for_a_profile(
    mig_profile, default_profile, wanted
):
    assert (
        engine_slice(
            mig_profile=mig_profile, mig_instance_uuid=None, default_profile=default_profile
        )
        == wanted
    )


@pytest.mark.parametrize(
    ("mig_profile", "mig_instance_uuid", "error"),
    [
        (None, "MIG-aaaa", InvalidRequest),  # the engine picks the device
        ("1g.10gb=MIG-x", None, UnknownMigProfile),  # never a generic resource's syntax
        ("MIG-1g.10gb", None, UnknownMigProfile),
    ],
)
def test_where_the_engine_places_gpus_a_device_or_malformed_profile_is_refused(
    mig_profile, mig_instance_uuid, error
):
    with pytest.raises(error):
        engine_slice(
            mig_profile=mig_profile, mig_instance_uuid=mig_instance_uuid, default_profile=None
        )
