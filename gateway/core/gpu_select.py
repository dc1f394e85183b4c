"""Which GPU a new session gets, decided from the inventory and the allocated UUIDs (pure).

The rules, in order (``allocated`` is every GPU/MIG UUID the database holds):

1. ``mig_instance_uuid``: exactly that MIG device, named in either UUID form
   (``MIG-<uuid>``, or the old ``MIG-GPU-<uuid>/<gi>/<ci>`` matched on GPU, GI and CI);
   missing → :class:`GpuInstanceNotFound`, allocated → :class:`GpuInstanceBusy`.
2. ``mig_profile``: a profile no GPU here offers → :class:`UnknownMigProfile`; else the
   free existing device of that profile on the lowest GPU index, lowest GI id; else, if
   ``dynamic``, :class:`CreateInstance` on the MIG-enabled GPUs whose model has the
   profile (lowest index first; the backend refuses a full GPU); else
   :class:`NoGpuAvailable`. A GPU with MIG disabled is never given for a profile.
3. Neither: on a host where some GPU has MIG enabled, the default profile as in 2.
   Unset (None), each MIG GPU's default is its model's slice with
   :data:`DEFAULT_COMPUTE_SLICES` compute slices (``3g.20gb`` on an A100-40GB,
   ``3g.40gb`` on an A100-80GB or H100, ``3g.71gb`` on an H200, as NVML names them), so
   mixed hosts work; where no model here has one, any free instance. :data:`ANY_PROFILE`
   gives any free existing device. When that finds nothing, a whole free MIG-disabled
   GPU is the fallback (also after a failed dynamic create). An explicit default
   profile that no GPU here offers is a configuration error (:class:`GpuError`), not
   the caller's. Without MIG, the lowest free whole GPU (profile ``full``).
4. No GPUs: :class:`NoGpu` on a GPU-less backend (``--gpus none``), otherwise
   :class:`NoGpuAvailable`.

Unhealthy GPUs (NVML failed on them) and split MIG devices (a compute instance with only
part of its GPU instance, sharing that instance's memory with its siblings) are never
handed out, nor listed as available; naming a split device is an :class:`InvalidRequest`.

The caller must hold one lock from reading the inventory until the chosen UUID is
stored, so two requests never pick the same device.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass

from gateway.core.gpu_types import GpuInfo, MigDevice, MigProfile
from gateway.errors import (
    GpuError,
    GpuInstanceBusy,
    GpuInstanceNotFound,
    InvalidRequest,
    NoGpuAvailable,
    UnknownMigProfile,
)

FULL_GPU = "full"
#: ``--default-mig-profile any``: hand out any free MIG instance
ANY_PROFILE = "any"
#: with ``--default-mig-profile`` unset, each model's slice with this many compute slices
DEFAULT_COMPUTE_SLICES = 3

_LEGACY_MIG_UUID = re.compile(r"^MIG-(GPU-[^/]+)/(\d+)/(\d+)$")


@dataclass(frozen=True, slots=True)
class LegacyMigId:
    """The parts of an old-style MIG UUID, ``MIG-GPU-<uuid>/<gi>/<ci>``."""

    gpu_uuid: str
    gi_id: int
    ci_id: int


def parse_mig_uuid(uuid: str) -> LegacyMigId | None:
    """Split an old-style MIG UUID; None for any other string (e.g. ``MIG-<uuid>``)."""
    match = _LEGACY_MIG_UUID.match(uuid)
    if match is None:
        return None
    return LegacyMigId(match[1], int(match[2]), int(match[3]))


@dataclass(frozen=True, slots=True)
class UseDevice:
    """Give the session this existing MIG device, or this whole GPU (profile ``full``)."""

    uuid: str
    gpu_uuid: str
    profile: str


@dataclass(frozen=True, slots=True)
class CreateInstance:
    """Create a MIG instance on the first of ``targets`` (GPU UUID, profile) with room.

    ``fallback``, when set, is the whole GPU to use if every candidate is full.
    """

    targets: tuple[tuple[str, str], ...]
    fallback: UseDevice | None = None


@dataclass(frozen=True, slots=True)
class NoGpu:
    """The session runs without a GPU (GPU-less host)."""


Decision = UseDevice | CreateInstance | NoGpu


@dataclass(frozen=True, slots=True)
class AvailableInstance:
    """One entry of ``/gpus/available``: a free MIG device or a free whole GPU."""

    uuid: str
    parent_gpu: str
    profile: str
    memory: int  # bytes
    compute_slices: int | None
    memory_slices: int | None


def select_gpu(
    *,
    mig_profile: str | None,
    mig_instance_uuid: str | None,
    inventory: Sequence[GpuInfo],
    profiles: Sequence[MigProfile],
    allocated: Collection[str],
    default_profile: str | None,
    dynamic: bool,
    gpu_less: bool,
) -> Decision:
    """Decide which GPU a new session gets (see the module docstring for the rules).

    Raises:
        InvalidRequest: both selectors given.
        GpuInstanceNotFound, GpuInstanceBusy: the named MIG device is missing or taken.
        UnknownMigProfile: no GPU here offers the requested profile.
        NoGpuAvailable: nothing suitable is free.
        GpuError: the configured default profile does not exist on this host.
    """
    if mig_profile is not None and mig_instance_uuid is not None:
        raise InvalidRequest("give mig_profile or mig_instance_uuid, not both")
    gpus = _healthy(inventory)
    if mig_instance_uuid is not None:
        return _named_device(mig_instance_uuid, gpus, allocated)
    if mig_profile is not None:
        if not inventory:
            raise UnknownMigProfile(
                f"this host has no GPUs, so no MIG profile ({mig_profile!r}); "
                "leave mig_profile out for a session without a GPU"
            )
        if mig_profile not in _known_profiles(gpus, profiles):
            raise UnknownMigProfile(f"MIG profile {mig_profile!r} is not offered by this host")
        return _by_profile(mig_profile, gpus, profiles, allocated, dynamic)
    if not gpus:
        if gpu_less:
            return NoGpu()
        raise NoGpuAvailable("this host reports no healthy GPU")
    whole = _free_whole_gpu(gpus, allocated)
    if not any(g.mig_enabled for g in gpus):
        if whole is None:
            raise NoGpuAvailable("every GPU is allocated")
        return whole
    wanted = _default_wanted(default_profile, gpus, profiles)
    if wanted is None:
        device = next(_free_devices(gpus, allocated), None)
        chosen = _use(device) if device is not None else whole
    else:
        try:
            chosen = _by_profile(wanted, gpus, profiles, allocated, dynamic)
        except NoGpuAvailable:
            chosen = whole
        else:
            if isinstance(chosen, CreateInstance) and whole is not None:
                chosen = CreateInstance(chosen.targets, fallback=whole)
    if chosen is None:
        raise NoGpuAvailable(f"no free MIG instance ({_describe_default(default_profile)})")
    return chosen


def default_profiles(
    inventory: Sequence[GpuInfo], profiles: Sequence[MigProfile]
) -> dict[str, str]:
    """GPU model → the profile an unset ``--default-mig-profile`` gives on it: the plain
    (no ``+me``/``+gfx`` variant) profile with :data:`DEFAULT_COMPUTE_SLICES` compute
    slices, for the models of this host's MIG GPUs that have one."""
    models = {g.name for g in _healthy(inventory) if g.mig_enabled}
    return {
        p.gpu_name: p.name
        for p in profiles
        if p.gpu_name in models and p.compute_slices == DEFAULT_COMPUTE_SLICES and _is_plain(p.name)
    }


def _is_plain(name: str) -> bool:
    return re.fullmatch(r"\d+g\.\d+gb", name) is not None


def _default_wanted(
    default_profile: str | None, gpus: Sequence[GpuInfo], profiles: Sequence[MigProfile]
) -> Mapping[str, str] | str | None:
    """What a profile-less request asks for on a MIG host: a profile name, a per-model
    map (unset default), or None (any free instance).

    Raises:
        GpuError: an explicit default profile that no GPU here offers.
    """
    if default_profile == ANY_PROFILE:
        return None
    if default_profile is None:
        return default_profiles(gpus, profiles) or None
    problem = default_profile_problem(default_profile, gpus, profiles)
    if problem is not None:
        raise GpuError(
            "the gateway's default MIG profile is not offered by this host", log_message=problem
        )
    return default_profile


def _describe_default(default_profile: str | None) -> str:
    if default_profile is None:
        return f"the {DEFAULT_COMPUTE_SLICES}-slice profile of each model"
    return "any profile" if default_profile == ANY_PROFILE else default_profile


def default_profile_problem(
    default_profile: str | None, inventory: Sequence[GpuInfo], profiles: Sequence[MigProfile]
) -> str | None:
    """Why ``--default-mig-profile`` can't work on this host, or None if it can.

    It can when it is unset (None: each model's 3-slice profile) or :data:`ANY_PROFILE`,
    when no healthy GPU has MIG enabled (it never applies), or when some GPU here
    offers it.
    """
    gpus = _healthy(inventory)
    if default_profile in (None, ANY_PROFILE) or not any(g.mig_enabled for g in gpus):
        return None
    offered = _known_profiles(gpus, profiles)
    if default_profile in offered:
        return None
    return (
        f"--default-mig-profile {default_profile} is not offered by this host's MIG GPUs "
        f"({', '.join(sorted({g.name or '?' for g in gpus if g.mig_enabled}))}); set it to "
        f"one of {', '.join(sorted(offered))}, or to 'any' to hand out any free MIG instance"
    )


def available_instances(
    inventory: Sequence[GpuInfo], profiles: Sequence[MigProfile], allocated: Collection[str]
) -> list[AvailableInstance]:
    """What ``/gpus/available`` lists: free MIG devices, then free whole MIG-disabled GPUs."""
    specs = {(p.gpu_name, p.name): p for p in profiles}
    gpus = _healthy(inventory)
    out: list[AvailableInstance] = []
    for gpu in gpus:
        for device in _sorted_devices(gpu):
            if device.uuid in allocated or device.split:
                continue
            spec = specs.get((gpu.name, device.profile))
            out.append(
                AvailableInstance(
                    uuid=device.uuid,
                    parent_gpu=gpu.uuid,
                    profile=device.profile,
                    memory=device.memory_bytes,
                    compute_slices=spec.compute_slices if spec else None,
                    memory_slices=spec.memory_slices if spec else None,
                )
            )
    for gpu in gpus:
        if not gpu.mig_enabled and gpu.uuid not in allocated:
            out.append(
                AvailableInstance(gpu.uuid, gpu.uuid, FULL_GPU, gpu.memory_total, None, None)
            )
    return out


def _named_device(uuid: str, gpus: Sequence[GpuInfo], allocated: Collection[str]) -> UseDevice:
    legacy = parse_mig_uuid(uuid)
    for gpu in gpus:
        for device in gpu.mig_devices:
            same = device.uuid == uuid or (
                legacy is not None
                and (device.gpu_uuid, device.gi_id, device.ci_id)
                == (legacy.gpu_uuid, legacy.gi_id, legacy.ci_id)
            )
            if same:
                if device.split:
                    raise InvalidRequest(
                        f"MIG instance {uuid} is one of several compute instances sharing "
                        f"a GPU instance's memory ({device.profile}); only whole GPU "
                        "instances are handed out"
                    )
                if device.uuid in allocated:
                    raise GpuInstanceBusy(f"MIG instance {uuid} is in use by another session")
                return _use(device)
    raise GpuInstanceNotFound(f"no MIG instance {uuid} on this host")


def _by_profile(
    wanted: str | Mapping[str, str],
    gpus: Sequence[GpuInfo],
    profiles: Sequence[MigProfile],
    allocated: Collection[str],
    dynamic: bool,
) -> UseDevice | CreateInstance:
    """A free device of the wanted profile, else (``dynamic``) where to create one.

    ``wanted`` is one profile name for every GPU, or GPU model → profile name."""

    def want(gpu: GpuInfo) -> str | None:
        return wanted if isinstance(wanted, str) else wanted.get(gpu.name or "")

    by_gpu = {g.uuid: want(g) for g in gpus}
    device = next(
        (d for d in _free_devices(gpus, allocated) if d.profile == by_gpu.get(d.gpu_uuid)), None
    )
    if device is not None:
        return _use(device)
    offered = {(p.gpu_name, p.name) for p in profiles}
    targets = tuple(
        (g.uuid, name)
        for g in gpus
        if g.mig_enabled and (name := want(g)) is not None and (g.name, name) in offered
    )
    if dynamic and targets:
        return CreateInstance(targets)
    shown = wanted if isinstance(wanted, str) else ", ".join(sorted(set(wanted.values())))
    raise NoGpuAvailable(f"no free MIG instance of profile {shown}")


def _healthy(inventory: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs NVML answers for, by index."""
    return sorted((g for g in inventory if g.healthy), key=lambda g: g.index)


def _known_profiles(gpus: Sequence[GpuInfo], profiles: Sequence[MigProfile]) -> set[str]:
    existing = {d.profile for g in gpus for d in g.mig_devices if not d.split}
    return {p.name for p in profiles} | existing


def _free_devices(gpus: Sequence[GpuInfo], allocated: Collection[str]) -> Iterator[MigDevice]:
    return (
        d
        for g in gpus
        if g.mig_enabled
        for d in _sorted_devices(g)
        if d.uuid not in allocated and not d.split
    )


def _sorted_devices(gpu: GpuInfo) -> list[MigDevice]:
    return sorted(gpu.mig_devices, key=lambda d: (d.gi_id, d.ci_id))


def _free_whole_gpu(gpus: Sequence[GpuInfo], allocated: Collection[str]) -> UseDevice | None:
    gpu = next((g for g in gpus if not g.mig_enabled and g.uuid not in allocated), None)
    return UseDevice(gpu.uuid, gpu.uuid, FULL_GPU) if gpu is not None else None


def _use(device: MigDevice) -> UseDevice:
    return UseDevice(device.uuid, device.gpu_uuid, device.profile)


def engine_slice(
    *, mig_profile: str | None, mig_instance_uuid: str | None, default_profile: str | None
) -> str | None:
    """The GPU slice profile a session asks the engine for where the engine places GPUs
    (``--runtime swarm``: each node offers its slices as generic resources per profile,
    and Swarm picks node and device): the request's profile, else an explicit default
    profile; None (no GPU) when neither names one. ``full`` asks for a whole GPU.

    Raises:
        InvalidRequest: ``mig_instance_uuid`` (the engine picks the device, not the caller).
        UnknownMigProfile: a malformed profile name.
    """
    if mig_instance_uuid is not None:
        raise InvalidRequest(
            "mig_instance_uuid does not work when Swarm places GPUs: name a mig_profile"
        )
    profile = mig_profile or (default_profile if default_profile != ANY_PROFILE else None)
    if profile is None:
        return None
    if profile != FULL_GPU and re.fullmatch(r"(\d+c\.)?\d+g\.\d+gb(\+[a-z0-9]+)*", profile) is None:
        raise UnknownMigProfile(f"{profile!r} is not a MIG profile name (e.g. 1g.10gb, or full)")
    return profile
