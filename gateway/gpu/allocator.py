"""The GPU seam of the orchestrator: picks, releases and describes a session's GPU.

Wraps a :class:`~gateway.gpu.base.GpuBackend` and the pure rules of
:mod:`gateway.core.gpu_select`. The database holds which UUIDs are allocated (on the
session row, committed with it), so this object keeps no allocation state; the caller
holds one lock from :meth:`GpuAllocator.allocate` until the row is stored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.core.gpu_select import (
    AvailableInstance,
    CreateInstance,
    NoGpu,
    UseDevice,
    available_instances,
    default_profile_problem,
    default_profiles,
    engine_slice,
    select_gpu,
)
from gateway.core.gpu_types import GpuInfo, Leftover, MigProfile
from gateway.core.idle import Reading
from gateway.errors import GpuError, GpuInstanceInUse, NoGpuAvailable
from gateway.gpu import create_on_first
from gateway.gpu.base import GpuBackend
from gateway.gpu.failed import FailedBackend
from gateway.gpu.none import NoneBackend
from gateway.models import CreateRequest, Session

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Allocation:
    uuid: str | None = None
    profile: str | None = None  # a MIG profile name, "full" for a whole GPU
    created: bool = False  # a MIG instance made for this session, destroyed with it


class GpuAllocator:
    def __init__(
        self,
        backend: GpuBackend,
        *,
        default_profile: str | None,
        dynamic: bool,
        engine_places: bool = False,
    ) -> None:
        """``default_profile``: what requests naming none get on a MIG host (None: each
        model's 3-slice profile; ``any``: any free MIG instance; see :func:`select_gpu`).
        ``engine_places``: the engine picks node and device (``--runtime swarm``): an
        allocation then names only the profile (:func:`engine_slice`), and the device
        is learnt from the started task."""
        self.backend = backend
        self._default_profile = default_profile
        self._dynamic = dynamic
        self._engine_places = engine_places

    @property
    def needs_device_request(self) -> bool:
        return self.backend.needs_device_request

    @property
    def gpu_less(self) -> bool:
        """Sessions here never get a GPU (``--gpus none``)."""
        return isinstance(self.backend, NoneBackend)

    async def check_default_profile(self) -> None:
        """At start-up: refuse an explicit default profile that no MIG GPU here offers,
        and log what an unset one gives on each model.

        Raises:
            GpuError: it is not offered; the log message names the valid profiles.
        """
        if isinstance(self.backend, FailedBackend) or self._engine_places:
            return  # nothing to check against (/healthz names the failure), or not here
        inventory, profiles = await self.backend.inventory(), await self.backend.profiles()
        problem = default_profile_problem(self._default_profile, inventory, profiles)
        if problem is not None:
            raise GpuError("the default MIG profile does not exist here", log_message=problem)
        if self._default_profile is None and any(g.mig_enabled for g in inventory):
            by_model = default_profiles(inventory, profiles)
            log.info(
                "requests naming no MIG profile get %s",
                ", ".join(f"{name} on {model}" for model, name in sorted(by_model.items()))
                or "any free MIG instance (no model here has a 3-slice profile)",
            )

    async def reclaim(self, held: set[str]) -> None:
        """Destroy MIG instances this gateway created that no session holds (``held``:
        every allocated UUID); failures are logged and retried at the next call."""
        await self.backend.reclaim(held)

    async def allocate(self, request: CreateRequest, allocated: set[str]) -> Allocation:
        """Choose (and with ``--mig-dynamic`` create) the session's GPU.

        Raises:
            UnknownMigProfile, GpuInstanceNotFound, GpuInstanceBusy, NoGpuAvailable, GpuError,
            InvalidRequest.
        """
        if self._engine_places:
            profile = engine_slice(
                mig_profile=request.mig_profile,
                mig_instance_uuid=request.mig_instance_uuid,
                default_profile=self._default_profile,
            )
            return Allocation(profile=profile)
        decision = select_gpu(
            mig_profile=request.mig_profile,
            mig_instance_uuid=request.mig_instance_uuid,
            inventory=await self.backend.inventory(),
            profiles=await self.backend.profiles(),
            allocated=allocated | self._to_destroy(),
            default_profile=self._default_profile,
            dynamic=self._dynamic,
            gpu_less=self.gpu_less,
        )
        match decision:
            case NoGpu():
                return Allocation()
            case UseDevice(uuid=uuid, profile=profile):
                return Allocation(uuid=uuid, profile=profile)
            case CreateInstance(targets=targets, fallback=fallback):
                await self.backend.reclaim(allocated)  # frees what a failed rollback left
                try:
                    device = await create_on_first(self.backend, targets)
                except NoGpuAvailable:
                    if fallback is None:
                        raise
                    return Allocation(uuid=fallback.uuid, profile=fallback.profile)
                log.info("created MIG instance %s (%s)", device.uuid, device.profile)
                return Allocation(uuid=device.uuid, profile=device.profile, created=True)
        raise AssertionError(f"unhandled GPU decision {decision!r}")

    async def release(self, allocation: Allocation) -> None:
        """Give the GPU back; a MIG instance created for the session is destroyed.

        One a host process holds (a monitoring daemon) is kept to destroy: never handed
        out, retried by :meth:`destroy_released`; the session may end meanwhile.

        Raises:
            GpuError: NVML refused otherwise (the caller retries the release).
        """
        if allocation.created and allocation.uuid:
            try:
                await self.backend.destroy_instance(allocation.uuid)
            except GpuInstanceInUse as exc:
                log.warning(
                    "MIG instance %s is held by a host process; kept to destroy, retried at "
                    "every sweep: %s",
                    allocation.uuid, exc.log_message,
                )  # fmt: skip
                return
            log.info("destroyed MIG instance %s", allocation.uuid)

    async def destroy_released(self) -> None:
        """Retry destroying the instances released while a host process held them."""
        await self.backend.destroy_released()

    def to_destroy(self) -> list[Leftover]:
        """Released instances not destroyed yet (shown in ``GET /gpus``)."""
        return self.backend.to_destroy()

    def _to_destroy(self) -> set[str]:
        return {leftover.mig_uuid for leftover in self.backend.to_destroy()}

    async def release_session(self, session: Session) -> None:
        await self.release(
            Allocation(
                uuid=session.gpu_uuid, profile=session.mig_profile, created=session.gpu_created
            )
        )

    @staticmethod
    def container_env(gpu_uuid: str | None) -> dict[str, str]:
        """Environment that pins the NVIDIA runtime to exactly this GPU (or none)."""
        return {
            "NVIDIA_VISIBLE_DEVICES": gpu_uuid or "void",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        }

    async def utilization(self, uuid: str) -> Reading:
        """The session GPU's utilisation now (see :meth:`GpuBackend.utilization`)."""
        return await self.backend.utilization(uuid)

    async def inventory(self) -> list[GpuInfo]:
        """Every GPU with its MIG devices, as the backend sees it now."""
        return await self.backend.inventory()

    async def health_inventory(self) -> list[GpuInfo]:
        """The inventory ``/healthz`` judges by (:meth:`GpuBackend.health_inventory`)."""
        return await self.backend.health_inventory()

    async def profiles(self) -> list[MigProfile]:
        """The MIG profiles of the GPU models present."""
        return await self.backend.profiles()

    async def available(self, allocated: set[str]) -> list[AvailableInstance]:
        """Free MIG instances, then free whole GPUs (``full``)."""
        return available_instances(
            await self.backend.inventory(),
            await self.backend.profiles(),
            allocated | self._to_destroy(),
        )
