"""Middlewares: error rendering, CORS, and bearer-token authentication."""

from __future__ import annotations

import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.api.keys import API_TOKEN, CONFIG
from gateway.errors import BodyTooLarge, GatewayError, Unauthorized

log = logging.getLogger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/ssh/known_hosts", "/openapi.json", "/ui"})
PUBLIC_PREFIX = "/ui/"  # the admin page's static files; its API calls carry the token
CORS_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_MAX_AGE = str(24 * 3600)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def error_body(
    message: str, code: str, status: int, details: dict[str, object] | None = None
) -> web.Response:
    return web.json_response({"error": message, "code": code, **(details or {})}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as ``{"error", "code"}`` (plus the error's ``details``); never
    send a trace."""
    try:
        return await handler(request)
    except GatewayError as exc:
        level = logging.ERROR if exc.status >= 500 else logging.INFO
        log.log(
            level,
            "%s %s -> %d %s: %s",
            request.method,
            request.path,
            exc.status,
            exc.code,
            exc.log_message,
        )
        return error_body(exc.message, exc.code, exc.status, exc.details)
    except web.HTTPRequestEntityTooLarge:
        exc = BodyTooLarge("request body is too large")
        return error_body(exc.message, exc.code, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_body(exc.reason, _HTTP_CODES.get(exc.status, "http_error"), exc.status)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_body("internal error", "internal", 500)


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    allowed = request.app[CONFIG].cors_origins
    return origin if not allowed or origin in allowed else None


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """CORS with credentials: the allowed origin is echoed, never ``*``."""
    origin = _allowed_origin(request)
    preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
    if preflight:
        response: web.StreamResponse = web.Response(status=204)
        if origin is not None:
            response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "Authorization, Content-Type"
            )
            response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    else:
        response = await handler(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
    response.headers.add("Vary", "Origin")
    return response


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Require ``Authorization: Bearer <token>`` on every path but the public ones and the
    admin page's files."""
    if request.path not in PUBLIC_PATHS and not request.path.startswith(PUBLIC_PREFIX):
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = request.app[API_TOKEN]
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), expected.encode()
        ):
            raise Unauthorized("missing or wrong bearer token")
    return await handler(request)
