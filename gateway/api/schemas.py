"""Strict parsing of request bodies into validated models; unknown fields are rejected."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from multidict import MultiMapping

from gateway.config import Config
from gateway.core.validation import (
    session_limits,
    ttl_seconds_from,
    validate_image,
    validate_user_id,
)
from gateway.errors import InvalidRequest
from gateway.models import CreateRequest
from gateway.ssh.credentials import parse_public_keys

AUDIT_PAGE_DEFAULT = 100
AUDIT_PAGE_MAX = 1000
CURSOR_MAX = 2**63 - 1  # an SQLite integer

_Kind = type | tuple[type, ...]

_CREATE_FIELDS: dict[str, _Kind] = {
    "user_id": str,
    "ttl_minutes": int,
    "ttl_seconds": int,
    "mig_profile": str,
    "mig_instance_uuid": str,
    "image": str,
    "ssh_public_keys": list,
    "cpu_limit": (int, float),
    "memory_limit": (int, str),
    "idle_reclaim": bool,
    "wait": bool,
}


_KIND_NAMES: dict[_Kind, str] = {
    int: "an integer",
    str: "a string",
    list: "a list",
    (int, float): "a number",
    (int, str): "an integer or a string",
    bool: "true or false",
}


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Decode ``body`` as a JSON object.

    Raises:
        InvalidRequest: not UTF-8 JSON, or not an object.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _typed(data: dict[str, Any], fields: dict[str, _Kind]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, kind in fields.items():
        value = data.get(name)
        if value is None:
            values[name] = None
            continue
        # bool is an int in Python, never in our API
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise InvalidRequest(f"field {name!r} must be {_KIND_NAMES[kind]}")
        values[name] = value
    return values


def parse_create(body: bytes, config: Config) -> CreateRequest:
    """Parse and validate a POST /sessions body.

    Raises:
        InvalidRequest, InvalidUserId, InvalidTtl, ImageNotAllowed, InvalidPublicKey, InvalidLimit.
    """
    values = _typed(parse_json_object(body), _CREATE_FIELDS)
    if values["user_id"] is None:
        raise InvalidRequest("field 'user_id' is required")
    if values["mig_profile"] is not None and values["mig_instance_uuid"] is not None:
        raise InvalidRequest("give mig_profile or mig_instance_uuid, not both")
    keys = values["ssh_public_keys"]
    cpu_limit, memory_limit = session_limits(
        values["cpu_limit"],
        values["memory_limit"],
        policy=config.limits,
        host_cpus=os.cpu_count() or 1,
    )
    return CreateRequest(
        user_id=validate_user_id(values["user_id"]),
        ttl_seconds=ttl_seconds_from(
            values["ttl_minutes"],
            values["ttl_seconds"],
            default_minutes=config.default_ttl_minutes,
            max_minutes=config.max_ttl_minutes,
        ),
        image=validate_image(values["image"], default=config.image, allowed=config.allowed_images),
        mig_profile=values["mig_profile"],
        mig_instance_uuid=values["mig_instance_uuid"],
        public_keys=() if keys is None else parse_public_keys(keys),
        cpu_limit=cpu_limit,
        memory_limit=memory_limit,
        idle_reclaim=values["idle_reclaim"] is not False,
        wait=bool(values["wait"]),
    )


MAX_GPU_HOURS = 10_000.0  # a week has 168 hours; this is many GPUs' worth


def parse_limits(body: bytes) -> float | None:
    """Parse a PUT /users/{user_id}/limits body: ``{"gpu_hours_per_week": H}``, ``H`` a
    number from 0 (no GPU time) or null (the gateway's default).

    Raises:
        InvalidRequest: malformed, unknown fields, the field missing or out of range.
    """
    data = parse_json_object(body)
    if "gpu_hours_per_week" not in data:
        raise InvalidRequest("field 'gpu_hours_per_week' is required (a number, or null)")
    hours = _typed(data, {"gpu_hours_per_week": (int, float)})["gpu_hours_per_week"]
    if hours is not None and not 0 <= hours <= MAX_GPU_HOURS:
        raise InvalidRequest(f"gpu_hours_per_week must be between 0 and {MAX_GPU_HOURS:g}")
    return None if hours is None else float(hours)


_PATCH_FIELDS: dict[str, _Kind] = {
    "ttl_minutes": int,
    "ttl_seconds": int,
    "extend_minutes": int,
    "extend_seconds": int,
    "idle_hold_minutes": int,
}


@dataclass(frozen=True, slots=True)
class TtlChange:
    new_total_seconds: int | None
    extend_seconds: int | None
    idle_hold_minutes: int | None = None  # set: the change is a hold, not a TTL change


def parse_patch(body: bytes) -> TtlChange:
    """Parse a PATCH /sessions/{id} body: exactly one of ``ttl_minutes`` (new total from
    creation), ``extend_minutes``, their ``*_seconds`` forms, or ``idle_hold_minutes``
    (hold the session from idle reclaim; 0 releases).

    Raises:
        InvalidRequest: malformed, unknown fields, or not exactly one field.
    """
    values = {
        k: v for k, v in _typed(parse_json_object(body), _PATCH_FIELDS).items() if v is not None
    }
    if len(values) != 1:
        raise InvalidRequest(
            "give exactly one of ttl_minutes, ttl_seconds, extend_minutes, extend_seconds, "
            "idle_hold_minutes"
        )
    ((name, value),) = values.items()
    if name == "idle_hold_minutes":
        return TtlChange(new_total_seconds=None, extend_seconds=None, idle_hold_minutes=value)
    seconds = value * 60 if name.endswith("minutes") else value
    if name.startswith("ttl"):
        return TtlChange(new_total_seconds=seconds, extend_seconds=None)
    return TtlChange(new_total_seconds=None, extend_seconds=seconds)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    user_id: str | None
    session_id: str | None
    since: datetime | None
    until: datetime | None
    limit: int
    before_id: int | None


#: RFC 3339 ``date-time`` (Python's ``fromisoformat`` alone also takes week dates, dates
#: without a time, basic format and non-ASCII digits).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DIGITS = re.compile(r"[0-9]{1,19}")


def _timestamp(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    problem = f"{name} must be an RFC 3339 timestamp, e.g. 2026-11-30T10:00:00Z"
    if not _RFC3339.fullmatch(value):
        raise InvalidRequest(problem)
    try:
        return datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:  # e.g. month 13, second 60
        raise InvalidRequest(problem) from None


def _integer(name: str, value: str) -> int:
    if not _DIGITS.fullmatch(value):
        raise InvalidRequest(f"{name} must be an integer")
    return int(value)


def parse_audit_query(query: MultiMapping[str]) -> AuditQuery:
    """Parse ``GET /audit`` parameters.

    Raises:
        InvalidRequest: unknown or repeated parameter, bad timestamp, limit or cursor.
    """
    unknown = sorted(set(query) - {"user_id", "session_id", "since", "until", "limit", "cursor"})
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}")
    repeated = sorted(name for name in set(query) if len(query.getall(name)) > 1)
    if repeated:  # each takes one value: which one was meant is not for us to guess
        raise InvalidRequest(f"parameter(s) given more than once: {', '.join(repeated)}")
    limit = _integer("limit", query["limit"]) if "limit" in query else AUDIT_PAGE_DEFAULT
    cursor = _integer("cursor", query["cursor"]) if "cursor" in query else None
    if not 1 <= limit <= AUDIT_PAGE_MAX:
        raise InvalidRequest(f"limit must be between 1 and {AUDIT_PAGE_MAX}")
    if cursor is not None and not 1 <= cursor <= CURSOR_MAX:
        raise InvalidRequest("cursor must be a next_cursor this API returned")
    return AuditQuery(
        user_id=query.get("user_id"),
        session_id=query.get("session_id"),
        since=_timestamp("since", query.get("since")),
        until=_timestamp("until", query.get("until")),
        limit=limit,
        before_id=cursor,
    )
