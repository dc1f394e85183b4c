"""The NVML backend (nvidia-ml-py): real GPUs, their MIG devices and profiles, create/destroy.

Every NVML call runs on the backend's own single worker thread, so calls never overlap,
never block the event loop, and waiting callers wait as coroutines, not as threads of the
shared pool (password hashing and workspace preparation use that one). A call that has
not returned after ``call_timeout`` (a GPU hang, Xid 79) marks NVML failed: callers get a
503 at once until it returns. The ``pynvml`` module is a parameter, so
tests pass a fake that behaves as NVML documents.

What this relies on from NVML:

- ``nvmlInit`` failing with LibraryNotFound means no NVIDIA driver library here; any
  other failure (a driver/library version mismatch after an upgrade, say) is a broken
  GPU host, never a GPU-less one.
- MIG mode is ``nvmlDeviceGetMigMode`` → ``[current, pending]``; NotSupported means a
  GPU without MIG.
- MIG devices sit in slots ``0 .. nvmlDeviceGetMaxMigDeviceCount-1``; an empty slot
  raises NotFound. A device's GPU-instance id names its GPU instance, whose
  ``nvmlGpuInstanceGetInfo().profileId`` names its profile. ``nvmlDeviceGetAttributes``
  (MIG handles only) gives its GPU- and compute-instance slice counts: a compute instance
  smaller than its GPU instance is reported as ``<c>c.<profile>`` (as ``nvidia-smi``
  names it), marked ``split`` and never handed out, since it shares the GPU instance's
  memory with its siblings.
- Profiles come from ``nvmlDeviceGetGpuInstanceProfileInfo(handle, NVML_GPU_INSTANCE_
  PROFILE_*)`` (NotSupported/InvalidArgument: the GPU lacks it). Capacity, placement and
  create calls take ``info.id`` (19 for ``1g.10gb`` on an A100-80GB), never the enum index.
  A profile's memory slices are the size of its possible placements.
- Two rights, as the MIG capabilities split them: *monitor* (walking GPU instances,
  placements, and a MIG-mode GPU's own memory info) and *config* (create/destroy). Root on
  the host has both; in a container the NVIDIA Container Toolkit grants them with
  ``NVIDIA_MIG_MONITOR_DEVICES=all`` and ``NVIDIA_MIG_CONFIG_DEVICES=all``, and only to a
  container with ``CAP_SYS_ADMIN`` (its hook refuses to start the container otherwise).
  Without monitor rights MIG devices are named from their device name (``... MIG 1g.10gb``)
  and the GPU's memory is unknown (None); NoPermission becomes a :class:`GpuError` naming
  what to grant.
- Utilization is NotSupported in MIG mode: reported as None, and each MIG device's used
  memory is reported instead.
- Idle reclaim reads a session's utilisation: a whole GPU's from
  ``nvmlDeviceGetUtilizationRates``; a MIG slice's from GPM (``nvmlGpmMigSampleGet`` on the
  parent with the slice's GPU-instance id, SM_UTIL between two samples) where
  ``nvmlGpmQueryDeviceSupport`` says so (Hopper and newer); otherwise (Ampere) only whether
  compute processes run on its MIG device handle is known.
- One GPU failing (GPU is lost, Unknown) makes that GPU unhealthy, not the inventory.
  GPUs are looked up by index and UUID compare: ``nvmlDeviceGetHandleByUUID`` fails with
  GPU_IS_LOST while *any* GPU is lost.
- Destroying a GPU instance a process holds is InUse: :class:`GpuInstanceInUse`; the
  ledger keeps it marked to destroy. Created instances are destroyed by their ids from the
  :mod:`~gateway.gpu.ledger`, so a retry finds a GPU instance whose compute instance is
  already gone, but only while the instance found by those ids is still the one made
  (ids are reused; instances vanish at a reset). NotSupported there means MIG was turned
  off: gone.
- Telemetry calls a driver lacks (FunctionNotFound) or withholds are unknown (None), and
  a MIG device that vanishes while it is read is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import math
import re
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pynvml

from gateway.core.gpu_select import parse_mig_uuid
from gateway.core.gpu_types import GpuInfo, Leftover, MigDevice, MigProfile
from gateway.core.idle import Reading
from gateway.core.mig_placement import Placement, choose_placement, unoccupied
from gateway.errors import (
    GatewayError,
    GpuError,
    GpuInstanceInUse,
    NoGpuAvailable,
    UnknownMigProfile,
)
from gateway.gpu.ledger import Created, Ledger

log = logging.getLogger(__name__)

MIB = 1 << 20
T = TypeVar("T")
#: seconds an NVML call may take before NVML is marked failed (creates take a few seconds)
CALL_TIMEOUT = 60.0

# The NVIDIA Container Toolkit refuses either variable in a container without CAP_SYS_ADMIN.
_MONITOR_HINT = (
    "the gateway may not read this host's MIG instances: run it as root, or in a container "
    "set NVIDIA_MIG_MONITOR_DEVICES=all and add the capability SYS_ADMIN (NVIDIA Container "
    "Toolkit)"
)
_CONFIG_HINT = (
    "the gateway may not create or destroy MIG instances: run it as root with CAP_SYS_ADMIN, "
    "or in a container set NVIDIA_MIG_CONFIG_DEVICES=all and NVIDIA_MIG_MONITOR_DEVICES=all "
    "and add the capability SYS_ADMIN (NVIDIA Container Toolkit)"
)
_SPLIT_NAME = re.compile(r"^(\d+)c\.")


class NvmlLibraryMissing(GpuError):
    """``libnvidia-ml.so.1`` does not load: a host without the NVIDIA driver."""


@dataclass(frozen=True, slots=True)
class _Profile:
    enum_index: int  # NVML_GPU_INSTANCE_PROFILE_*, only for looking the profile up
    profile_id: int  # info.id, what every other call takes
    name: str
    compute_slices: int
    instance_count: int
    memory_mb: int


class NvmlBackend:
    """GPUs as NVML reports them; MIG instances created and destroyed through NVML."""

    needs_device_request = True

    def __init__(
        self, nv: ModuleType, ledger: Ledger | None = None, *, call_timeout: float = CALL_TIMEOUT
    ) -> None:
        """Wrap an initialised ``pynvml``; use :meth:`open` to initialise it."""
        self._nv = nv
        self._ledger = ledger or Ledger()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._call_timeout = call_timeout
        self._hung: str | None = None  # the call that has not returned, while it hasn't
        self._changing = 0  # creates and destroys queued or running on the worker
        self._last_inventory: list[GpuInfo] | None = None
        self._closed = False
        self._faults: dict[int, str] = {}  # GPU index → its last NVML error, to log changes
        self._gpm: dict[str, Any] = {}  # MIG UUID → its last GPM sample (Hopper and newer)
        # (one per slice read; freed when the slice is destroyed)

    @classmethod
    async def open(
        cls,
        nv: ModuleType | None = None,
        *,
        ledger_path: Path | None = None,
        boot_id: str | None = None,
    ) -> NvmlBackend:
        """Initialise NVML (``nvmlInit``) and return the backend.

        ``ledger_path`` keeps the ids of the MIG instances it creates (memory only if None);
        entries made in another boot than ``boot_id`` are dropped (the instances are gone).

        Raises:
            NvmlLibraryMissing: no ``libnvidia-ml.so.1`` (a host without the driver).
            GpuError: NVML is there but does not start (no driver loaded, driver and
                library versions differ, ...), or the ledger is unreadable.
        """
        nv = nv or pynvml
        ledger = await asyncio.to_thread(partial(Ledger, ledger_path, boot_id=boot_id))
        try:
            await asyncio.to_thread(nv.nvmlInit)
        except nv.NVMLError_LibraryNotFound as exc:
            raise NvmlLibraryMissing(
                "NVML is not available on this host",
                log_message=f"nvmlInit: libnvidia-ml.so.1 not found ({exc})",
            ) from exc
        except nv.NVMLError as exc:
            raise GpuError(
                "NVML failed to start on this host",
                log_message=f"nvmlInit failed: {exc} (NVML error {exc.value}); the NVIDIA "
                "driver is installed but not usable: check `nvidia-smi` on the host",
            ) from exc
        return cls(nv, ledger)

    async def inventory(self) -> list[GpuInfo]:
        gpus = await self._call("reading the GPU inventory", _inventory, self._nv)
        self._log_fault_changes(gpus)
        self._last_inventory = gpus
        return gpus

    async def health_inventory(self) -> list[GpuInfo]:
        """The inventory ``/healthz`` judges by: while MIG instances are being created or
        destroyed (seconds each on hardware, and NVML calls run one at a time), the last
        one read, so health does not flap with every dynamic session."""
        if self._changing and self._last_inventory is not None:
            return self._last_inventory
        return await self.inventory()

    async def profiles(self) -> list[MigProfile]:
        return await self._call("reading MIG profiles", _all_profiles, self._nv)

    async def create_instance(self, gpu_uuid: str, profile: str) -> MigDevice:
        """Create a GPU instance of ``profile`` at a free placement, and one compute instance.

        If the compute instance (or finding its MIG device, or recording it in the
        ledger) fails, the GPU instance is destroyed again. If the caller is cancelled
        meanwhile, the call still finishes and what it created is destroyed before the
        cancellation propagates.

        Raises:
            NoGpuAvailable: no capacity or free placement left on that GPU.
            UnknownMigProfile: the GPU's model has no such profile.
            GpuError: MIG disabled, missing rights (NoPermission), or another NVML error.
        """
        work = asyncio.create_task(
            self._call(
                f"creating a {profile} instance",
                _create,
                self._nv,
                self._ledger,
                gpu_uuid,
                profile,
                changes=True,
            ),
            name=f"nvml-create-{profile}",
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(GatewayError):
                await self.destroy_instance((await work).uuid)
            raise

    async def destroy_instance(self, mig_uuid: str) -> None:
        """Destroy the compute instance, then its GPU instance; already gone is success.

        An instance this gateway created is found by the ids it was created with, so a
        retry after the GPU instance was in use finds it although its MIG UUID is gone.
        Others are looked up by UUID (``MIG-<uuid>`` or ``MIG-GPU-<uuid>/<gi>/<ci>``).

        Raises:
            GpuInstanceInUse: a process on the host holds it (the next call retries).
            GpuError: NVML refused (e.g. NoPermission).
        """
        await self._call(
            f"destroying MIG instance {mig_uuid}",
            _destroy,
            self._nv,
            self._ledger,
            mig_uuid,
            changes=True,
        )
        sample = self._gpm.pop(mig_uuid, None)
        if sample is not None:  # its last GPM sample: gone with it
            with contextlib.suppress(GatewayError):
                await self._call("freeing a GPM sample", self._nv.nvmlGpmSampleFree, sample)

    async def reclaim(self, held: Collection[str]) -> None:
        """Destroy the instances this gateway created that no session holds.

        Those are left by a crash between creating an instance and storing its session,
        or by a rollback whose destroy failed. What fails now is logged and kept in the
        ledger for the next attempt.
        """
        try:
            await self._call(
                "reclaiming MIG instances",
                _reclaim,
                self._nv,
                self._ledger,
                frozenset(held),
                changes=True,
            )
        except GatewayError as exc:
            log.warning("reclaiming MIG instances failed: %s", exc.log_message)

    async def utilization(self, uuid: str) -> Reading:
        """The GPU's or MIG slice's utilisation now (see the module docstring). A MIG slice
        reads as unknown (None) with whether compute processes run on it where GPM is not
        offered, and on the first GPM sample.

        Raises:
            GpuError: NVML failed (the caller counts that as busy).
        """
        return await self._call(f"reading the utilisation of {uuid}", _reading, self._nv,
                                uuid, self._gpm)  # fmt: skip

    async def destroy_released(self) -> None:
        """Retry destroying the instances whose sessions ended while a host process held
        them (see :meth:`to_destroy`); what fails again is logged and kept."""
        if not self._ledger.to_destroy():
            return
        try:
            await self._call(
                "destroying released MIG instances",
                _reclaim,
                self._nv,
                self._ledger,
                None,
                changes=True,
            )
        except GatewayError as exc:
            log.warning("destroying released MIG instances failed: %s", exc.log_message)

    def to_destroy(self) -> list[Leftover]:
        """Instances released but not destroyed yet: never handed out, retried."""
        return [Leftover(e.mig_uuid or "", e.gpu_uuid, e.gi_id) for e in self._ledger.to_destroy()]

    async def close(self) -> None:
        """Shut NVML down (``nvmlShutdown``); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._call("shutting NVML down", self._nv.nvmlShutdown)
        except GatewayError as exc:
            log.warning("nvmlShutdown failed: %s", exc.log_message)
        self._worker.shutdown(wait=False)

    @property
    def hung(self) -> str | None:
        """The NVML call that has not returned in time, or None."""
        return self._hung

    async def _call(
        self, action: str, fn: Callable[..., T], *args: Any, changes: bool = False
    ) -> T:
        """``fn(*args)`` on the NVML worker, NVML errors translated.

        Raises:
            GpuError: NVML hangs (this call, or an earlier one that has not returned).
        """
        if self._hung is not None:
            raise GpuError(f"NVML is not answering ({self._hung})", log_message=self._hung)
        work = asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)
        self._changing += changes
        try:
            return await asyncio.wait_for(asyncio.shield(work), self._call_timeout)
        except TimeoutError:
            self._hung = f"{action} has not returned after {self._call_timeout:g} s"
            log.error("NVML marked failed until the call returns: %s", self._hung)
            work.add_done_callback(self._answered)
            raise GpuError(
                f"NVML is not answering ({self._hung})", log_message=self._hung
            ) from None
        except self._nv.NVMLError as exc:
            raise _translate(self._nv, exc, action, changes=changes) from exc
        finally:
            self._changing -= changes

    def _answered(self, work: asyncio.Future[Any]) -> None:
        if not work.cancelled():
            work.exception()  # retrieved: whatever it was, its caller has given up
        log.warning("NVML answers again (%s)", self._hung)
        self._hung = None

    def _log_fault_changes(self, gpus: list[GpuInfo]) -> None:
        for gpu in gpus:
            before = self._faults.get(gpu.index)
            if gpu.error is not None and gpu.error != before:
                log.error("GPU %d (%s) is unhealthy: %s", gpu.index, gpu.uuid, gpu.error)
                self._faults[gpu.index] = gpu.error
            elif gpu.error is None and before is not None:
                log.warning("GPU %d (%s) answers again", gpu.index, gpu.uuid)
                del self._faults[gpu.index]


def _translate(nv: ModuleType, exc: Exception, action: str, *, changes: bool) -> GatewayError:
    """The API error for an NVML error raised while doing ``action``."""
    detail = f"{action}: NVML: {exc}"
    if isinstance(exc, nv.NVMLError_InsufficientResources):
        return NoGpuAvailable("no room left for a new MIG instance", log_message=detail)
    if isinstance(exc, nv.NVMLError_NoPermission):
        return GpuError(_CONFIG_HINT if changes else _MONITOR_HINT, log_message=detail)
    if isinstance(exc, nv.NVMLError_InUse):
        return GpuInstanceInUse(
            "the session's MIG instance is still held by another process on the host "
            "(a monitoring daemon, say); the gateway retries releasing it at every sweep",
            log_message=detail,
        )
    return GpuError(f"NVML failed while {action}: {exc}")


# --- synchronous NVML work (always called under the backend's lock) ---------------------


def _inventory(nv: ModuleType) -> list[GpuInfo]:
    return [_gpu_entry(nv, index) for index in range(nv.nvmlDeviceGetCount())]


def _gpu_entry(nv: ModuleType, index: int) -> GpuInfo:
    """The GPU at ``index``, or an unhealthy entry saying what NVML answered instead."""
    handle = None
    try:
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        return _gpu_info(nv, index, handle)
    except nv.NVMLError as exc:
        return GpuInfo(
            uuid=_quietly(nv, nv.nvmlDeviceGetUUID, handle),
            index=index,
            name=_quietly(nv, nv.nvmlDeviceGetName, handle),
            error=f"{exc} (NVML error {exc.value})",
        )


def _quietly(nv: ModuleType, read: Callable[[Any], str], handle: Any) -> str | None:
    """``read(handle)``, or None if there is no handle or NVML fails."""
    if handle is None:
        return None
    try:
        return read(handle)
    except nv.NVMLError:
        return None


def _gpu_info(nv: ModuleType, index: int, handle: Any) -> GpuInfo:
    uuid = nv.nvmlDeviceGetUUID(handle)
    current, pending = _mig_mode(nv, handle)
    memory = _optional(nv, lambda: nv.nvmlDeviceGetMemoryInfo(handle))
    utilization = _optional(nv, lambda: nv.nvmlDeviceGetUtilizationRates(handle).gpu)
    temperature = _optional(nv, lambda: _temperature(nv, handle))
    power = _optional(nv, lambda: nv.nvmlDeviceGetPowerUsage(handle))
    limit = _optional(nv, lambda: nv.nvmlDeviceGetEnforcedPowerLimit(handle))
    return GpuInfo(
        uuid=uuid,
        index=index,
        name=nv.nvmlDeviceGetName(handle),
        memory_total=memory.total if memory is not None else None,
        memory_free=memory.free if memory is not None else None,
        memory_used=memory.used if memory is not None else None,
        utilization=utilization,
        temperature=temperature,
        power_usage=power / 1000 if power is not None else None,
        power_limit=limit / 1000 if limit is not None else None,
        mig_enabled=current,
        mig_pending=pending,
        mig_devices=tuple(_mig_devices(nv, handle, uuid)) if current else (),
    )


def _optional(nv: ModuleType, read: Callable[[], T]) -> T | None:
    """A value, or None where the GPU doesn't report it (utilization under MIG), NVML
    withholds it (a MIG-mode GPU's memory without monitor rights), or the driver lacks
    the call (FunctionNotFound)."""
    try:
        return read()
    except (nv.NVMLError_NotSupported, nv.NVMLError_NoPermission, nv.NVMLError_FunctionNotFound):
        return None


def _temperature(nv: ModuleType, handle: Any) -> int:
    """The GPU's temperature: ``nvmlDeviceGetTemperatureV``, or the call it replaces
    (deprecated in NVML 13, to be removed) on drivers that lack it."""
    try:
        return nv.nvmlDeviceGetTemperatureV(handle, nv.NVML_TEMPERATURE_GPU)
    except nv.NVMLError_FunctionNotFound:
        return nv.nvmlDeviceGetTemperature(handle, nv.NVML_TEMPERATURE_GPU)


def _mig_mode(nv: ModuleType, handle: Any) -> tuple[bool, bool]:
    try:
        current, pending = nv.nvmlDeviceGetMigMode(handle)
    except nv.NVMLError_NotSupported:
        return False, False
    return current == nv.NVML_DEVICE_MIG_ENABLE, pending == nv.NVML_DEVICE_MIG_ENABLE


def _mig_handles(nv: ModuleType, handle: Any) -> Iterator[Any]:
    """Every MIG device of a GPU, skipping empty slots."""
    for slot in range(nv.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            yield nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nv.NVMLError_NotFound:
            continue


def _mig_devices(nv: ModuleType, handle: Any, gpu_uuid: str) -> list[MigDevice]:
    """The GPU's MIG devices. One that vanishes while it is read (an outside ``nvidia-smi
    mig -dci``) is left out; one whose telemetry NVML withholds is listed without it."""
    profiles = _profiles(nv, handle)
    try:
        gi_profiles = {
            gi_id: spot.profile for gi_id, spot in _gpu_instances(nv, handle, profiles).items()
        }
    except nv.NVMLError_NoPermission:
        gi_profiles = {}  # no monitor rights: name each device from its device name instead
    memory_mb = {p.name: p.memory_mb for p in profiles}
    devices = []
    for mig in _mig_handles(nv, handle):
        try:
            devices.append(_mig_device(nv, mig, gpu_uuid, gi_profiles, memory_mb))
        except (nv.NVMLError_NotFound, nv.NVMLError_InvalidArgument) as exc:
            log.debug("a MIG device of GPU %s vanished while it was read: %s", gpu_uuid, exc)
    return devices


def _mig_device(
    nv: ModuleType, mig: Any, gpu_uuid: str, gi_profiles: dict[int, str], memory_mb: dict[str, int]
) -> MigDevice:
    gi_id = nv.nvmlDeviceGetGpuInstanceId(mig)
    name = _profile_from_name(nv.nvmlDeviceGetName(mig))
    profile = gi_profiles.get(gi_id) or _SPLIT_NAME.sub("", name)
    slices = _split_slices(nv, mig, name)
    memory = _optional(nv, lambda: nv.nvmlDeviceGetMemoryInfo(mig))
    return MigDevice(
        uuid=nv.nvmlDeviceGetUUID(mig),
        gpu_uuid=gpu_uuid,
        profile=profile if slices is None else f"{slices}c.{profile}",
        gi_id=gi_id,
        ci_id=nv.nvmlDeviceGetComputeInstanceId(mig),
        memory_bytes=memory.total if memory is not None else memory_mb.get(profile, 0) * MIB,
        memory_used=memory.used if memory is not None else None,
        split=slices is not None,
    )


def _split_slices(nv: ModuleType, mig: Any, name: str) -> int | None:
    """The compute slices of a MIG device whose compute instance is smaller than its GPU
    instance; None when it spans the GPU instance. ``name`` is its profile part of the
    device name, the fallback where NVML lacks ``nvmlDeviceGetAttributes``."""
    attributes = _optional(nv, lambda: nv.nvmlDeviceGetAttributes(mig))
    if attributes is None:
        match = _SPLIT_NAME.match(name)
        return int(match[1]) if match else None
    ci, gi = attributes.computeInstanceSliceCount, attributes.gpuInstanceSliceCount
    return ci if ci < gi else None


def _profile_from_name(name: str) -> str:
    """``NVIDIA A100-SXM4-40GB MIG 1g.5gb`` → ``1g.5gb`` (split: ``... MIG 1c.3g.20gb``)."""
    return name.rpartition("MIG ")[2] if "MIG " in name else "unknown"


def _profiles(nv: ModuleType, handle: Any) -> list[_Profile]:
    """The GPU instance profiles this GPU supports (every enum index tried), smallest first."""
    found = []
    for index in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = _profile_info(nv, handle, index)
        except (nv.NVMLError_NotSupported, nv.NVMLError_InvalidArgument):
            continue
        found.append(
            _Profile(
                enum_index=index,
                profile_id=info.id,
                name=_profile_name(info),
                compute_slices=info.sliceCount,
                instance_count=info.instanceCount,
                memory_mb=info.memorySizeMB,
            )
        )
    return sorted(found, key=lambda p: (p.compute_slices, p.memory_mb, p.name))


def _profile_info(nv: ModuleType, handle: Any, index: int) -> Any:
    try:
        return nv.nvmlDeviceGetGpuInstanceProfileInfo(handle, index)
    except nv.NVMLError_FunctionNotFound:  # driver older than the versioned (named) call
        return nv.nvmlDeviceGetGpuInstanceProfileInfo(handle, index, 1)


def _profile_name(info: Any) -> str:
    """NVML's name without ``MIG ``; drivers without names get ``<slices>g.<GiB rounded up>gb``.

    The derived name matches NVIDIA's for every A100-40GB and H100 profile; the one
    known miss is the A100-80GB's full profile (78.5 GiB: ``7g.79gb``, not ``7g.80gb``).
    """
    name = getattr(info, "name", b"")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    name = name.removeprefix("MIG ").strip()
    return name or f"{info.sliceCount}g.{math.ceil(info.memorySizeMB / 1024)}gb"


def _all_profiles(nv: ModuleType) -> list[MigProfile]:
    """Profiles of each MIG-enabled GPU model present, once per model; a GPU NVML fails
    on is skipped (the inventory reports it unhealthy)."""
    out: list[MigProfile] = []
    models: set[str] = set()
    for index in range(nv.nvmlDeviceGetCount()):
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            model = nv.nvmlDeviceGetName(handle)
            if model in models or not _mig_mode(nv, handle)[0]:
                continue
            found = [_mig_profile(nv, handle, p, model) for p in _profiles(nv, handle)]
        except nv.NVMLError as exc:
            log.debug("MIG profiles of GPU %d unreadable: %s", index, exc)
            continue
        models.add(model)
        out.extend(found)
    return out


def _mig_profile(nv: ModuleType, handle: Any, profile: _Profile, model: str) -> MigProfile:
    return MigProfile(
        name=profile.name,
        profile_id=profile.profile_id,
        compute_slices=profile.compute_slices,
        memory_slices=_memory_slices(nv, handle, profile),
        memory_bytes=profile.memory_mb * MIB,
        max_instances=profile.instance_count,
        gpu_name=model,
    )


def _memory_slices(nv: ModuleType, handle: Any, profile: _Profile) -> int:
    """The profile's placement size; 0 (unknown) when NVML withholds placements."""
    try:
        placements = _possible_placements(nv, handle, profile)
    except nv.NVMLError_NoPermission:
        return 0
    return placements[0].size if placements else 0


def _possible_placements(nv: ModuleType, handle: Any, profile: _Profile) -> list[Placement]:
    count = ctypes.c_uint(0)
    nv.nvmlDeviceGetGpuInstancePossiblePlacements(
        handle, profile.profile_id, None, ctypes.pointer(count)
    )
    buf = (nv.c_nvmlGpuInstancePlacement_t * count.value)()
    nv.nvmlDeviceGetGpuInstancePossiblePlacements(
        handle, profile.profile_id, buf, ctypes.pointer(count)
    )
    return [Placement(profile.name, buf[i].start, buf[i].size) for i in range(count.value)]


def _gpu_instances(nv: ModuleType, handle: Any, profiles: list[_Profile]) -> dict[int, Placement]:
    """Every GPU instance on the GPU: its id → where it sits and its profile name."""
    found = {}
    for p in profiles:
        buf = (nv.c_nvmlGpuInstance_t * p.instance_count)()
        count = ctypes.c_uint(0)
        nv.nvmlDeviceGetGpuInstances(handle, p.profile_id, buf, ctypes.pointer(count))
        for i in range(count.value):
            info = nv.nvmlGpuInstanceGetInfo(buf[i])
            found[info.id] = Placement(p.name, info.placement.start, info.placement.size)
    return found


def _find_gpu(nv: ModuleType, gpu_uuid: str) -> Any | None:
    """The handle of GPU ``gpu_uuid``, or None if no answering GPU here has that UUID.

    Found by index and UUID compare: ``nvmlDeviceGetHandleByUUID`` fails with GPU_IS_LOST
    while *any* GPU is lost (``nvml.h``), which would stop work on the healthy ones. A
    GPU NVML fails on is skipped: a lost GPU needs a reset, which clears its MIG state.
    """
    return _on_any_gpu(nv, gpu_uuid, lambda h: h if nv.nvmlDeviceGetUUID(h) == gpu_uuid else None)


def _on_any_gpu(nv: ModuleType, what: str, find: Callable[[Any], T | None]) -> T | None:
    """``find(handle)`` for each GPU by index until one answers (not None); GPUs NVML
    fails on are skipped."""
    for index in range(nv.nvmlDeviceGetCount()):
        try:
            found = find(nv.nvmlDeviceGetHandleByIndex(index))
        except nv.NVMLError as exc:
            log.debug("looking for %s: GPU %d skipped: %s", what, index, exc)
            continue
        if found is not None:
            return found
    return None


def _device_handle(nv: ModuleType, uuid: str) -> Any:
    """The handle of a GPU or MIG device, found by index as :func:`_find_gpu` does.

    Raises:
        NVMLError: NotFound, where no answering GPU has that device.
    """
    handle = _find_gpu(nv, uuid) if not uuid.startswith("MIG-") else _find_mig(nv, uuid)
    if handle is None:
        raise nv.NVMLError(nv.NVML_ERROR_NOT_FOUND)
    return handle


def _find_mig(nv: ModuleType, mig_uuid: str) -> Any | None:
    def on(handle: Any) -> Any | None:
        if not _mig_mode(nv, handle)[0]:
            return None
        return next(
            (m for m in _mig_handles(nv, handle) if nv.nvmlDeviceGetUUID(m) == mig_uuid), None
        )

    return _on_any_gpu(nv, mig_uuid, on)


def _gpu_handle(nv: ModuleType, gpu_uuid: str) -> Any:
    handle = _find_gpu(nv, gpu_uuid)
    if handle is None:
        raise GpuError(f"no GPU {gpu_uuid} answers on this host")
    return handle


def _create(nv: ModuleType, ledger: Ledger, gpu_uuid: str, profile_name: str) -> MigDevice:
    handle = _gpu_handle(nv, gpu_uuid)
    if not _mig_mode(nv, handle)[0]:
        raise GpuError(f"MIG is not enabled on GPU {gpu_uuid}")
    profiles = _profiles(nv, handle)
    profile = next((p for p in profiles if p.name == profile_name), None)
    if profile is None:
        raise UnknownMigProfile(
            f"{nv.nvmlDeviceGetName(handle)} has no MIG profile {profile_name!r}"
        )
    if nv.nvmlDeviceGetGpuInstanceRemainingCapacity(handle, profile.profile_id) == 0:
        raise NoGpuAvailable(f"no room for another {profile_name} instance on GPU {gpu_uuid}")
    occupied = list(_gpu_instances(nv, handle, profiles).values())
    spot = choose_placement(unoccupied(_possible_placements(nv, handle, profile), occupied))
    if spot is None:
        raise NoGpuAvailable(f"no free placement for a {profile_name} instance on GPU {gpu_uuid}")
    intent = Created(None, gpu_uuid, None, None, profile.profile_id, spot.start, ledger.boot_id)
    ledger.add(intent)  # before creating: a crash from here on leaves something to reclaim
    placement = nv.c_nvmlGpuInstancePlacement_t(spot.start, spot.size)
    gi = ci = None
    try:
        gi = nv.nvmlDeviceCreateGpuInstanceWithPlacement(
            handle, profile.profile_id, ctypes.pointer(placement)
        )
        ci_profile = nv.nvmlGpuInstanceGetComputeInstanceProfileInfo(
            gi,
            _compute_profile_enum(nv, profile.compute_slices),
            nv.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED,
        )
        ci = nv.nvmlGpuInstanceCreateComputeInstance(gi, ci_profile.id)
        ids = (nv.nvmlGpuInstanceGetInfo(gi).id, nv.nvmlComputeInstanceGetInfo(ci).id)
        device = next(
            (d for d in _mig_devices(nv, handle, gpu_uuid) if (d.gi_id, d.ci_id) == ids), None
        )
        if device is None:
            raise GpuError(
                "the new MIG instance did not appear",
                log_message=f"no MIG device for GI {ids[0]} CI {ids[1]} on {gpu_uuid}",
            )
        created = dataclasses.replace(intent, mig_uuid=device.uuid, gi_id=ids[0], ci_id=ids[1])
        ledger.add(created, replacing=intent)
    except Exception:
        _rollback(nv, gi, ci)
        with contextlib.suppress(GpuError):  # if kept, reclaim finds no GI there and drops it
            ledger.remove(intent.key)
        raise
    return device


def _compute_profile_enum(nv: ModuleType, slices: int) -> int:
    value = getattr(nv, f"NVML_COMPUTE_INSTANCE_PROFILE_{slices}_SLICE", None)
    if value is None:
        raise GpuError(f"NVML has no compute instance profile with {slices} slices")
    return value


def _rollback(nv: ModuleType, gi: Any, ci: Any) -> None:
    """Undo a half-made instance: compute instance first, then the GPU instance."""
    for destroy, target in ((nv.nvmlComputeInstanceDestroy, ci), (nv.nvmlGpuInstanceDestroy, gi)):
        if target is None:
            continue
        try:
            destroy(target)
        except nv.NVMLError as exc:
            log.error("rollback: %s failed (%s); a MIG instance may be left", destroy.__name__, exc)


def _gone(nv: ModuleType) -> tuple[type[Exception], ...]:
    """What NVML answers for an instance that no longer exists: NotFound, InvalidArgument
    (a stale id), NotSupported (MIG turned off on that GPU since)."""
    return (nv.NVMLError_NotFound, nv.NVMLError_InvalidArgument, nv.NVMLError_NotSupported)


def _destroy(nv: ModuleType, ledger: Ledger, mig_uuid: str) -> None:
    created = ledger.get(mig_uuid)
    if created is not None:
        try:
            _destroy_created(nv, ledger, created)
        except nv.NVMLError_InUse:
            ledger.mark_to_destroy(created)
            raise
        return
    located = _locate(nv, mig_uuid)
    if located is None:
        log.info("MIG instance %s is already gone", mig_uuid)
        return
    handle, gi_id, ci_id = located
    try:
        gi = nv.nvmlDeviceGetGpuInstanceById(handle, gi_id)
    except _gone(nv):
        return
    _destroy_gi(nv, gi, ci_id)


def _destroy_created(nv: ModuleType, ledger: Ledger, created: Created) -> None:
    """Destroy an instance from the ledger if it is still the one this gateway made,
    then forget it.

    Its GPU instance id may since name another instance (ids are reused, instances
    vanish at a GPU reset), so it is destroyed only if the GPU instance has the recorded
    profile and placement and either still holds the recorded MIG device, or holds no
    compute instance at all (a destroy that stopped half way). An intent's GPU instance
    is destroyed only while it has no compute instance.
    """
    found = _find_created(nv, created)
    if found is not None:
        gi, ci_id = found
        _destroy_gi(nv, gi, ci_id)
    ledger.remove(created.key)


def _find_created(nv: ModuleType, created: Created) -> tuple[Any, int | None] | None:
    """The GPU instance handle and compute instance id to destroy for ``created``, or
    None when it is gone or is no longer this gateway's (logged)."""
    what = created.mig_uuid or f"being created at start {created.start}"
    handle = _find_gpu(nv, created.gpu_uuid)
    if handle is None:
        log.warning("GPU %s of MIG instance %s is gone or lost", created.gpu_uuid, what)
        return None
    gi_id = created.gi_id if created.gi_id is not None else _gi_at(nv, handle, created)
    if gi_id is None:
        return None
    try:
        gi = nv.nvmlDeviceGetGpuInstanceById(handle, gi_id)
        info = nv.nvmlGpuInstanceGetInfo(gi)
    except _gone(nv):
        return None
    if created.start is not None and (info.profileId, info.placement.start) != (
        created.profile_id,
        created.start,
    ):
        log.warning("MIG instance %s is gone; GPU instance %d is another now", what, gi_id)
        return None
    devices = {
        nv.nvmlDeviceGetComputeInstanceId(mig): nv.nvmlDeviceGetUUID(mig)
        for mig in _mig_handles(nv, handle)
        if nv.nvmlDeviceGetGpuInstanceId(mig) == gi_id
    }
    if not devices and created.start is not None:
        return gi, None  # its compute instance is gone: only the GPU instance is left
    if created.ci_id is not None and devices.get(created.ci_id) == created.mig_uuid:
        return gi, created.ci_id
    log.warning(
        "MIG instance %s is gone; GPU instance %d holds another (%s)",
        what, gi_id, ", ".join(devices.values()) or "none",
    )  # fmt: skip
    return None


def _gi_at(nv: ModuleType, handle: Any, intent: Created) -> int | None:
    """The id of the GPU instance of the intent's profile at its placement, if any."""
    profiles = [p for p in _profiles(nv, handle) if p.profile_id == intent.profile_id]
    for gi_id, spot in _gpu_instances(nv, handle, profiles).items():
        if spot.start == intent.start:
            return gi_id
    return None


def _destroy_gi(nv: ModuleType, gi: Any, ci_id: int | None) -> None:
    """Destroy compute instance ``ci_id`` (if given and still there), then the GPU instance."""
    if ci_id is not None:
        with contextlib.suppress(*_gone(nv)):
            nv.nvmlComputeInstanceDestroy(nv.nvmlGpuInstanceGetComputeInstanceById(gi, ci_id))
    with contextlib.suppress(*_gone(nv)):
        nv.nvmlGpuInstanceDestroy(gi)


def _reclaim(nv: ModuleType, ledger: Ledger, held: frozenset[str] | None) -> None:
    """Destroy the ledger's instances that no session holds (``held``), or, with None,
    only those marked to destroy; what fails is logged and kept for the next attempt."""
    for created in ledger:
        if created.mig_uuid in (held or ()) or (held is None and not created.to_destroy):
            continue
        try:
            _destroy_created(nv, ledger, created)
        except (nv.NVMLError, GpuError) as exc:
            log.warning(
                "MIG instance %s (GPU %s, GPU instance %s) that no session holds is left "
                "for now: %s",
                created.key, created.gpu_uuid, created.gi_id, exc,
            )  # fmt: skip
            continue
        log.info("reclaimed MIG instance %s that no session holds", created.key)


def _locate(nv: ModuleType, mig_uuid: str) -> tuple[Any, int, int] | None:
    """The parent GPU handle, GI id and CI id of a MIG device, or None if it doesn't exist.

    GPUs NVML fails on are skipped."""
    legacy = parse_mig_uuid(mig_uuid)
    if legacy is not None:
        handle = _find_gpu(nv, legacy.gpu_uuid)
        return None if handle is None else (handle, legacy.gi_id, legacy.ci_id)
    return _on_any_gpu(nv, mig_uuid, lambda handle: _locate_on(nv, handle, mig_uuid))


def _locate_on(nv: ModuleType, handle: Any, mig_uuid: str) -> tuple[Any, int, int] | None:
    if not _mig_mode(nv, handle)[0]:
        return None
    for mig in _mig_handles(nv, handle):
        if nv.nvmlDeviceGetUUID(mig) == mig_uuid:
            gi_id = nv.nvmlDeviceGetGpuInstanceId(mig)
            return handle, gi_id, nv.nvmlDeviceGetComputeInstanceId(mig)
    return None


def _reading(nv: ModuleType, uuid: str, gpm: dict[str, Any]) -> Reading:
    handle = _device_handle(nv, uuid)
    if not uuid.startswith("MIG-"):
        return Reading(float(nv.nvmlDeviceGetUtilizationRates(handle).gpu))
    parent = nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
    if nv.nvmlGpmQueryDeviceSupport(parent).isSupportedDevice:
        sample = nv.nvmlGpmMigSampleGet(
            parent, nv.nvmlDeviceGetGpuInstanceId(handle), nv.nvmlGpmSampleAlloc()
        )
        previous, gpm[uuid] = gpm.get(uuid), sample
        if previous is not None:
            try:
                return Reading(_sm_util(nv, previous, sample))
            finally:
                nv.nvmlGpmSampleFree(previous)
    return Reading(None, processes=bool(nv.nvmlDeviceGetComputeRunningProcesses(handle)))


def _sm_util(nv: ModuleType, first: Any, second: Any) -> float:
    """GPM's SM utilisation (percent) between two samples."""
    request = nv.c_nvmlGpmMetricsGet_t()
    request.version = nv.NVML_GPM_METRICS_GET_VERSION
    request.numMetrics = 1
    request.sample1, request.sample2 = first, second
    request.metrics[0].metricId = nv.NVML_GPM_METRIC_SM_UTIL
    metric = nv.nvmlGpmMetricsGet(request).metrics[0]
    if metric.nvmlReturn != nv.NVML_SUCCESS:
        raise nv.NVMLError(metric.nvmlReturn)
    return float(metric.value)


# --- the read-only probe -----------------------------------------------------------------


async def probe(nv: ModuleType | None = None) -> dict[str, Any]:
    """Everything NVML reports about this host, as JSON-able data, changing nothing.

    Only queries run (plus ``nvmlInit``/``nvmlShutdown``); each failing call is listed
    under ``errors`` with its NVML code, and the probe carries on.
    """
    return await asyncio.to_thread(_probe, nv or pynvml)


def _probe(nv: ModuleType) -> dict[str, Any]:
    errors: list[dict[str, Any]] = []

    def ask(call: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            errors.append({"call": call, "error": str(exc), "code": exc.value})
            return None

    try:
        nv.nvmlInit()
    except nv.NVMLError as exc:
        return {
            "nvml": False,
            "errors": [{"call": "nvmlInit", "error": str(exc), "code": exc.value}],
        }
    try:
        count = ask("nvmlDeviceGetCount", nv.nvmlDeviceGetCount) or 0
        return {
            "nvml": True,
            "driver_version": ask("nvmlSystemGetDriverVersion", nv.nvmlSystemGetDriverVersion),
            "nvml_version": ask("nvmlSystemGetNVMLVersion", nv.nvmlSystemGetNVMLVersion),
            "cuda_driver_version": ask(
                "nvmlSystemGetCudaDriverVersion", nv.nvmlSystemGetCudaDriverVersion
            ),
            "gpus": [_probe_gpu(nv, ask, i) for i in range(count)],
            "errors": errors,
        }
    finally:
        ask("nvmlShutdown", nv.nvmlShutdown)


def _probe_gpu(nv: ModuleType, ask: Callable[..., Any], index: int) -> dict[str, Any]:
    handle = ask(f"nvmlDeviceGetHandleByIndex({index})", nv.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return {"index": index}
    at = f"({index})"
    memory = ask("nvmlDeviceGetMemoryInfo" + at, nv.nvmlDeviceGetMemoryInfo, handle)
    utilization = ask(
        "nvmlDeviceGetUtilizationRates" + at, nv.nvmlDeviceGetUtilizationRates, handle
    )
    mig_mode = ask("nvmlDeviceGetMigMode" + at, nv.nvmlDeviceGetMigMode, handle)
    gpu: dict[str, Any] = {
        "index": index,
        "uuid": ask("nvmlDeviceGetUUID" + at, nv.nvmlDeviceGetUUID, handle),
        "name": ask("nvmlDeviceGetName" + at, nv.nvmlDeviceGetName, handle),
        "memory": _memory_dict(memory),
        "utilization_gpu": utilization.gpu if utilization is not None else None,
        "temperature_c": ask("nvmlDeviceGetTemperatureV" + at, _temperature, nv, handle),
        "power_usage_mw": ask("nvmlDeviceGetPowerUsage" + at, nv.nvmlDeviceGetPowerUsage, handle),
        "power_limit_mw": ask(
            "nvmlDeviceGetEnforcedPowerLimit" + at, nv.nvmlDeviceGetEnforcedPowerLimit, handle
        ),
        "mig_mode": {"current": mig_mode[0], "pending": mig_mode[1]} if mig_mode else None,
    }
    if mig_mode and mig_mode[0] == nv.NVML_DEVICE_MIG_ENABLE:
        gpu["mig_devices"] = _probe_mig_devices(nv, ask, handle, at)
        gpu["profiles"] = _probe_profiles(nv, ask, handle, at)
    return gpu


def _probe_mig_devices(nv: ModuleType, ask: Callable[..., Any], handle: Any, at: str) -> list[Any]:
    slots = (
        ask("nvmlDeviceGetMaxMigDeviceCount" + at, nv.nvmlDeviceGetMaxMigDeviceCount, handle) or 0
    )
    devices = []
    for slot in range(slots):
        try:
            mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except nv.NVMLError_NotFound:
            continue  # an empty slot
        except nv.NVMLError as exc:
            devices.append({"slot": slot, "error": str(exc)})
            continue
        where = f"({at[1:-1]}, slot {slot})"
        attributes = ask("nvmlDeviceGetAttributes" + where, nv.nvmlDeviceGetAttributes, mig)
        devices.append(
            {
                "slot": slot,
                "uuid": ask("nvmlDeviceGetUUID" + where, nv.nvmlDeviceGetUUID, mig),
                "name": ask("nvmlDeviceGetName" + where, nv.nvmlDeviceGetName, mig),
                "gi_id": ask(
                    "nvmlDeviceGetGpuInstanceId" + where, nv.nvmlDeviceGetGpuInstanceId, mig
                ),
                "ci_id": ask(
                    "nvmlDeviceGetComputeInstanceId" + where, nv.nvmlDeviceGetComputeInstanceId, mig
                ),
                "memory": _memory_dict(
                    ask("nvmlDeviceGetMemoryInfo" + where, nv.nvmlDeviceGetMemoryInfo, mig)
                ),
                "slices": {
                    "gpu_instance": attributes.gpuInstanceSliceCount,
                    "compute_instance": attributes.computeInstanceSliceCount,
                }
                if attributes is not None
                else None,
            }
        )
    return devices


def _probe_profiles(nv: ModuleType, ask: Callable[..., Any], handle: Any, at: str) -> list[Any]:
    profiles = []
    for index in range(nv.NVML_GPU_INSTANCE_PROFILE_COUNT):
        try:
            info = _profile_info(nv, handle, index)
        except nv.NVMLError as exc:
            profiles.append({"enum_index": index, "error": str(exc)})
            continue
        profile = _Profile(
            index,
            info.id,
            _profile_name(info),
            info.sliceCount,
            info.instanceCount,
            info.memorySizeMB,
        )
        where = f"({at[1:-1]}, profile id {info.id})"
        placements = ask(
            "nvmlDeviceGetGpuInstancePossiblePlacements" + where,
            _possible_placements,
            nv,
            handle,
            profile,
        )
        instances = ask("nvmlDeviceGetGpuInstances" + where, _gpu_instances, nv, handle, [profile])
        profiles.append(
            {
                "enum_index": index,
                "id": info.id,
                "name": profile.name,
                "slice_count": info.sliceCount,
                "instance_count": info.instanceCount,
                "memory_size_mb": info.memorySizeMB,
                "remaining_capacity": ask(
                    "nvmlDeviceGetGpuInstanceRemainingCapacity" + where,
                    nv.nvmlDeviceGetGpuInstanceRemainingCapacity,
                    handle,
                    info.id,
                ),
                "placements": [{"start": p.start, "size": p.size} for p in placements or []],
                "gpu_instances": [
                    {"id": gi_id, "start": p.start, "size": p.size}
                    for gi_id, p in (instances or {}).items()
                ],
            }
        )
    return profiles


def _memory_dict(memory: Any) -> dict[str, int] | None:
    if memory is None:
        return None
    return {"total": memory.total, "free": memory.free, "used": memory.used}
