"""The MIG instances this gateway created and has not destroyed yet, by their NVML ids.

A MIG device's UUID vanishes with its compute instance, so a destroy that stopped half
way (the GPU instance ``IN_USE``) could not find its GPU instance again by UUID. The
ledger keeps, per created instance, its GPU UUID, GPU instance id and compute instance
id, so destroy goes by id, and at start-up the gateway can reclaim what it made but no
session holds (a crash before the session row was written, a failed rollback).

The ledger is a small JSON file (written atomically, synchronously: its callers run in
the NVML worker thread) or, without a path, memory only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from gateway.errors import GpuError

_VERSION = 1


@dataclass(frozen=True, slots=True)
class Created:
    """One MIG instance this gateway created."""

    mig_uuid: str
    gpu_uuid: str
    gi_id: int
    ci_id: int


class Ledger:
    """MIG UUID → :class:`Created`, persisted to ``path`` after every change."""

    def __init__(self, path: Path | None = None) -> None:
        """Load the ledger at ``path`` (a missing file is an empty ledger).

        Raises:
            GpuError: the file is unreadable or not a ledger.
        """
        self._path = path
        self._entries: dict[str, Created] = {}
        if path is None or not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            if doc.get("version") != _VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {_VERSION}")
            entries = [Created(**item) for item in doc["instances"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GpuError(
                "the gateway's record of the MIG instances it created is unreadable",
                log_message=f"{path}: not a MIG instance ledger ({exc}); move it aside to "
                "start without it (instances it lists are then no longer reclaimed)",
            ) from exc
        self._entries = {entry.mig_uuid: entry for entry in entries}

    def __iter__(self) -> Iterator[Created]:
        """The entries, as a copy (callers may remove while iterating)."""
        return iter(list(self._entries.values()))

    def get(self, mig_uuid: str) -> Created | None:
        return self._entries.get(mig_uuid)

    def add(self, entry: Created) -> None:
        """Record a new instance.

        Raises:
            GpuError: the file can't be written (the entry is not kept).
        """
        self._entries[entry.mig_uuid] = entry
        self._save(undo=lambda: self._entries.pop(entry.mig_uuid))

    def remove(self, mig_uuid: str) -> None:
        """Forget an instance (destroyed, or its GPU is gone); unknown is fine.

        Raises:
            GpuError: the file can't be written (the entry is kept).
        """
        entry = self._entries.pop(mig_uuid, None)
        if entry is not None:
            self._save(undo=lambda: self._entries.update({mig_uuid: entry}))

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
