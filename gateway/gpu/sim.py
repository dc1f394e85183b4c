"""A simulated GPU host: GPUs from a topology file, MIG instances under NVIDIA's placement rules.

Topology file (JSON; unknown keys are refused)::

    {
      "host": "lab-1",                 optional; seeds the fake UUIDs (default: file stem)
      "gpus": [                        one object per GPU; its index is its position
        {
          "model": "A100-80GB",        A100-40GB | A100-80GB | H100-80GB | H200-141GB
          "mig": true,                 MIG mode (default false)
          "mig_pending": true,         pending MIG mode (default: same as "mig")
          "instances": [               pre-created MIG devices (only with "mig": true)
            "3g.40gb",                 a profile, placed wherever the set fits
            {"profile": "1g.10gb", "start": 6}    or at a memory-slice start
          ],
          "legacy_mig_uuids": false    report MIG-GPU-<uuid>/<gi>/<ci> UUIDs (old drivers)
        }
      ]
    }

UUIDs are stable: ``GPU-`` + uuid5 of host, index and model; ``MIG-`` + uuid5 of the GPU
UUID and a per-GPU creation serial, so a destroyed instance's UUID never comes back.

Like real hardware, instances outlive the gateway: after every change the instances of
each GPU are written to ``state_path`` (atomically), and once that file names a GPU it,
not the topology's ``instances``, says what exists there. Without ``state_path`` the
state lives in memory only. Changes never await, so concurrent or cancelled callers
can't interleave with them (the small state file is written synchronously).

The simulated GPUs are not real devices, so containers get no Docker DeviceRequest.
"""

from __future__ import annotations

import json
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.gpu_select import parse_mig_uuid
from gateway.core.gpu_types import GpuInfo, MigDevice, MigProfile
from gateway.core.idle import Reading
from gateway.core.mig_placement import (
    MODELS,
    GpuModel,
    Placement,
    choose_placement,
    free_placements,
    pack,
)
from gateway.errors import GpuError, NoGpuAvailable, UnknownMigProfile
from gateway.gpu.base import NothingLeftBehind

MIB = 1 << 20
_NAMESPACE = uuidlib.uuid5(uuidlib.NAMESPACE_URL, "https://sandman.invalid/gpu-sim")
_GPU_KEYS = {"model", "mig", "mig_pending", "instances", "legacy_mig_uuids"}
_STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class _Instance:
    uuid: str
    profile: str
    start: int
    gi_id: int
    ci_id: int = 0


@dataclass(slots=True)
class _Gpu:
    uuid: str
    index: int
    model: GpuModel
    mig: bool
    mig_pending: bool
    legacy_uuids: bool
    instances: list[_Instance] = field(default_factory=list)
    serial: int = 0  # MIG devices ever created here

    def placements(self) -> list[Placement]:
        return [self._placement(i) for i in self.instances]

    def add(self, profile: str, start: int) -> _Instance:
        used = {i.gi_id for i in self.instances}
        gi_id = next(n for n in range(1, len(used) + 2) if n not in used)
        if self.legacy_uuids:
            mig_uuid = f"MIG-{self.uuid}/{gi_id}/0"
        else:
            mig_uuid = f"MIG-{uuidlib.uuid5(_NAMESPACE, f'{self.uuid}/{self.serial}')}"
        self.serial += 1
        instance = _Instance(mig_uuid, profile, start, gi_id)
        self.instances.append(instance)
        return instance

    def device(self, instance: _Instance) -> MigDevice:
        spec = self.model.profile(instance.profile)
        assert spec is not None  # placed instances always have a known profile
        return MigDevice(
            uuid=instance.uuid,
            gpu_uuid=self.uuid,
            profile=instance.profile,
            gi_id=instance.gi_id,
            ci_id=instance.ci_id,
            memory_bytes=spec.memory_mb * MIB,
            memory_used=0,
        )

    def _placement(self, instance: _Instance) -> Placement:
        spec = self.model.profile(instance.profile)
        assert spec is not None
        return Placement(instance.profile, instance.start, spec.memory_slices)


class SimBackend(NothingLeftBehind):
    """GPUs and MIG devices from a topology file; see the module docstring."""

    needs_device_request = False

    def __init__(self, topology_path: Path, state_path: Path | None = None) -> None:
        """Load the topology, then the saved instances if ``state_path`` exists.

        Raises:
            ValueError: the topology or state file is malformed, names an unknown
                model or profile, or places instances that cannot coexist.
        """
        self._state_path = state_path
        self._gpus = _load_topology(topology_path)
        if state_path is not None and state_path.exists():
            _apply_state(self._gpus, json.loads(state_path.read_text()), state_path)

    async def inventory(self) -> list[GpuInfo]:
        return [
            GpuInfo(
                uuid=gpu.uuid,
                index=gpu.index,
                name=gpu.model.name,
                memory_total=gpu.model.memory_mb * MIB,
                memory_free=gpu.model.memory_mb * MIB,
                memory_used=0,
                utilization=None if gpu.mig else 0,  # as NVML: not supported under MIG
                temperature=33,
                power_usage=61.5,
                power_limit=gpu.model.power_limit_w,
                mig_enabled=gpu.mig,
                mig_pending=gpu.mig_pending,
                mig_devices=tuple(gpu.device(i) for i in gpu.instances),
            )
            for gpu in self._gpus
        ]

    async def health_inventory(self) -> list[GpuInfo]:
        return await self.inventory()

    async def profiles(self) -> list[MigProfile]:
        models = {gpu.model.key: gpu.model for gpu in self._gpus if gpu.mig}
        return [
            MigProfile(
                name=p.name,
                profile_id=p.profile_id,
                compute_slices=p.compute_slices,
                memory_slices=p.memory_slices,
                memory_bytes=p.memory_mb * MIB,
                max_instances=p.max_instances,
                gpu_name=model.name,
            )
            for model in models.values()
            for p in model.profiles
        ]

    async def create_instance(self, gpu_uuid: str, profile: str) -> MigDevice:
        """Place one instance of ``profile`` at the highest free start, and save the state.

        Raises:
            NoGpuAvailable: no free placement (or the profile's instance limit) is left.
            UnknownMigProfile: the GPU's model has no such profile.
            GpuError: unknown GPU, MIG disabled on it, or the state file can't be written.
        """
        gpu = self._gpu(gpu_uuid)
        if not gpu.mig:
            raise GpuError(f"MIG is not enabled on GPU {gpu.index}")
        if gpu.model.profile(profile) is None:
            raise UnknownMigProfile(f"{gpu.model.name} has no MIG profile {profile!r}")
        placement = choose_placement(free_placements(gpu.model, profile, gpu.placements()))
        if placement is None:
            raise NoGpuAvailable(f"no free placement for a {profile} instance on GPU {gpu.index}")
        instance = gpu.add(profile, placement.start)
        self._save(undo=lambda: gpu.instances.remove(instance))
        return gpu.device(instance)

    async def destroy_instance(self, mig_uuid: str) -> None:
        """Remove the instance (either UUID form) and save the state; unknown is success.

        Raises:
            GpuError: the state file can't be written (the instance is kept).
        """
        legacy = parse_mig_uuid(mig_uuid)
        for gpu in self._gpus:
            for position, instance in enumerate(gpu.instances):
                if instance.uuid == mig_uuid or (
                    legacy is not None
                    and (gpu.uuid, instance.gi_id, instance.ci_id)
                    == (legacy.gpu_uuid, legacy.gi_id, legacy.ci_id)
                ):
                    del gpu.instances[position]
                    self._save(undo=lambda g=gpu, p=position, i=instance: g.instances.insert(p, i))
                    return

    async def utilization(self, uuid: str) -> Reading:
        """A simulated GPU computes nothing: no utilisation and no processes."""
        return Reading(None)

    def _gpu(self, gpu_uuid: str) -> _Gpu:
        for gpu in self._gpus:
            if gpu.uuid == gpu_uuid:
                return gpu
        raise GpuError(f"no GPU {gpu_uuid} on this host")

    def _save(self, undo: Callable[[], None]) -> None:
        """Write every GPU's instances to the state file; on failure run ``undo`` and raise."""
        if self._state_path is None:
            return
        state = {
            "version": _STATE_VERSION,
            "gpus": {
                gpu.uuid: {
                    "serial": gpu.serial,
                    "instances": [
                        {
                            "uuid": i.uuid,
                            "profile": i.profile,
                            "start": i.start,
                            "gi_id": i.gi_id,
                            "ci_id": i.ci_id,
                        }
                        for i in gpu.instances
                    ],
                }
                for gpu in self._gpus
            },
        }
        tmp = self._state_path.with_name(self._state_path.name + ".tmp")
        try:
            self._state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(state, indent=2))
            tmp.replace(self._state_path)
        except OSError as exc:
            undo()
            raise GpuError(
                "the GPU simulator could not save its state", log_message=str(exc)
            ) from exc


def _load_topology(path: Path) -> list[_Gpu]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), list):
        raise ValueError(f"{path}: a topology is an object with a list under 'gpus'")
    if set(doc) - {"host", "gpus"}:
        raise ValueError(f"{path}: unknown keys {sorted(set(doc) - {'host', 'gpus'})}")
    host = str(doc.get("host", path.stem))
    return [_load_gpu(host, index, entry, path) for index, entry in enumerate(doc["gpus"])]


def _load_gpu(host: str, index: int, entry: Any, path: Path) -> _Gpu:
    where = f"{path}: gpus[{index}]"
    if not isinstance(entry, dict) or set(entry) - _GPU_KEYS:
        raise ValueError(f"{where}: an object with keys among {sorted(_GPU_KEYS)}")
    model = MODELS.get(entry.get("model", ""))
    if model is None:
        raise ValueError(f"{where}: 'model' must be one of {sorted(MODELS)}")
    mig = bool(entry.get("mig", False))
    gpu = _Gpu(
        uuid=f"GPU-{uuidlib.uuid5(_NAMESPACE, f'{host}/{index}/{model.key}')}",
        index=index,
        model=model,
        mig=mig,
        mig_pending=bool(entry.get("mig_pending", mig)),
        legacy_uuids=bool(entry.get("legacy_mig_uuids", False)),
    )
    wanted = [_instance_request(item, where) for item in entry.get("instances", [])]
    if wanted and not mig:
        raise ValueError(f'{where}: pre-created instances need "mig": true')
    _place_all(gpu, wanted, where)
    return gpu


def _instance_request(item: Any, where: str) -> tuple[str, int | None]:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) and set(item) <= {"profile", "start"} and "profile" in item:
        start = item.get("start")
        if start is not None and not isinstance(start, int):
            raise ValueError(f"{where}: an instance's 'start' is an integer")
        return str(item["profile"]), start
    raise ValueError(f"{where}: an instance is a profile name or {{'profile', 'start'}}")


def _place_all(gpu: _Gpu, wanted: list[tuple[str, int | None]], where: str) -> None:
    """Place the requested instances (fixed starts first), in their listed order."""
    for profile, _ in wanted:
        if gpu.model.profile(profile) is None:
            raise ValueError(f"{where}: {gpu.model.key} has no MIG profile {profile!r}")
    fixed: list[Placement] = []
    for profile, start in wanted:
        if start is None:
            continue
        spot = next(
            (p for p in free_placements(gpu.model, profile, fixed) if p.start == start), None
        )
        if spot is None:
            raise ValueError(f"{where}: {profile} cannot be placed at memory slice {start}")
        fixed.append(spot)
    loose = [profile for profile, start in wanted if start is None]
    packed = pack(gpu.model, loose, fixed)
    if packed is None:
        names = [profile for profile, _ in wanted]
        raise ValueError(f"{where}: instances {names} do not fit together on a {gpu.model.key}")
    placed = iter(packed)
    fixed_iter = iter(fixed)
    for _, start in wanted:
        spot = next(fixed_iter) if start is not None else next(placed)
        gpu.add(spot.profile, spot.start)


def _apply_state(gpus: list[_Gpu], state: Any, path: Path) -> None:
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError(f"{path}: not a GPU simulator state file (version {_STATE_VERSION})")
    saved = state.get("gpus", {})
    for gpu in gpus:
        entry = saved.get(gpu.uuid)
        if entry is None:
            continue
        try:
            instances = [_Instance(**item) for item in entry["instances"]]
            serial = int(entry["serial"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed entry for {gpu.uuid}: {exc}") from exc
        occupied: list[Placement] = []
        for instance in instances:
            spec = gpu.model.profile(instance.profile)
            spot = Placement(instance.profile, instance.start, spec.memory_slices if spec else 0)
            if spec is None or spot not in free_placements(gpu.model, instance.profile, occupied):
                raise ValueError(f"{path}: {gpu.uuid} holds an impossible {instance.profile}")
            occupied.append(spot)
        gpu.instances = instances
        gpu.serial = serial
