"""The coordinator's page: the cluster as a picture, live figures and a chat.

GET / serves web/index.html and GET /dashboard/<file> its scripts and style,
all from the package (no build step, nothing from another host: the Macs may
be offline). The page polls GET /health, the JSON `kimi status --json` is made
from, and chats through POST /v1/chat/completions like any other client.
`[api] dashboard = false` turns it off.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

WEB_DIR = Path(__file__).resolve().parent / "web"  # package data: installed beside this module
ASSETS_URL = "/dashboard/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only the coordinator's own scripts, style and endpoints: no inline script,
# nothing fetched from another origin.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _content_type(name: str) -> str:
    return next((t for ext, t in CONTENT_TYPES.items() if name.endswith(ext)), "application/octet-stream")


def add_routes(app: web.Application, enabled: bool) -> None:
    """GET / and the page's assets on `app`; when not `enabled`, GET / says
    how to turn the page on instead."""
    if not enabled:

        async def off(request: web.Request) -> web.Response:
            msg = "the dashboard is off: [api] dashboard = false in the cluster config"
            err = {"error": {"message": msg, "type": "invalid_request_error", "param": None, "code": "not_found"}}
            return web.json_response(err, status=404)

        app.router.add_get("/", off)
        return

    files = {f.name: f.read_bytes() for f in WEB_DIR.iterdir() if f.is_file()}  # read once, at start

    def respond(name: str) -> web.Response:
        return web.Response(body=files[name], headers={"Content-Type": _content_type(name), **SECURITY_HEADERS})

    async def page(request: web.Request) -> web.Response:
        return respond("index.html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound()
        return respond(name)

    app.router.add_get("/", page)
    app.router.add_get(ASSETS_URL + "{name}", asset)
