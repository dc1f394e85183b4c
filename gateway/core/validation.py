"""Validation of user-supplied values: user ids, TTLs, images, CPU and memory limits.

Raises the typed API errors directly so the schema layer stays a thin parser.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from gateway.errors import ImageNotAllowed, InvalidLimit, InvalidTtl, InvalidUserId

USER_ID_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

#: Names that exist in common base images or carry special meaning; never handed out.
RESERVED_USER_IDS = frozenset(
    {
        "root",
        "daemon",
        "bin",
        "sys",
        "sync",
        "games",
        "man",
        "lp",
        "mail",
        "news",
        "uucp",
        "proxy",
        "www-data",
        "backup",
        "list",
        "irc",
        "gnats",
        "nobody",
        "nogroup",
        "_apt",
        "sshd",
        "messagebus",
        "systemd-network",
        "systemd-resolve",
        "systemd-timesync",
        "systemd-journal",
        "syslog",
        "uuidd",
        "tcpdump",
        "tss",
        "polkitd",
        "adm",
        "wheel",
        "sudo",
        "staff",
        "users",
        "admin",
        "operator",
        "halt",
        "shutdown",
        "ftp",
        "postgres",
        "mysql",
        "docker",
        "ubuntu",
        "debian",
    }
)


def validate_user_id(user_id: str) -> str:
    """Return ``user_id`` if it is a safe Linux account name that is not reserved.

    Raises:
        InvalidUserId: not matching ``^[a-z_][a-z0-9_-]{0,31}$`` or reserved.
    """
    if not USER_ID_RE.fullmatch(user_id):
        raise InvalidUserId(
            "user_id must be a Linux user name: 1-32 characters, lowercase letters, digits, "
            "'_' or '-', starting with a letter or '_'"
        )
    if user_id in RESERVED_USER_IDS:
        raise InvalidUserId(f"user_id {user_id!r} is a reserved system account name")
    return user_id


def ttl_seconds_from(
    ttl_minutes: int | None, ttl_seconds: int | None, *, default_minutes: int, max_minutes: int
) -> int:
    """Resolve the requested TTL to seconds, within ``1 s .. max_minutes``.

    ``ttl_minutes`` must be 1..max_minutes; ``ttl_seconds`` 1..max_minutes*60. Giving both
    is an error; giving neither yields ``default_minutes``.

    Raises:
        InvalidTtl: both given, or out of range.
    """
    if ttl_minutes is not None and ttl_seconds is not None:
        raise InvalidTtl("give ttl_minutes or ttl_seconds, not both")
    if ttl_seconds is not None:
        if not 1 <= ttl_seconds <= max_minutes * 60:
            raise InvalidTtl(f"ttl_seconds must be between 1 and {max_minutes * 60}")
        return ttl_seconds
    minutes = default_minutes if ttl_minutes is None else ttl_minutes
    if not 1 <= minutes <= max_minutes:
        raise InvalidTtl(f"ttl_minutes must be between 1 and {max_minutes}")
    return minutes * 60


def validate_image(image: str | None, *, default: str, allowed: Collection[str]) -> str:
    """Return the image to run: ``default`` when none is asked, else one on the allow-list.

    Raises:
        ImageNotAllowed: ``image`` is not the default and not on ``allowed``.
    """
    if image is None or image == default:
        return default
    if image not in allowed:
        raise ImageNotAllowed(f"image {image!r} is not on this gateway's allow-list")
    return image


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"``, ``"1h"`` or ``"1d"``.

    Raises:
        ValueError: anything else, or negative.
    """
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 30m, 2h, 1d)") from None
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return seconds


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")

#: The smallest limits a session may have: below them sshd itself cannot run well.
MIN_CPUS = 0.01
MIN_MEMORY = 64 * 1024**2
MAX_MEMORY = 2**63 - 1  # Docker's (and SQLite's) int64: anything above is not a size


def parse_size(text: str) -> int:
    """Bytes in ``"1073741824"``, ``"512m"``, ``"4g"``, ``"4GiB"`` (powers of 1024).

    Raises:
        ValueError: anything else.
    """
    match = _SIZE_RE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"not a size: {text!r} (use e.g. 512m, 4g or a number of bytes)")
    number, unit = match.groups()
    size = float(number) * _SIZE_UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"not a size: {text!r} (too large)")
    return int(size)


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The operator's limits: what a session gets when it asks for none (None: unlimited,
    or the maximum where one is set), and the most it may ask for (None: no bound but the
    host's CPUs)."""

    default_cpus: float | None = None
    max_cpus: float | None = None
    default_memory: int | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        for name, default, most, least in (
            ("cpu", self.default_cpus, self.max_cpus, MIN_CPUS),
            ("memory", self.default_memory, self.max_memory, MIN_MEMORY),
        ):
            for value in (default, most):
                if value is not None and value < least:
                    raise ValueError(f"a {name} limit must be at least {least:g}")
            if default is not None and most is not None and default > most:
                raise ValueError(f"the default {name} limit is above the maximum")


def session_limits(
    cpus: float | None, memory: int | str | None, *, policy: LimitPolicy, host_cpus: int
) -> tuple[float | None, int | None]:
    """The CPU (in CPUs) and memory (bytes) limits of a new session; None is unlimited.

    A value not asked for is the policy's default, else its maximum. One asked for must
    be at least :data:`MIN_CPUS` / :data:`MIN_MEMORY` and at most the maximum (CPUs: and
    the host's count, which Docker enforces; memory: and :data:`MAX_MEMORY`).

    Raises:
        InvalidLimit: malformed, too small or above the maximum.
    """
    if cpus is None:
        cpus = policy.default_cpus if policy.default_cpus is not None else policy.max_cpus
    else:
        most = min(policy.max_cpus or host_cpus, host_cpus)
        if not MIN_CPUS <= cpus <= most:
            raise InvalidLimit(f"cpu_limit must be between {MIN_CPUS:g} and {most:g} CPUs")
    if memory is None:
        size = policy.default_memory if policy.default_memory is not None else policy.max_memory
        return cpus, size
    if isinstance(memory, str):
        try:
            memory = parse_size(memory)
        except ValueError as exc:
            raise InvalidLimit(f"memory_limit: {exc}") from None
    most = MAX_MEMORY if policy.max_memory is None else min(policy.max_memory, MAX_MEMORY)
    if not MIN_MEMORY <= memory <= most:
        raise InvalidLimit(f"memory_limit must be between {MIN_MEMORY} and {most} bytes")
    return cpus, memory
