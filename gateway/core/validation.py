"""Validation of user-supplied values: user ids, TTLs, images.

Raises the typed API errors directly so the schema layer stays a thin parser.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from gateway.errors import ImageNotAllowed, InvalidTtl, InvalidUserId

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


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"`` or ``"1h"``.

    Raises:
        ValueError: anything else, or negative.
    """
    value = text.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:])
    number = value[:-1] if unit is not None else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90, 90s, 10m, 1h)") from None
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative: {text!r}")
    return seconds
