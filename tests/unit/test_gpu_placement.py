import pytest

from gateway.core.mig_placement import (
    MODELS,
    Placement,
    choose_placement,
    fits,
    free_placements,
    pack,
)

# Profiles by shape, in the order every model lists them: 1g, 1g+me, 1g with two memory
# slices, 2g, 3g, 4g, 7g.
SHAPES = ("1g", "1g+me", "1gx2", "2g", "3g", "4g", "7g")
NAMES = {
    "A100-40GB": ("1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"),
    "A100-80GB": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H100-80GB": ("1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"),
    "H200-141GB": (
        "1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"
    ),
}  # fmt: skip

VALID = [
    ["1g"] * 7,
    ["4g", "3g"],
    ["3g", "3g"],
    ["2g", "2g", "2g", "1g"],
    ["2g", "2g", "2g", "1gx2"],
    ["4g", "2g", "1g"],
    ["4g", "1g", "1g", "1g"],
    ["3g", "2g", "2g"],
    ["3g", "2g", "1g", "1g"],
    ["3g", "1g", "1g", "1g", "1g"],
    ["1g", "1g", "2g", "3g"],
    ["1gx2"] * 4,
    ["1gx2", "1gx2", "1gx2", "1g"],
    ["1g+me"] + ["1g"] * 6,
    ["7g"],
]
INVALID = [
    ["1g"] * 8,
    ["4g", "4g"],
    ["7g", "1g"],
    ["3g", "3g", "1g"],
    ["4g", "3g", "1g"],
    ["4g", "2g", "2g"],
    ["3g", "3g", "3g"],
    ["2g"] * 4,
    ["1gx2"] * 5,
    ["1g+me", "1g+me"],
]


def names(model: str, shapes: list[str]) -> list[str]:
    return [NAMES[model][SHAPES.index(s)] for s in shapes]


@pytest.mark.parametrize("model", sorted(NAMES))
@pytest.mark.parametrize("mix", VALID, ids=lambda m: "+".join(m))
def test_valid_mixes_fit(model, mix):
    assert fits(MODELS[model], names(model, mix))


@pytest.mark.parametrize("model", sorted(NAMES))
@pytest.mark.parametrize("mix", INVALID, ids=lambda m: "+".join(m))
def test_invalid_mixes_are_refused(model, mix):
    assert not fits(MODELS[model], names(model, mix))


@pytest.mark.parametrize("model", sorted(NAMES))
def test_profile_tables(model):
    specs = MODELS[model].profiles
    assert [p.name for p in specs] == list(NAMES[model])
    assert [p.profile_id for p in specs] == [19, 20, 15, 14, 9, 5, 0]
    assert [p.compute_slices for p in specs] == [1, 1, 1, 2, 3, 4, 7]
    assert [p.memory_slices for p in specs] == [1, 1, 2, 2, 4, 4, 8]
    assert [p.max_instances for p in specs] == [7, 1, 4, 3, 2, 1, 1]
    assert [p.starts for p in specs][2:5] == [(0, 2, 4, 6), (0, 2, 4), (0, 4)]


def test_memory_sizes_grow_with_the_name():
    sizes = {p.name: p.memory_mb for m in MODELS.values() for p in m.profiles}
    assert sizes["1g.5gb"] == 4864
    assert sizes["3g.40gb"] in (40192, 40448)  # A100-80GB and H100-80GB differ slightly
    assert MODELS["A100-80GB"].profile("7g.80gb").memory_mb == 80384
    for model in (MODELS["H100-80GB"], MODELS["H200-141GB"]):  # NVML's naming rule holds
        for p in model.profiles:
            assert p.name.split("+")[0].endswith(f".{-(-p.memory_mb // 1024)}gb"), p.name


def test_first_1g_goes_to_the_highest_start():
    model = MODELS["A100-80GB"]
    assert choose_placement(free_placements(model, "1g.10gb", [])) == Placement("1g.10gb", 6, 1)
    assert choose_placement(free_placements(model, "3g.40gb", [])) == Placement("3g.40gb", 4, 4)


def test_free_placements_avoid_occupied_memory_slices():
    model = MODELS["A100-80GB"]
    occupied = [Placement("3g.40gb", 4, 4)]
    assert free_placements(model, "3g.40gb", occupied) == [Placement("3g.40gb", 0, 4)]
    assert [p.start for p in free_placements(model, "1g.10gb", occupied)] == [0, 1, 2, 3]
    assert free_placements(model, "4g.40gb", occupied) == [Placement("4g.40gb", 0, 4)]
    assert free_placements(model, "7g.80gb", occupied) == []


def test_instance_limit_applies_even_with_free_slices():
    model = MODELS["H100-80GB"]
    assert free_placements(model, "1g.10gb+me", [Placement("1g.10gb+me", 0, 1)]) == []


def test_unknown_profile_is_an_error():
    with pytest.raises(ValueError, match=r"3g\.20gb"):
        free_placements(MODELS["A100-80GB"], "3g.20gb", [])


def test_pack_fits_around_existing_instances_and_keeps_order():
    model = MODELS["A100-40GB"]
    occupied = [Placement("1g.5gb", 6, 1)]
    assert pack(model, ["2g.10gb", "4g.20gb"], occupied) == [
        Placement("2g.10gb", 4, 2),
        Placement("4g.20gb", 0, 4),
    ]
    assert pack(model, ["3g.20gb", "3g.20gb"], occupied) is None


def test_overlap():
    a = Placement("x", 0, 4)
    assert a.overlaps(Placement("y", 3, 1))
    assert not a.overlaps(Placement("y", 4, 4))
