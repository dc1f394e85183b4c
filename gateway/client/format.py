"""Plain-text output: aligned tables, local times, countdowns, and text from strangers made
harmless for a terminal."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def local_time(value: str | None) -> str:
    """An API timestamp in the local time zone, e.g. ``2026-11-30 19:00:00 KST``."""
    if not value:
        return "-"
    return parse_time(value).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def span(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m 05s``, ``3h 07m``, ``2d 04h``."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def expires_in(expires_at: str, now: datetime) -> str:
    left = (parse_time(expires_at) - now).total_seconds()
    return span(left) if left > 0 else "expired"


def size(count: int | None) -> str:
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def safe(value: object) -> str:
    """``value`` as one line a terminal shows literally: control characters (escape
    sequences, newlines) become visible ``\\xNN`` escapes."""
    if value is None:
        return "-"
    text = str(value)
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode() for char in text
    )


def table(out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print ``rows`` under ``headers``, columns aligned; every cell passes :func:`safe`."""
    cells = [[safe(cell) for cell in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def fields(out: TextIO, pairs: Sequence[tuple[str, object]]) -> None:
    """Print ``name: value`` lines, names aligned."""
    width = max(len(name) for name, _ in pairs)
    for name, value in pairs:
        out.write(f"{name + ':':<{width + 1}} {safe(value)}\n")


def dump(out: TextIO, data: Any) -> None:
    out.write(json.dumps(data, indent=2) + "\n")
