"""Whether a container sees exactly the GPU device it was given, from ``nvidia-smi -L`` (pure).

``nvidia-smi -L`` lists one line per GPU and, under it, one per MIG device::

    GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-5e2c9c3a-...)
      MIG 3g.40gb     Device  0: (UUID: MIG-c6d4f1ef-...)

A container given a MIG device sees that device and its parent GPU's line; one given a
whole GPU sees that GPU and no MIG device. Anything else means the pin was defeated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UUID = re.compile(r"\(UUID: ([^)\s]+)\)")


@dataclass(frozen=True, slots=True)
class Listing:
    """The devices an ``nvidia-smi -L`` output names, in order."""

    gpus: tuple[str, ...]
    mig_devices: tuple[str, ...]


def parse_listing(text: str) -> Listing:
    gpus: list[str] = []
    migs: list[str] = []
    for line in text.splitlines():
        match = _UUID.search(line)
        if match is None:
            continue
        kind = line.lstrip()
        if kind.startswith("MIG "):
            migs.append(match[1])
        elif kind.startswith("GPU "):
            gpus.append(match[1])
    return Listing(tuple(gpus), tuple(migs))


def pin_problem(allocated: str, text: str) -> str | None:
    """What is wrong with what the container sees, or None if it is exactly ``allocated``."""
    seen = parse_listing(text)
    if allocated.startswith("MIG-"):
        ok = seen.mig_devices == (allocated,) and len(seen.gpus) == 1
    else:
        ok = seen.gpus == (allocated,) and not seen.mig_devices
    if ok:
        return None
    devices = ", ".join(seen.gpus + seen.mig_devices) or "no GPU"
    return f"the container sees {devices} instead of only {allocated}"
