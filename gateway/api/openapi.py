"""The OpenAPI 3 description of every route, served at ``GET /openapi.json`` (public).

Kept true by tests: every aiohttp route is described here and every path here is a route
(``tests/unit/test_openapi.py``), and Schemathesis checks live answers against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

routes = web.RouteTableDef()

_NULLABLE_STR = {"type": ["string", "null"]}
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_NUM = {"type": ["number", "null"]}
_TIMESTAMP = {"type": "string", "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _text(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


def _list_of(key: str, item: str, description: str, **more: Any) -> dict[str, Any]:
    """A JSON answer holding an array of ``item`` under ``key``, and ``more`` fields."""
    return _json(_object({key: {"type": "array", "items": _ref(item)}, **more}), description)


_COUNT = {"count": {"type": "integer"}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _object(properties: dict[str, Any], *, required: tuple[str, ...] | None = None) -> dict:
    """An object schema; every property is required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
    }


_SESSION_ACCESS = {
    "ssh_host_key_fingerprint": {"type": "string"},
    "ssh_known_hosts": {"type": "string"},
    "ssh_command": {"type": "string"},
}

_LIMITS = {
    "cpu_limit": {**_NULLABLE_NUM, "description": "CPUs (Docker NanoCpus); null: unlimited"},
    "memory_limit": {**_NULLABLE_INT, "description": "bytes; null: unlimited"},
}

SCHEMAS: dict[str, Any] = {
    "Error": _object(
        {
            "error": {"type": "string", "description": "for a person"},
            "code": {"type": "string", "description": "stable, for programs"},
        }
    ),
    "Health": _object(
        {
            "status": {"enum": ["healthy", "degraded"]},
            "service": {"type": "string"},
            "failing": {"type": "object", "additionalProperties": {"type": "string"}},
            "unhealthy_gpus": {"type": "array", "items": {"type": "object"}},
            "gpu_path": {
                "type": "object",
                "description": "with GPUs: whether Docker hands them over through CDI, and "
                "whether MIG instances made after its CDI spec can start",
            },
        },
        required=("status", "service"),
    ),
    "CreateSession": {
        "type": "object",
        "additionalProperties": False,
        "required": ["user_id"],
        "properties": {
            "user_id": {
                "type": "string",
                "pattern": "^[a-z_][a-z0-9_-]{0,31}$",
                "description": "a Linux user name, not a reserved system name",
            },
            "ttl_minutes": {"type": ["integer", "null"], "minimum": 1},
            "ttl_seconds": {"type": ["integer", "null"], "minimum": 1},
            "mig_profile": _NULLABLE_STR,
            "mig_instance_uuid": _NULLABLE_STR,
            "image": _NULLABLE_STR,
            "ssh_public_keys": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": 16,
            },
            "cpu_limit": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "CPUs, at most the gateway's --max-cpu-limit",
            },
            "memory_limit": {
                "type": ["integer", "string", "null"],
                "description": "bytes, or a size like 512m or 4g; at most --max-memory-limit",
            },
            "idle_reclaim": {
                "type": ["boolean", "null"],
                "description": "false: exempt from idle reclaim (default true)",
            },
            "wait": {
                "type": ["boolean", "null"],
                "description": "when nothing fits, queue (202) instead of 503",
            },
        },
    },
    "Queued": _object(
        {
            "id": {"type": "string", "description": "the session's id once it starts"},
            "user_id": {"type": "string"},
            "state": {"enum": ["queued"]},
            "queue_position": {"type": "integer", "minimum": 1, "description": "1: next"},
            "submitted_at": _TIMESTAMP,
            "queue_expires_at": _TIMESTAMP,
            "ttl_minutes": {"type": "number"},
            "ttl_seconds": {"type": "integer"},
            "mig_profile": _NULLABLE_STR,
            "mig_instance_uuid": _NULLABLE_STR,
            "ssh_port": {"type": "null"},
            "gpu_uuid": {"type": "null"},
            "ssh_user": {"type": "string"},
            "ssh_host": {"type": "string"},
            "ssh_host_key_fingerprint": {"type": "string"},
            "ssh_known_hosts": {"type": "string"},
        }
    ),
    "Usage": _object(
        {
            "user_id": {"type": "string"},
            "gpu_hours_used": {"type": "number"},
            "gpu_hours_budget": {**_NULLABLE_NUM, "description": "null: unlimited"},
            "budget_source": {"enum": ["user", "default"]},
            "window_start": _TIMESTAMP,
            "window_end": _TIMESTAMP,
            "next_available_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when a spent budget has a minute of a 1g slice; null: not spent",
            },
        }
    ),
    "PatchSession": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "maxProperties": 1,
        "properties": {
            **{
                name: {"type": "integer"}
                for name in ("ttl_minutes", "ttl_seconds", "extend_minutes", "extend_seconds")
            },
            "idle_hold_minutes": {
                "type": "integer",
                "minimum": 0,
                "description": "hold from idle reclaim this long (0 releases; at most "
                "--idle-hold-max, else 400 invalid_idle_hold); the expiry does not move",
            },
        },
    },
    "CreatedSession": _object(
        {
            "session_id": {"type": "string"},
            "container_id": _NULLABLE_STR,
            "ssh_user": {"type": "string"},
            "ssh_host": {"type": "string"},
            "ssh_port": {"type": "integer"},
            "ssh_private_key": _NULLABLE_STR,
            "ssh_password": _NULLABLE_STR,
            "gpu_uuid": _NULLABLE_STR,
            "mig_profile": _NULLABLE_STR,
            "created_at": _TIMESTAMP,
            "expires_at": _TIMESTAMP,
            "ttl_seconds": {"type": "integer"},
            "ttl_capped": {
                "type": "boolean",
                "description": "the TTL was cut to the user's GPU-hour budget",
            },
            "ttl_capped_by": {"enum": ["gpu_hours_per_week", None]},
            **_LIMITS,
            **_SESSION_ACCESS,
        }
    ),
    "Session": _object(
        {
            "id": {"type": "string"},
            "user_id": {"type": "string"},
            "container_id": _NULLABLE_STR,
            "container_ip": _NULLABLE_STR,
            "ssh_port": {"type": "integer"},
            "gpu_uuid": _NULLABLE_STR,
            "mig_profile": _NULLABLE_STR,
            "ttl_minutes": {"type": "number"},
            "ttl_seconds": {"type": "integer"},
            "state": {"enum": ["starting", "running", "ending"]},
            "created_at": _TIMESTAMP,
            "expires_at": _TIMESTAMP,
            "active_connections": {"type": "integer", "minimum": 0},
            "idle": {
                "oneOf": [{"type": "null"}, _ref("Idle")],
                "description": "idle reclaim's view; null while --idle-reclaim is off",
            },
            "node": {
                **_NULLABLE_STR,
                "description": "--runtime swarm: the host name of the node its task runs on; "
                "null with plain Docker (this host) or while not known",
            },
            "metadata": _object(
                {
                    "image": {"type": "string"},
                    "workspace": {"type": "string"},
                    "ssh_port": {"type": "string"},
                }
            ),
            **_LIMITS,
            **_SESSION_ACCESS,
        }
    ),
    "Idle": _object(
        {
            "connections": {"type": "integer", "minimum": 0},
            "no_connection_since": {"type": ["string", "null"], "format": "date-time"},
            "last_connection_at": {"type": ["string", "null"], "format": "date-time"},
            "compute": {"enum": ["gpu", "cpu"]},
            "utilization": {**_NULLABLE_NUM, "description": "percent; null when unknown"},
            "compute_idle_since": {"type": ["string", "null"], "format": "date-time"},
            "hold_until": {"type": ["string", "null"], "format": "date-time"},
            "reclaim_at": {
                "type": ["string", "null"],
                "format": "date-time",
                "description": "when it is ended as idle if nothing changes; null while kept",
            },
            "kept_because": {
                "type": "array",
                "items": {"enum": ["connection", "compute_busy", "hold", "exempt"]},
            },
        }
    ),
    "Connection": _object(
        {
            "id": {"type": "string"},
            "session_id": {"type": "string"},
            "user_id": {"type": "string"},
            "client_addr": {"type": "string"},
            "client_port": {"type": "integer"},
            "started_at": _TIMESTAMP,
            "ended_at": {"type": ["string", "null"], "format": "date-time"},
            "duration_seconds": _NULLABLE_NUM,
            "bytes_client_to_container": {"type": "integer"},
            "bytes_container_to_client": {"type": "integer"},
            "client_banner": _NULLABLE_STR,
            "server_banner": _NULLABLE_STR,
            "closed_by": {"enum": ["client", "server", "gateway", None]},
            "reason": _NULLABLE_STR,
        }
    ),
    "AuditEvent": _object(
        {
            "id": {"type": "integer"},
            "at": _TIMESTAMP,
            "event": {"type": "string"},
            "session_id": _NULLABLE_STR,
            "user_id": _NULLABLE_STR,
            "connection_id": _NULLABLE_STR,
        }
    ),
    "Gpu": _object(
        {
            "uuid": _NULLABLE_STR,
            "index": {"type": "integer"},
            "name": _NULLABLE_STR,
            "memory_total": _NULLABLE_INT,
            "memory_free": _NULLABLE_INT,
            "memory_used": _NULLABLE_INT,
            "utilization": _NULLABLE_INT,
            "temperature": _NULLABLE_INT,
            "power_usage": _NULLABLE_NUM,
            "power_limit": _NULLABLE_NUM,
            "mig_enabled": {"type": "boolean"},
            "mig_pending": {"type": "boolean"},
            "mig_change": _NULLABLE_STR,
            "allocated": {"type": "boolean"},
            "healthy": {"type": "boolean"},
            "error": _NULLABLE_STR,
            "mig_instances": {
                "type": "array",
                "items": _object(
                    {
                        "uuid": {"type": "string"},
                        "profile": {"type": "string"},
                        "memory": {"type": "integer"},
                        "memory_used": _NULLABLE_INT,
                        "gpu_instance_id": {"type": "integer"},
                        "compute_instance_id": {"type": "integer"},
                        "split": {"type": "boolean"},
                        "allocated": {"type": "boolean"},
                        "to_destroy": {"type": "boolean"},
                    }
                ),
            },
            "to_destroy": {
                "type": "array",
                "items": _object({"uuid": {"type": "string"}, "gpu_instance_id": _NULLABLE_INT}),
            },
        }
    ),
    "Profile": _object(
        {
            "name": {"type": "string"},
            "compute_slices": {"type": "integer"},
            "memory_slices": {"type": "integer"},
            "memory_size": {"type": "integer"},
            "max_instances": {"type": "integer"},
            "gpu_name": {"type": "string"},
            "description": {"type": "string"},
        }
    ),
    "Node": _object(
        {
            "id": {"type": "string"},
            "hostname": {"type": "string"},
            "role": {"enum": ["manager", "worker", "standalone"]},
            "state": {"type": "string", "description": "ready, down, unknown, disconnected"},
            "availability": {"type": "string", "description": "active, pause, drain"},
            "address": _NULLABLE_STR,
            "cpus": {"type": "number"},
            "memory": {"type": "integer"},
            "engine_version": {"type": "string"},
            "gateway": {"type": "boolean", "description": "the node this gateway runs on"},
            "resources": {
                "type": "array",
                "description": "generic resources (GPU slices): a named resource's value "
                "(e.g. a MIG UUID) or a discrete resource's count",
                "items": _object({"kind": {"type": "string"}, "value": {"type": "string"}}),
            },
        }
    ),
    "Available": _object(
        {
            "uuid": {"type": "string"},
            "parent_gpu": {"type": "string"},
            "profile": {"type": "string"},
            "memory": {"type": "integer"},
            "compute_slices": _NULLABLE_INT,
            "memory_slices": _NULLABLE_INT,
        }
    ),
}

_SESSION_ID = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
_AUDIT_PARAMS = [
    {"name": "user_id", "in": "query", "schema": {"type": "string"}},
    {"name": "session_id", "in": "query", "schema": {"type": "string"}},
    {"name": "since", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "until", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
    {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
]


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A protected operation: 401 without the token, 500 never expected."""
    return {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {**responses, "401": _error("missing or wrong bearer token")},
        **extra,
    }


def _public(summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "security": [], "responses": responses}


_BAD = _error("invalid request")
_NOT_FOUND = _error("no such session")
_UNAVAILABLE = _error("Docker, the GPUs or the port pool cannot serve this now")
_VIEW = _json(_ref("Session"), "the session view")
_QUOTA = _error(
    "quota_exceeded: the GPU-hour budget is spent; the body adds gpu_hours_used,"
    " gpu_hours_budget and next_available_at"
)
_USER_ID = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string"}}
_USAGE = _json(_ref("Usage"), "GPU-hours of the last 7 days against the budget")

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": _public(
            "health of the gateway and its dependencies",
            {
                "200": _json(_ref("Health"), "healthy, or degraded with unhealthy GPUs"),
                "503": _json(_ref("Health"), "a dependency fails"),
            },
        )
    },
    "/ssh/known_hosts": {
        "get": _public("the host CA line for ~/.ssh/known_hosts", {"200": _text("one line")})
    },
    "/openapi.json": {
        "get": _public("this description", {"200": _json({"type": "object"}, "OpenAPI 3.1")})
    },
    "/ui": {"get": _public("the admin page", {"200": {"description": "HTML"}})},
    "/ui/{name}": {
        "get": {
            **_public(
                "the admin page's script, style and icon",
                {"200": {"description": "a file"}, "404": _error("no such file")},
            ),
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        }
    },
    "/sessions": {
        "post": _op(
            "create a session; the only answer with the private key and password",
            {
                "201": _json(_ref("CreatedSession"), "created; ssh works now"),
                "202": _json(
                    {
                        "allOf": [
                            _ref("Queued"),
                            _object(
                                {
                                    "session_id": {"type": "string"},
                                    "ssh_private_key": _NULLABLE_STR,
                                    "ssh_password": _NULLABLE_STR,
                                }
                            ),
                        ]
                    },
                    "queued (wait: true and nothing fits); the credentials work once it starts",
                ),
                "400": _BAD,
                "403": _QUOTA,
                "404": _error("no such MIG instance"),
                "409": _error(
                    "the user has a live session or too many queued, or the instance is taken"
                ),
                "408": _error("the body did not arrive within --http-timeout"),
                "413": _error("body too large"),
                "502": _error("the container did not start"),
                "503": _UNAVAILABLE,
            },
            requestBody={
                "required": True,
                "content": {"application/json": {"schema": _ref("CreateSession")}},
            },
        ),
        "get": _op(
            "every session",
            {"200": _json({"type": "array", "items": _ref("Session")}, "session views")},
        ),
        "delete": _op(
            "end every session and withdraw every queued request",
            {
                "200": _json(
                    _object(
                        {
                            "message": {"type": "string"},
                            "deleted": {"type": "integer"},
                            "withdrawn": {"type": "integer"},
                        }
                    ),
                    "how many ended",
                ),
                "503": _UNAVAILABLE,
            },
        ),
    },
    "/sessions/{session_id}": {
        "parameters": [_SESSION_ID],
        "get": _op(
            "one session, or a queued request",
            {
                "200": _json(
                    {"oneOf": [_ref("Session"), _ref("Queued")]}, "the session or queued view"
                ),
                "404": _NOT_FOUND,
            },
        ),
        "patch": _op(
            "change the TTL, or hold the session from idle reclaim",
            {
                "200": _VIEW,
                "400": _BAD,
                "403": _QUOTA,
                "404": _NOT_FOUND,
                "409": _error("the session is ending"),
                "408": _error("the body did not arrive within --http-timeout"),
                "413": _error("body too large"),
            },
            requestBody={
                "required": True,
                "content": {"application/json": {"schema": _ref("PatchSession")}},
            },
        ),
        "delete": _op(
            "end the session now, or withdraw a queued request",
            {
                "200": _json(_object({"message": {"type": "string"}}), "ended"),
                "404": _NOT_FOUND,
                "503": _UNAVAILABLE,
            },
        ),
    },
    "/sessions/{session_id}/connections": {
        "parameters": [_SESSION_ID],
        "get": _op(
            "live and ended connections",
            {
                "200": _list_of("connections", "Connection", "connection records", **_COUNT),
                "404": _NOT_FOUND,
            },
        ),
    },
    "/audit": {
        "get": _op(
            "audit events, newest first",
            {
                "200": _list_of(
                    "events", "AuditEvent", "a page of events", next_cursor=_NULLABLE_STR
                ),
                "400": _BAD,
            },
            parameters=_AUDIT_PARAMS,
        )
    },
    "/queue": {
        "get": _op(
            "the waiting list in the order it starts",
            {"200": _list_of("queue", "Queued", "queued requests", **_COUNT)},
        )
    },
    "/users/{user_id}/usage": {
        "parameters": [_USER_ID],
        "get": _op("a user's GPU-hours and budget", {"200": _USAGE, "400": _BAD}),
    },
    "/users/{user_id}/limits": {
        "parameters": [_USER_ID],
        "put": _op(
            "set a user's GPU-hours per week (null: the gateway's default)",
            {
                "200": _USAGE,
                "400": _BAD,
                "408": _error("the body did not arrive within --http-timeout"),
                "413": _error("body too large"),
            },
            requestBody={
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["gpu_hours_per_week"],
                            "properties": {
                                "gpu_hours_per_week": {
                                    "type": ["number", "null"],
                                    "minimum": 0,
                                    "maximum": 10000,
                                }
                            },
                        }
                    }
                },
            },
        ),
    },
    "/metrics": {"get": _op("Prometheus metrics", {"200": _text("Prometheus text format")})},
    "/gpus": {
        "get": _op(
            "GPUs and their MIG instances",
            {
                "200": _list_of("gpus", "Gpu", "GPUs", **_COUNT),
                "503": _UNAVAILABLE,
            },
        )
    },
    "/gpus/profiles": {
        "get": _op(
            "MIG profiles of these GPUs",
            {
                "200": _list_of("profiles", "Profile", "profiles"),
                "503": _UNAVAILABLE,
            },
        )
    },
    "/nodes": {
        "get": _op(
            "machines sessions can run on (--runtime swarm: the Swarm's nodes)",
            {
                "200": _list_of("nodes", "Node", "nodes", **_COUNT),
                "503": _UNAVAILABLE,
            },
        )
    },
    "/gpus/available": {
        "get": _op(
            "free MIG instances and whole GPUs",
            {
                "200": _list_of("available_instances", "Available", "free slices", **_COUNT),
                "503": _UNAVAILABLE,
            },
        )
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Sandman GPU SSH gateway",
        "version": "1",
        "description": "Every error is {error, code}. Timestamps are RFC 3339 UTC with Z.",
    },
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": PATHS,
}


@routes.get("/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """This API's OpenAPI 3 description (public: it holds no data)."""
    return web.json_response(SPEC)
