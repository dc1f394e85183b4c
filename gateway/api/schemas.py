"""Strict parsing of request bodies into validated models; unknown fields are rejected."""

from __future__ import annotations

import json
from typing import Any

from gateway.config import Config
from gateway.core.validation import ttl_seconds_from, validate_image, validate_user_id
from gateway.errors import InvalidRequest
from gateway.models import CreateRequest

_CREATE_FIELDS: dict[str, type] = {
    "user_id": str,
    "ttl_minutes": int,
    "ttl_seconds": int,
    "mig_profile": str,
    "mig_instance_uuid": str,
    "image": str,
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
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def _typed(data: dict[str, Any], fields: dict[str, type]) -> dict[str, Any]:
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
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise InvalidRequest(
                f"field {name!r} must be {'an integer' if kind is int else 'a string'}"
            )
        values[name] = value
    return values


def parse_create(body: bytes, config: Config) -> CreateRequest:
    """Parse and validate a POST /sessions body.

    Raises:
        InvalidRequest, InvalidUserId, InvalidTtl, ImageNotAllowed.
    """
    values = _typed(parse_json_object(body), _CREATE_FIELDS)
    if values["user_id"] is None:
        raise InvalidRequest("field 'user_id' is required")
    if values["mig_profile"] is not None and values["mig_instance_uuid"] is not None:
        raise InvalidRequest("give mig_profile or mig_instance_uuid, not both")
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
    )
