"""The admin page at ``/ui``: static files shipped in the package, public like /healthz (its
API calls carry the token), under a Content-Security-Policy that allows no inline script."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI_DIR = Path(__file__).parents[1] / "ui"
PREFIX = "/ui"
ASSETS = frozenset({"app.js", "style.css", "favicon.svg"})
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

routes = web.RouteTableDef()


@routes.get(PREFIX)
async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(UI_DIR / "index.html", headers=HEADERS)


@routes.get(PREFIX + "/{name}")
async def asset(request: web.Request) -> web.FileResponse:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(UI_DIR / name, headers=HEADERS)
