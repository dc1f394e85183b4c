"""The backend of a GPU host whose NVML did not start (``LIB_RM_VERSION_MISMATCH`` after a
driver upgrade without a reboot, the driver not loaded, an unreadable instance ledger).

Refusing to start would take every session's relay down with it, GPU-less ones too, while
their containers keep running. Instead the gateway starts with this backend: every GPU
call answers 503 with the reason (``/healthz`` says it, GPU POSTs fail), sessions already
running are relayed and can be deleted, and releasing a GPU session's MIG instance waits
(its row stays ``ending`` and the sweep retries) until a restart finds NVML working.
"""

from __future__ import annotations

from typing import NoReturn

from gateway.core.gpu_types import GpuInfo, MigDevice, MigProfile
from gateway.core.idle import Reading
from gateway.errors import GpuError
from gateway.gpu.base import NothingLeftBehind


class FailedBackend(NothingLeftBehind):
    """GPUs that are there but unusable: every GPU operation raises :class:`GpuError`."""

    needs_device_request = True

    def __init__(self, cause: GpuError) -> None:
        self.cause = cause

    @property
    def reason(self) -> str:
        """Why NVML is unavailable, for ``/healthz`` and the log."""
        return self.cause.log_message

    async def inventory(self) -> list[GpuInfo]:
        self._refuse()

    async def health_inventory(self) -> list[GpuInfo]:
        self._refuse()

    async def profiles(self) -> list[MigProfile]:
        self._refuse()

    async def create_instance(self, gpu_uuid: str, profile: str) -> MigDevice:
        self._refuse()

    async def destroy_instance(self, mig_uuid: str) -> None:
        self._refuse()

    async def utilization(self, uuid: str) -> Reading:
        """Unreadable: idle reclaim counts the session as busy."""
        self._refuse()

    def _refuse(self) -> NoReturn:
        raise GpuError(f"NVML is unavailable on this host: {self.reason}", log_message=self.reason)
