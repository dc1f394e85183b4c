"""GPU backends behind one interface (:class:`~gateway.gpu.base.GpuBackend`).

``--gpus`` picks one: ``nvml`` (real GPUs), ``none`` (no GPUs), ``sim:<topology.json>``
(a simulated host, :mod:`gateway.gpu.sim`), or ``auto``: NVML, or ``none`` with a log line
saying so when ``libnvidia-ml.so.1`` does not load. Any other NVML start-up failure (a
driver/library version mismatch after an upgrade, say) gives the
:class:`~gateway.gpu.failed.FailedBackend`: never a silently GPU-less service on a GPU host,
but the sessions already running keep their relays (``/healthz`` answers 503 with the
reason, and GPU work waits for a restart with a working NVML).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from gateway.core.gpu_types import MigDevice
from gateway.errors import GpuError, NoGpuAvailable
from gateway.gpu.base import GpuBackend

log = logging.getLogger(__name__)

__all__ = ["create_on_first", "open_backend"]


async def open_backend(spec: str, *, state_dir: Path, nv: ModuleType | None = None) -> GpuBackend:
    """Open the backend ``spec`` names; ``nv`` replaces ``pynvml`` (tests).

    A simulator keeps its instances in ``state_dir/gpu-sim-<topology stem>.json``; NVML
    keeps the ids of the MIG instances it creates in ``state_dir/nvml-instances.json``.

    Raises:
        ValueError: ``spec`` is not ``auto``, ``nvml``, ``none`` or ``sim:<path>``, or
            the topology is invalid.
        NvmlLibraryMissing: ``nvml`` on a host without ``libnvidia-ml.so.1``.
    """
    # Imported here: the backends import gateway.core, which imports this package's base.
    from gateway.gpu.failed import FailedBackend
    from gateway.gpu.ledger import read_boot_id
    from gateway.gpu.none import NoneBackend
    from gateway.gpu.nvml import NvmlBackend, NvmlLibraryMissing
    from gateway.gpu.sim import SimBackend

    if spec == "none":
        return NoneBackend()
    if spec.startswith("sim:"):
        topology = Path(spec.removeprefix("sim:"))
        return SimBackend(topology, state_dir / f"gpu-sim-{topology.stem}.json")
    ledger = state_dir / "nvml-instances.json"
    boot_id = read_boot_id()
    if spec not in ("nvml", "auto"):
        raise ValueError(f"--gpus {spec!r}: expected auto, nvml, none or sim:<topology.json>")
    try:
        return await NvmlBackend.open(nv, ledger_path=ledger, boot_id=boot_id)
    except NvmlLibraryMissing as exc:
        if spec == "nvml":
            raise
        log.warning("no NVML (%s): running without GPUs (--gpus none)", exc.log_message)
        return NoneBackend()
    except GpuError as exc:
        log.error("GPUs unavailable until a restart finds NVML working: %s", exc.log_message)
        return FailedBackend(exc)


async def create_on_first(backend: GpuBackend, targets: Sequence[tuple[str, str]]) -> MigDevice:
    """Create an instance on the first (GPU UUID, profile) target, in order, with room.

    Raises:
        NoGpuAvailable: every GPU is full for its profile.
        UnknownMigProfile, GpuError: as :meth:`GpuBackend.create_instance`.
    """
    for gpu_uuid, profile in targets:
        try:
            return await backend.create_instance(gpu_uuid, profile)
        except NoGpuAvailable:
            continue
    profiles = ", ".join(sorted({profile for _, profile in targets}))
    raise NoGpuAvailable(f"no GPU has room for another {profiles} instance")
