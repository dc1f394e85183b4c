"""A fake ``pynvml`` for unit tests: configurable GPUs that behave as NVML documents.

Same function names and signatures as nvidia-ml-py; constants, ctypes structs and the
``NVMLError_*`` classes are pynvml's own (they exist without a GPU), so the backend's
``except nv.NVMLError_NotFound`` clauses catch exactly what they would on a real host.

Behaviour copied from NVML: calls before ``nvmlInit`` raise Uninitialized; an empty
MIG slot raises NotFound; a profile the GPU lacks raises NotSupported; profile
``info.id`` values are the real ones (19 for 1g.10gb on an A100-80GB, found at enum
index 0), not the enum index; power is in milliwatts; utilization is NotSupported in
MIG mode. Rights come in two kinds, as the MIG capabilities do: ``monitor`` (reading GPU
instances, placements, capacity, and a MIG-mode GPU's own memory: ``nvmlDeviceGetMemoryInfo``
on the parent) and ``privileged`` (creating and destroying); without them NVML answers
NoPermission. A GPU instance is refused with InsufficientResources when no placement is
free; destroying a GPU instance that still has compute instances, or that a process holds
(``held``, e.g. a monitoring daemon), is InUse, as is destroying a compute instance a
process runs on. ``nvmlDeviceGetGpuInstances`` refuses a NULL buffer. GI ids come from a
pool, the lowest free one first, and are reused once destroyed (so an id says nothing about
the instance that holds it); MIG slots are reused lowest-first. ``reset`` makes every
instance vanish, as a reboot, driver reload or GPU reset does. A GPU instance may be split
into several compute instances; their MIG devices are named ``<slices>c.<profile>`` and
``nvmlDeviceGetAttributes`` (MIG handles only) reports both slice counts. A GPU with
``fault`` set answers every call on its handle with that error (GPU is lost: already when
its handle is looked up by index, and any lost GPU makes every lookup by UUID fail, as
``nvml.h`` says).

Utilisation, as NVML gives it: a whole GPU's from ``nvmlDeviceGetUtilizationRates``
(NotSupported in MIG mode); a MIG device's handle (also found by its UUID) lists compute
processes (one while ``held``); GPM (``gpm``: Hopper and newer; elsewhere
``nvmlGpmQueryDeviceSupport`` answers 0 and sampling is NotSupported) samples a GPU
instance's ``sm_util``, and SM_UTIL comes only from two distinct samples, the earlier
first; a freed sample is an invalid argument.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import types
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial, wraps
from typing import Any

import pynvml

MIB = 1 << 20
_NS = uuidlib.UUID("6ba7b811-9dad-11d1-80b4-00c04fd430c8")


@dataclass(frozen=True)
class FakeProfile:
    enum_index: int
    id: int
    name: str  # without the "MIG " prefix
    slices: int
    instance_count: int
    memory_mb: int
    starts: tuple[int, ...]
    size: int  # memory slices


def _seven_slice(names_mb: list[tuple[str, int]]) -> list[FakeProfile]:
    geometry = [  # enum index, real info.id, slices, count, starts, memory slices
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE, 19, 1, 7, (0, 1, 2, 3, 4, 5, 6), 1),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV1, 20, 1, 1, (0, 1, 2, 3, 4, 5, 6), 1),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_1_SLICE_REV2, 15, 1, 4, (0, 2, 4, 6), 2),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_2_SLICE, 14, 2, 3, (0, 2, 4), 2),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_3_SLICE, 9, 3, 2, (0, 4), 4),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_4_SLICE, 5, 4, 1, (0,), 4),
        (pynvml.NVML_GPU_INSTANCE_PROFILE_7_SLICE, 0, 7, 1, (0,), 8),
    ]
    return [
        FakeProfile(idx, pid, name, slices, count, mb, starts, size)
        for (name, mb), (idx, pid, slices, count, starts, size) in zip(
            names_mb, geometry, strict=True
        )
    ]


A100_80GB = _seven_slice(
    [("1g.10gb", 9856), ("1g.10gb+me", 9856), ("1g.20gb", 19968), ("2g.20gb", 19968),
     ("3g.40gb", 40192), ("4g.40gb", 40192), ("7g.80gb", 80384)]
)  # fmt: skip
A100_40GB = _seven_slice(
    [("1g.5gb", 4864), ("1g.5gb+me", 4864), ("1g.10gb", 9856), ("2g.10gb", 9856),
     ("3g.20gb", 19968), ("4g.20gb", 19968), ("7g.40gb", 40192)]
)  # fmt: skip
H100_80GB = _seven_slice(
    [("1g.10gb", 9984), ("1g.10gb+me", 9984), ("1g.20gb", 20096), ("2g.20gb", 20096),
     ("3g.40gb", 40448), ("4g.40gb", 40448), ("7g.80gb", 81152)]
)  # fmt: skip
#: The names are NVML's; no H200 reading was at hand, so the sizes are chosen to fit them
#: (NVML names a profile by its memory in GiB rounded up) and the 143771 MiB of the GPU.
H200_141GB = _seven_slice(
    [("1g.18gb", 17920), ("1g.18gb+me", 17920), ("1g.35gb", 35328), ("2g.35gb", 35328),
     ("3g.71gb", 72192), ("4g.71gb", 72192), ("7g.141gb", 143616)]
)  # fmt: skip


@dataclass
class FakeCi:
    id: int
    slot: int
    uuid: str
    slices: int
    held: bool = False  # a process runs on it: destroying it is InUse


@dataclass
class FakeGi:
    id: int
    profile: FakeProfile
    start: int
    cis: dict[int, FakeCi] = field(default_factory=dict)
    held: bool = False  # a process (e.g. a monitoring daemon) holds it: destroying it is InUse
    memory_used: int = 0
    sm_util: float = 0.0  # what GPM reports for it (percent of its SMs busy)


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    memory_total: int = 81920 * MIB
    memory_used: int = 0
    utilization: int = 0
    temperature: int = 34
    power_mw: int = 61_500
    power_limit_mw: int = 400_000
    mig: bool | None = True  # None: the GPU has no MIG support
    mig_pending: bool | None = None  # default: same as mig
    profiles: list[FakeProfile] = field(default_factory=lambda: list(A100_80GB))
    legacy_uuids: bool = False  # MIG UUIDs as MIG-GPU-<uuid>/<gi>/<ci> (pre-R470 drivers)
    max_mig_devices: int = 7
    gis: dict[int, FakeGi] = field(default_factory=dict)
    fault: int | None = None  # NVML error code every call on this GPU raises
    gpm: bool = False  # GPU performance monitoring (Hopper and newer)


#: an H100 SXM 80GB and an H200 SXM 141GB, as NVML names them
h100 = partial(
    FakeGpu, name="NVIDIA H100 80GB HBM3", memory_total=81559 * MIB, power_limit_mw=700_000,
    profiles=H100_80GB, gpm=True,
)  # fmt: skip
h200 = partial(
    FakeGpu, name="NVIDIA H200", memory_total=143771 * MIB, power_limit_mw=700_000,
    profiles=H200_141GB, gpm=True,
)  # fmt: skip


@dataclass(frozen=True)
class MigHandle:
    gpu: FakeGpu
    gi_id: int
    ci_id: int


def _err(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


def _nvml(
    privileged: bool = False, monitor: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Record the call; refuse it before nvmlInit, without rights, on a faulty GPU, or
    when told to fail."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(fn)
        def call(self: FakeNvml, *args: Any) -> Any:
            self.calls.append(fn.__name__)
            if fn.__name__ in self.failures:
                raise _err(self.failures[fn.__name__])
            if not self.initialised and fn.__name__ != "nvmlInit":
                raise _err(pynvml.NVML_ERROR_UNINITIALIZED)
            gpu = args[0] if args else None
            gpu = gpu.gpu if isinstance(gpu, MigHandle) else gpu
            if isinstance(gpu, FakeGpu) and gpu.fault is not None:
                raise _err(gpu.fault)
            if (privileged and not self.privileged) or (monitor and not self.monitor):
                raise _err(pynvml.NVML_ERROR_NO_PERMISSION)
            return fn(self, *args)

        return call

    return wrap


class FakeNvml(types.ModuleType):
    """Stands in for the ``pynvml`` module; see the module docstring."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        privileged: bool = True,
        monitor: bool | None = None,
        old_driver: bool = False,
        library: bool = True,
        init_error: int | None = None,
    ) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.privileged = privileged  # may create and destroy (mig/config, CAP_SYS_ADMIN)
        self.monitor = privileged if monitor is None else monitor  # may read (mig/monitor)
        self.init_error = init_error  # what nvmlInit raises (e.g. driver/library mismatch)
        self.old_driver = old_driver  # no versioned (named) profile-info call
        self.library = library  # False: libnvidia-ml.so.1 does not load
        self.initialised = 0
        self.calls: list[str] = []
        self.failures: dict[str, int] = {}  # function name -> NVML error code it raises
        self._keys = itertools.count(0x1000, 0x10)
        self._gi_handles: dict[int, tuple[FakeGpu, int]] = {}
        self._ci_handles: dict[int, tuple[FakeGpu, int, int]] = {}
        self._serial = itertools.count()
        self._sample_order = itertools.count()
        self.gpm_samples: dict[int, tuple[Any, tuple[int, float] | None]] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML", "c_nvml")):  # constants, structs, error classes
            return getattr(pynvml, name)
        raise AttributeError(name)

    # --- test helpers (not NVML) ---------------------------------------------------------

    def precreate(
        self, gpu: FakeGpu, profile: str, start: int, split: tuple[int, ...] = ()
    ) -> FakeCi:
        """An instance that existed before the test (made by an admin with nvidia-smi);
        ``split``: the slice counts of several compute instances instead of one whole one.
        Returns the first compute instance."""
        spec = next(p for p in gpu.profiles if p.name == profile)
        gi = self._add_gi(gpu, spec, start)
        cis = [self._add_ci(gpu, gi, slices) for slices in split or (spec.slices,)]
        return cis[0]

    def block(self, name: str) -> tuple[threading.Event, threading.Event]:
        """Make ``name`` take as long as the test wants, as creates and destroys take
        seconds on hardware: it waits until released. Returns (reached, release)."""
        reached, release = threading.Event(), threading.Event()
        real = getattr(self, name)

        def wait(*args: Any) -> Any:
            reached.set()
            release.wait(timeout=30)
            return real(*args)

        setattr(self, name, wait)
        return reached, release

    def reset(self, *gpus: FakeGpu) -> None:
        """A reboot, driver reload or GPU reset: MIG instances do not survive it (every
        GPU if none is named)."""
        for gpu in gpus or self.gpus:
            gpu.gis.clear()

    def mig_uuids(self, gpu: FakeGpu) -> list[str]:
        return [ci.uuid for gi in gpu.gis.values() for ci in gi.cis.values()]

    # --- system ---------------------------------------------------------------------------

    @_nvml()
    def nvmlInit(self) -> None:
        if not self.library:
            raise _err(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
        if self.init_error is not None:
            raise _err(self.init_error)
        self.initialised += 1

    @_nvml()
    def nvmlShutdown(self) -> None:
        self.initialised -= 1

    @_nvml()
    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    @_nvml()
    def nvmlSystemGetNVMLVersion(self) -> str:
        return "12.550.54.15"

    @_nvml()
    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    # --- devices --------------------------------------------------------------------------

    @_nvml()
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    @_nvml()
    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        if not 0 <= index < len(self.gpus):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if self.gpus[index].fault == pynvml.NVML_ERROR_GPU_IS_LOST:
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        return self.gpus[index]

    @_nvml()
    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu | MigHandle:
        # nvml.h: GPU_IS_LOST "if any GPU has fallen off the bus" (the search touches them all)
        if any(gpu.fault == pynvml.NVML_ERROR_GPU_IS_LOST for gpu in self.gpus):
            raise _err(pynvml.NVML_ERROR_GPU_IS_LOST)
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
            for gi in gpu.gis.values():
                for ci in gi.cis.values():
                    if ci.uuid == uuid and gpu.mig:
                        return MigHandle(gpu, gi.id, ci.id)
        raise _err(pynvml.NVML_ERROR_NOT_FOUND)

    @_nvml()
    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> FakeGpu:
        if not isinstance(handle, MigHandle):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.gpu

    @_nvml()
    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu | MigHandle) -> list[Any]:
        if isinstance(handle, MigHandle):
            held = self._ci(handle).held
            return [types.SimpleNamespace(pid=4242, usedGpuMemory=1 << 30)] if held else []
        if handle.mig and not self.monitor:  # nvml.h: aggregate info needs privileges
            raise _err(pynvml.NVML_ERROR_NO_PERMISSION)
        return []

    # --- GPU performance monitoring (GPM) --------------------------------------------------

    @_nvml()
    def nvmlGpmQueryDeviceSupport(self, gpu: FakeGpu) -> Any:
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(gpu.gpm)
        return support

    @_nvml()
    def nvmlGpmSampleAlloc(self) -> Any:
        sample = pynvml.struct_c_nvmlGpmSample_t()
        pointer = ctypes.pointer(sample)
        self.gpm_samples[_address(pointer)] = (sample, None)
        return pointer

    @_nvml()
    def nvmlGpmSampleFree(self, pointer: Any) -> None:
        if self.gpm_samples.pop(_address(pointer), None) is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    @_nvml()
    def nvmlGpmMigSampleGet(self, gpu: FakeGpu, gi_id: int, pointer: Any) -> Any:
        if not gpu.gpm:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        key = _address(pointer)
        if key not in self.gpm_samples:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        taken = (next(self._sample_order), self._gi(gpu, gi_id).sm_util)
        self.gpm_samples[key] = (self.gpm_samples[key][0], taken)
        return pointer

    @_nvml()
    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        first = self.gpm_samples.get(_address(request.sample1))
        second = self.gpm_samples.get(_address(request.sample2))
        if first is None or second is None or first[1] is None or second[1] is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for metric in request.metrics[: request.numMetrics]:
            if first[1][0] >= second[1][0] or metric.metricId != pynvml.NVML_GPM_METRIC_SM_UTIL:
                metric.nvmlReturn = pynvml.NVML_ERROR_INVALID_ARGUMENT
                continue
            metric.nvmlReturn = pynvml.NVML_SUCCESS
            metric.value = second[1][1]
        return request

    @_nvml()
    def nvmlDeviceGetUUID(self, handle: FakeGpu | MigHandle) -> str:
        if isinstance(handle, MigHandle):
            return self._ci(handle).uuid
        return handle.uuid

    @_nvml()
    def nvmlDeviceGetName(self, handle: FakeGpu | MigHandle) -> str:
        if isinstance(handle, MigHandle):
            gi = self._gi(handle.gpu, handle.gi_id)
            ci = self._ci(handle)
            split = f"{ci.slices}c." if ci.slices < gi.profile.slices else ""
            return f"{handle.gpu.name} MIG {split}{gi.profile.name}"
        return handle.name

    @_nvml()
    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu | MigHandle) -> Any:
        if isinstance(handle, MigHandle):
            gi = self._gi(handle.gpu, handle.gi_id)
            total = gi.profile.memory_mb * MIB
            return pynvml.c_nvmlMemory_t(total, total - gi.memory_used, gi.memory_used)
        if handle.mig and not self.monitor:  # nvml.h: aggregate info needs privileges
            raise _err(pynvml.NVML_ERROR_NO_PERMISSION)
        free = handle.memory_total - handle.memory_used
        return pynvml.c_nvmlMemory_t(handle.memory_total, free, handle.memory_used)

    @_nvml()
    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        if gpu.mig:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.c_nvmlUtilization_t(gpu.utilization, 0)

    @_nvml()
    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    @_nvml()
    def nvmlDeviceGetTemperatureV(self, gpu: FakeGpu, sensor: int) -> int:
        """nvidia-ml-py 12.535+; drivers before it answer FunctionNotFound (``failures``)."""
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.temperature

    @_nvml()
    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        return gpu.power_mw

    @_nvml()
    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        return gpu.power_limit_mw

    # --- MIG mode and MIG devices ---------------------------------------------------------

    @_nvml()
    def nvmlDeviceGetMigMode(self, gpu: FakeGpu) -> list[int]:
        if gpu.mig is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        pending = gpu.mig if gpu.mig_pending is None else gpu.mig_pending
        return [int(gpu.mig), int(pending)]

    @_nvml()
    def nvmlDeviceGetMaxMigDeviceCount(self, gpu: FakeGpu) -> int:
        if gpu.mig is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.max_mig_devices

    @_nvml()
    def nvmlDeviceGetMigDeviceHandleByIndex(self, gpu: FakeGpu, index: int) -> MigHandle:
        if not gpu.mig or not 0 <= index < gpu.max_mig_devices:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for gi in gpu.gis.values():
            for ci in gi.cis.values():
                if ci.slot == index:
                    return MigHandle(gpu, gi.id, ci.id)
        raise _err(pynvml.NVML_ERROR_NOT_FOUND)

    @_nvml()
    def nvmlDeviceGetGpuInstanceId(self, handle: Any) -> int:
        if not isinstance(handle, MigHandle):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.gi_id

    @_nvml()
    def nvmlDeviceGetComputeInstanceId(self, handle: Any) -> int:
        if not isinstance(handle, MigHandle):
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.ci_id

    @_nvml()
    def nvmlDeviceGetAttributes(self, handle: Any) -> Any:
        if not isinstance(handle, MigHandle):  # nvml.h: MIG device handles only
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        gi = self._gi(handle.gpu, handle.gi_id)
        attributes = pynvml.c_nvmlDeviceAttributes()
        attributes.gpuInstanceSliceCount = gi.profile.slices
        attributes.computeInstanceSliceCount = self._ci(handle).slices
        attributes.memorySizeMB = gi.profile.memory_mb
        return attributes

    # --- GPU instance profiles, placements, capacity --------------------------------------

    @_nvml()
    def nvmlDeviceGetGpuInstanceProfileInfo(
        self, gpu: FakeGpu, profile: int, version: int = 2
    ) -> Any:
        if version == 2 and self.old_driver:
            raise _err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if not 0 <= profile < pynvml.NVML_GPU_INSTANCE_PROFILE_COUNT:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        spec = next((p for p in gpu.profiles if p.enum_index == profile), None)
        if not gpu.mig or spec is None:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        info = (
            pynvml.c_nvmlGpuInstanceProfileInfo_v2_t()
            if version == 2
            else pynvml.c_nvmlGpuInstanceProfileInfo_t()
        )
        info.id = spec.id
        info.sliceCount = spec.slices
        info.instanceCount = spec.instance_count
        info.memorySizeMB = spec.memory_mb
        if version == 2:
            info.name = f"MIG {spec.name}".encode()
        return info

    @_nvml(monitor=True)
    def nvmlDeviceGetGpuInstanceRemainingCapacity(self, gpu: FakeGpu, profile_id: int) -> int:
        spec = self._profile(gpu, profile_id)
        taken = self._occupied(gpu)
        room = spec.instance_count - sum(gi.profile is spec for gi in gpu.gis.values())
        count = 0
        for start in sorted(spec.starts, reverse=True):
            if count < room and not any(_overlap(start, spec.size, s, n) for s, n in taken):
                taken.append((start, spec.size))
                count += 1
        return count

    @_nvml(monitor=True)
    def nvmlDeviceGetGpuInstancePossiblePlacements(
        self, gpu: FakeGpu, profile_id: int, placements: Any, count: Any
    ) -> int:
        spec = self._profile(gpu, profile_id)
        if placements is not None:
            if len(placements) < len(spec.starts):
                raise _err(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
            for i, start in enumerate(spec.starts):
                placements[i].start = start
                placements[i].size = spec.size
        count.contents.value = len(spec.starts)
        return pynvml.NVML_SUCCESS

    @_nvml(monitor=True)
    def nvmlDeviceGetGpuInstances(
        self, gpu: FakeGpu, profile_id: int, instances: Any, count: Any
    ) -> int:
        spec = self._profile(gpu, profile_id)
        if instances is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        found = [gi for gi in gpu.gis.values() if gi.profile is spec]
        if len(instances) < len(found):
            raise _err(pynvml.NVML_ERROR_INSUFFICIENT_SIZE)
        for i, gi in enumerate(found):
            instances[i] = self._gi_ptr(gpu, gi.id)
        count.contents.value = len(found)
        return pynvml.NVML_SUCCESS

    # --- GPU instances ----------------------------------------------------------------------

    @_nvml(privileged=True)
    def nvmlDeviceCreateGpuInstance(self, gpu: FakeGpu, profile_id: int) -> Any:
        spec = self._profile(gpu, profile_id, creating=True)
        free = [s for s in spec.starts if self._fits(gpu, spec, s)]
        if not free:
            raise _err(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        return self._gi_ptr(gpu, self._add_gi(gpu, spec, max(free)).id)

    @_nvml(privileged=True)
    def nvmlDeviceCreateGpuInstanceWithPlacement(
        self, gpu: FakeGpu, profile_id: int, placement: Any
    ) -> Any:
        spec = self._profile(gpu, profile_id, creating=True)
        wanted = placement.contents
        if wanted.start not in spec.starts or wanted.size != spec.size:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not self._fits(gpu, spec, wanted.start):
            raise _err(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        return self._gi_ptr(gpu, self._add_gi(gpu, spec, wanted.start).id)

    @_nvml(monitor=True)
    def nvmlDeviceGetGpuInstanceById(self, gpu: FakeGpu, gi_id: int) -> Any:
        if not gpu.mig:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if gi_id not in gpu.gis:
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return self._gi_ptr(gpu, gi_id)

    @_nvml()
    def nvmlGpuInstanceGetInfo(self, gi_handle: Any) -> Any:
        _, gi = self._resolve_gi(gi_handle)
        info = pynvml.c_nvmlGpuInstanceInfo_t()
        info.id = gi.id
        info.profileId = gi.profile.id
        info.placement.start = gi.start
        info.placement.size = gi.profile.size
        return info

    @_nvml(privileged=True)
    def nvmlGpuInstanceDestroy(self, gi_handle: Any) -> int:
        gpu, gi = self._resolve_gi(gi_handle)
        if gi.cis or gi.held:
            raise _err(pynvml.NVML_ERROR_IN_USE)
        del gpu.gis[gi.id]
        return pynvml.NVML_SUCCESS

    # --- compute instances ------------------------------------------------------------------

    @_nvml()
    def nvmlGpuInstanceGetComputeInstanceProfileInfo(
        self, gi_handle: Any, profile: int, eng_profile: int, version: int = 2
    ) -> Any:
        _, gi = self._resolve_gi(gi_handle)
        slices = _CI_SLICES.get(profile)
        if slices is None or slices > gi.profile.slices:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if eng_profile != pynvml.NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        info = pynvml.c_nvmlComputeInstanceProfileInfo_v2_t()
        info.id = profile  # on real GPUs the CI profile id equals its enum value
        info.sliceCount = slices
        info.instanceCount = gi.profile.slices // slices
        return info

    @_nvml(privileged=True)
    def nvmlGpuInstanceCreateComputeInstance(self, gi_handle: Any, profile_id: int) -> Any:
        gpu, gi = self._resolve_gi(gi_handle)
        slices = _CI_SLICES.get(profile_id)
        if slices is None or slices > gi.profile.slices:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if sum(ci.slices for ci in gi.cis.values()) + slices > gi.profile.slices:
            raise _err(pynvml.NVML_ERROR_INSUFFICIENT_RESOURCES)
        ci = self._add_ci(gpu, gi, slices)
        return self._ci_ptr(gpu, gi.id, ci.id)

    @_nvml(monitor=True)
    def nvmlGpuInstanceGetComputeInstanceById(self, gi_handle: Any, ci_id: int) -> Any:
        gpu, gi = self._resolve_gi(gi_handle)
        if ci_id not in gi.cis:
            raise _err(pynvml.NVML_ERROR_NOT_FOUND)
        return self._ci_ptr(gpu, gi.id, ci_id)

    @_nvml()
    def nvmlComputeInstanceGetInfo(self, ci_handle: Any) -> Any:
        *_, ci = self._resolve_ci(ci_handle)
        info = pynvml.c_nvmlComputeInstanceInfo_t()
        info.id = ci.id
        return info

    @_nvml(privileged=True)
    def nvmlComputeInstanceDestroy(self, ci_handle: Any) -> int:
        _, gi, ci = self._resolve_ci(ci_handle)
        if ci.held:
            raise _err(pynvml.NVML_ERROR_IN_USE)
        del gi.cis[ci.id]
        return pynvml.NVML_SUCCESS

    # --- internals --------------------------------------------------------------------------

    def _profile(self, gpu: FakeGpu, profile_id: int, creating: bool = False) -> FakeProfile:
        if creating and not gpu.mig:
            raise _err(pynvml.NVML_ERROR_NOT_SUPPORTED)
        spec = next((p for p in gpu.profiles if p.id == profile_id), None)
        if spec is None:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return spec

    def _occupied(self, gpu: FakeGpu) -> list[tuple[int, int]]:
        return [(gi.start, gi.profile.size) for gi in gpu.gis.values()]

    def _fits(self, gpu: FakeGpu, spec: FakeProfile, start: int) -> bool:
        mine = sum(gi.profile is spec for gi in gpu.gis.values())
        clash = any(_overlap(start, spec.size, s, n) for s, n in self._occupied(gpu))
        return mine < spec.instance_count and not clash

    def _add_gi(self, gpu: FakeGpu, spec: FakeProfile, start: int) -> FakeGi:
        gi_id = next(n for n in itertools.count(1) if n not in gpu.gis)  # a pool: reused
        gi = FakeGi(id=gi_id, profile=spec, start=start)
        gpu.gis[gi.id] = gi
        return gi

    def _add_ci(self, gpu: FakeGpu, gi: FakeGi, slices: int) -> FakeCi:
        used = {ci.slot for g in gpu.gis.values() for ci in g.cis.values()}
        slot = next(s for s in range(gpu.max_mig_devices) if s not in used)
        ci_id = next(n for n in itertools.count() if n not in gi.cis)
        if gpu.legacy_uuids:
            uuid = f"MIG-{gpu.uuid}/{gi.id}/{ci_id}"
        else:
            uuid = f"MIG-{uuidlib.uuid5(_NS, f'{gpu.uuid}/{next(self._serial)}')}"
        gi.cis[ci_id] = FakeCi(ci_id, slot, uuid, slices)
        return gi.cis[ci_id]

    def _gi(self, gpu: FakeGpu, gi_id: int) -> FakeGi:
        if gi_id not in gpu.gis:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gpu.gis[gi_id]

    def _ci(self, handle: MigHandle) -> FakeCi:
        gi = self._gi(handle.gpu, handle.gi_id)
        if handle.ci_id not in gi.cis:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return gi.cis[handle.ci_id]

    def _gi_ptr(self, gpu: FakeGpu, gi_id: int) -> Any:
        key = next(self._keys)
        self._gi_handles[key] = (gpu, gi_id)
        return ctypes.cast(ctypes.c_void_p(key), pynvml.c_nvmlGpuInstance_t)

    def _ci_ptr(self, gpu: FakeGpu, gi_id: int, ci_id: int) -> Any:
        key = next(self._keys)
        self._ci_handles[key] = (gpu, gi_id, ci_id)
        return ctypes.cast(ctypes.c_void_p(key), pynvml.c_nvmlComputeInstance_t)

    def _resolve_gi(self, handle: Any) -> tuple[FakeGpu, FakeGi]:
        key = ctypes.cast(handle, ctypes.c_void_p).value
        if key not in self._gi_handles:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu, gi_id = self._gi_handles[key]
        return gpu, self._gi(gpu, gi_id)

    def _resolve_ci(self, handle: Any) -> tuple[FakeGpu, FakeGi, FakeCi]:
        key = ctypes.cast(handle, ctypes.c_void_p).value
        if key not in self._ci_handles:
            raise _err(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu, gi_id, ci_id = self._ci_handles[key]
        return gpu, self._gi(gpu, gi_id), self._ci(MigHandle(gpu, gi_id, ci_id))


#: compute instance profile (its enum value, which is also its id on real GPUs) → slices
_CI_SLICES = {
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_1_SLICE: 1,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_2_SLICE: 2,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_3_SLICE: 3,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_4_SLICE: 4,
    pynvml.NVML_COMPUTE_INSTANCE_PROFILE_7_SLICE: 7,
}


def _address(pointer: Any) -> int:
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _overlap(a_start: int, a_size: int, b_start: int, b_size: int) -> bool:
    return a_start < b_start + b_size and b_start < a_start + a_size
