"""NVIDIA's MIG placement rules for the GPU models the simulator offers (pure, no I/O).

A GPU in MIG mode has 7 compute slices and 8 memory slices. A GPU instance of a
profile occupies ``memory_slices`` consecutive memory slices starting at one of the
profile's allowed start positions (what ``nvidia-smi mig -lgipp`` prints, e.g.
``3g: {0,4}:4``); two instances may not share a memory slice, and no profile may
exceed its maximum instance count (``1g+me``: one per GPU). On these models the
memory rule also bounds compute: at most 7 compute slices are ever handed out.

Consequences, per NVIDIA's MIG user guide: seven ``1g`` instances fit (starts 0..6,
the eighth memory slice stays unused); ``4g + 3g`` fit (0-3 and 4-7, since R510);
``3g + 3g`` fill all 8 memory slices, so ``3g + 3g + 1g`` does not fit; two ``4g``
never fit (only start 0). Profile ids are NVML's ``info.id`` values on real hardware
(19, 20, 15, 14, 9, 5, 0), the same on all four models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Placement:
    """Where an instance of ``profile`` sits (or could sit): memory slices [start, start+size)."""

    profile: str
    start: int
    size: int

    def overlaps(self, other: Placement) -> bool:
        return self.start < other.start + other.size and other.start < self.start + self.size


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    profile_id: int
    compute_slices: int
    memory_slices: int
    memory_mb: int
    max_instances: int
    starts: tuple[int, ...]

    def placements(self) -> tuple[Placement, ...]:
        return tuple(Placement(self.name, start, self.memory_slices) for start in self.starts)


@dataclass(frozen=True, slots=True)
class GpuModel:
    key: str  # topology name, e.g. "A100-80GB"
    name: str  # what NVML reports, e.g. "NVIDIA A100-SXM4-80GB"
    memory_mb: int
    power_limit_w: float
    profiles: tuple[ProfileSpec, ...]

    def profile(self, name: str) -> ProfileSpec | None:
        return next((p for p in self.profiles if p.name == name), None)


# (profile id, compute slices, memory slices, max instances, allowed starts), in the
# order of the names below; shared by A100, H100 and H200.
_GEOMETRY = (
    (19, 1, 1, 7, (0, 1, 2, 3, 4, 5, 6)),
    (20, 1, 1, 1, (0, 1, 2, 3, 4, 5, 6)),
    (15, 1, 2, 4, (0, 2, 4, 6)),
    (14, 2, 2, 3, (0, 2, 4)),
    (9, 3, 4, 2, (0, 4)),
    (5, 4, 4, 1, (0,)),
    (0, 7, 8, 1, (0,)),
)


def _model(
    key: str, name: str, memory_mb: int, power_w: float, sizes: Sequence[tuple[str, int]]
) -> GpuModel:
    profiles = tuple(
        ProfileSpec(pname, pid, compute, mem, mb, count, starts)
        for (pname, mb), (pid, compute, mem, count, starts) in zip(sizes, _GEOMETRY, strict=True)
    )
    return GpuModel(key, name, memory_mb, power_w, profiles)


MODELS: dict[str, GpuModel] = {
    m.key: m
    for m in (
        _model(
            "A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, 400.0,
            [("1g.5gb", 4864), ("1g.5gb+me", 4864), ("1g.10gb", 9856), ("2g.10gb", 9856),
             ("3g.20gb", 19968), ("4g.20gb", 19968), ("7g.40gb", 40192)],
        ),
        _model(
            "A100-80GB", "NVIDIA A100-SXM4-80GB", 81920, 400.0,
            [("1g.10gb", 9856), ("1g.10gb+me", 9856), ("1g.20gb", 19968), ("2g.20gb", 19968),
             ("3g.40gb", 40192), ("4g.40gb", 40192), ("7g.80gb", 80384)],
        ),
        _model(
            "H100-80GB", "NVIDIA H100 80GB HBM3", 81559, 700.0,
            [("1g.10gb", 9984), ("1g.10gb+me", 9984), ("1g.20gb", 20096), ("2g.20gb", 20096),
             ("3g.40gb", 40448), ("4g.40gb", 40448), ("7g.80gb", 81152)],
        ),
        _model(
            "H200-141GB", "NVIDIA H200", 143771, 700.0,
            # NVML's names; sizes fitted to them (GiB rounded up), no H200 reading at hand
            [("1g.18gb", 17920), ("1g.18gb+me", 17920), ("1g.35gb", 35328), ("2g.35gb", 35328),
             ("3g.71gb", 72192), ("4g.71gb", 72192), ("7g.141gb", 143616)],
        ),
    )
}  # fmt: skip


def unoccupied(candidates: Sequence[Placement], occupied: Sequence[Placement]) -> list[Placement]:
    """The candidate placements that share no memory slice with an occupied one."""
    return [c for c in candidates if not any(c.overlaps(o) for o in occupied)]


def free_placements(
    model: GpuModel, profile: str, occupied: Sequence[Placement]
) -> list[Placement]:
    """Where one more instance of ``profile`` could go, given the instances already there.

    Raises:
        ValueError: the model has no such profile.
    """
    spec = _spec(model, profile)
    if sum(o.profile == profile for o in occupied) >= spec.max_instances:
        return []
    return unoccupied(spec.placements(), occupied)


def choose_placement(free: Sequence[Placement]) -> Placement | None:
    """The free placement to use: the highest start, keeping low slices for big profiles.

    This mirrors what the driver does when no placement is given (the first ``1g`` of
    an empty A100 lands on slice 6, the first ``3g`` on slice 4).
    """
    return max(free, key=lambda p: p.start, default=None)


def pack(
    model: GpuModel, profiles: Sequence[str], occupied: Sequence[Placement] = ()
) -> list[Placement] | None:
    """Placements for all ``profiles`` at once (in their order), or None if they can't fit.

    An exhaustive search (at most 7 instances, a few starts each), biggest first.

    Raises:
        ValueError: the model lacks one of the profiles.
    """
    order = sorted(range(len(profiles)), key=lambda i: -_spec(model, profiles[i]).memory_slices)
    placed: dict[int, Placement] = {}

    def place(k: int, taken: list[Placement]) -> bool:
        if k == len(order):
            return True
        i = order[k]
        for candidate in free_placements(model, profiles[i], taken):
            placed[i] = candidate
            if place(k + 1, [*taken, candidate]):
                return True
        return False

    if not place(0, list(occupied)):
        return None
    return [placed[i] for i in range(len(profiles))]


def fits(model: GpuModel, profiles: Sequence[str]) -> bool:
    """Whether instances of all ``profiles`` can exist together on an empty GPU of ``model``."""
    return pack(model, profiles) is not None


def _spec(model: GpuModel, profile: str) -> ProfileSpec:
    spec = model.profile(profile)
    if spec is None:
        raise ValueError(f"{model.key} has no MIG profile {profile!r}")
    return spec
