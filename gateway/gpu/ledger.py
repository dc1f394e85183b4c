"""The MIG instances this gateway created (or is creating) and has not destroyed yet.

A MIG device's UUID vanishes with its compute instance, so a destroy that stopped half
way (the GPU instance ``IN_USE``) could not find its GPU instance again by UUID. The
ledger keeps, per created instance, its GPU UUID, GPU and compute instance ids, the GPU
instance's profile id and placement start, and the boot it was made in, so destroy goes
by id, and at start-up the gateway can reclaim what it made but no session holds (a
crash before the session row was written, a failed rollback).

Ids alone say nothing about who holds an instance now: GPU instance ids come from a pool
and are reused, and MIG instances vanish at a reboot, driver reload or GPU reset while
this file stays. So the NVML backend destroys an entry only when the instance found by
its ids is still the one it made (:mod:`gateway.gpu.nvml`), entries from another boot
are dropped when the ledger is loaded, and recording an instance evicts older entries
for the same (GPU, GPU instance id). Before creating, an *intent* is written (GPU,
profile id, placement start, no ids yet), so a crash between creating and recording
leaves something to reclaim. An entry whose destroy a host process refused is marked
``to_destroy``: its session has ended, and the instance is retried at every sweep.

The ledger is a small JSON file (written atomically, synchronously: its callers run in
the NVML worker thread) or, without a path, memory only. Version 1 files (ids only) are
read; their entries are destroyed only where the MIG UUID still matches.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.errors import GpuError

log = logging.getLogger(__name__)

_VERSION = 2
_READABLE = (1, 2)
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True, slots=True)
class Created:
    """One MIG instance this gateway created, or an intent to create one.

    An intent has no ``mig_uuid``, ``gi_id`` or ``ci_id`` yet. ``profile_id`` and
    ``start`` are None only for entries read from a version 1 file; ``boot_id`` is None
    there and where the boot is unknown.
    """

    mig_uuid: str | None
    gpu_uuid: str
    gi_id: int | None
    ci_id: int | None
    profile_id: int | None = None
    start: int | None = None
    boot_id: str | None = None
    to_destroy: bool = False  # released, but a host process held it: retried, never given

    @property
    def key(self) -> str:
        if self.mig_uuid is not None:
            return self.mig_uuid
        return f"intent:{self.gpu_uuid}:{self.profile_id}:{self.start}"

    @property
    def intent(self) -> bool:
        return self.mig_uuid is None


def read_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    """This boot's id (Linux), or None where the kernel doesn't say."""
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Ledger:
    """Entry key (MIG UUID, or the intent's GPU/profile/start) → :class:`Created`,
    persisted to ``path`` after every change."""

    def __init__(self, path: Path | None = None, *, boot_id: str | None = None) -> None:
        """Load the ledger at ``path`` (a missing file is an empty ledger), dropping
        entries from another boot than ``boot_id`` (their instances are gone).

        Raises:
            GpuError: the file is unreadable or not a ledger.
        """
        self._path = path
        self.boot_id = boot_id
        self._entries: dict[str, Created] = {}
        if path is None or not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") not in _READABLE:
                raise ValueError(f"version {doc.get('version')!r}, expected {_VERSION}")
            entries = [Created(**item) for item in doc["instances"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GpuError(
                "the gateway's record of the MIG instances it created is unreadable",
                log_message=f"{path}: not a MIG instance ledger ({exc}); move it aside to "
                "start without it (instances it lists are then no longer reclaimed)",
            ) from exc
        stale = [e for e in entries if e.boot_id is not None and e.boot_id != boot_id]
        for entry in stale:
            log.info(
                "forgetting MIG instance %s (GPU %s): made before a reboot, it is gone",
                entry.mig_uuid or "being created", entry.gpu_uuid,
            )  # fmt: skip
        self._entries = {e.key: e for e in entries if e not in stale}
        if stale:
            self._save(undo=lambda: None)

    def __iter__(self) -> Iterator[Created]:
        """The entries, as a copy (callers may remove while iterating)."""
        return iter(list(self._entries.values()))

    def get(self, mig_uuid: str) -> Created | None:
        return self._entries.get(mig_uuid)

    def to_destroy(self) -> list[Created]:
        """Released instances a host process kept from being destroyed."""
        return [e for e in self._entries.values() if e.to_destroy]

    def add(self, entry: Created, *, replacing: Created | None = None) -> None:
        """Record an instance (or an intent), in place of ``replacing`` (its intent).

        Older entries for the same GPU and GPU instance id are evicted: that id now
        names this instance, so whatever they recorded is gone.

        Raises:
            GpuError: the file can't be written (nothing changes).
        """
        before = dict(self._entries)
        if replacing is not None:
            self._entries.pop(replacing.key, None)
        if entry.gi_id is not None:
            for old in list(self._entries.values()):
                if (old.gpu_uuid, old.gi_id) == (entry.gpu_uuid, entry.gi_id):
                    log.info("forgetting MIG instance %s: its GPU instance id was reused", old.key)
                    del self._entries[old.key]
        self._entries[entry.key] = entry
        self._save(undo=lambda: self._restore(before))

    def mark_to_destroy(self, entry: Created) -> None:
        """Keep ``entry`` as released but not yet destroyed.

        Raises:
            GpuError: the file can't be written (nothing changes).
        """
        if entry.to_destroy or entry.key not in self._entries:
            return
        self._entries[entry.key] = dataclasses.replace(entry, to_destroy=True)
        self._save(undo=lambda: self._entries.update({entry.key: entry}))

    def remove(self, key: str) -> None:
        """Forget an entry (destroyed, gone, or not ours any more); unknown is fine.

        Raises:
            GpuError: the file can't be written (the entry is kept).
        """
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._save(undo=lambda: self._entries.update({key: entry}))

    def _restore(self, entries: dict[str, Created]) -> None:
        self._entries = entries

    def _save(self, undo: Callable[[], object]) -> None:
        if self._path is None:
            return
        doc = {"version": _VERSION, "instances": [asdict(e) for e in self._entries.values()]}
        tmp = self._path.with_name(self._path.name + ".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(doc, indent=2))
            tmp.replace(self._path)
        except OSError as exc:
            undo()
            raise GpuError(
                "the gateway could not record its MIG instances", log_message=f"{self._path}: {exc}"
            ) from exc
