"""The REST API (aiohttp): app factory, routes, request schemas and middlewares."""

from gateway.api.app import create_app

__all__ = ["create_app"]
