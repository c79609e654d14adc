"""The console: a web page for the person who runs the HTPC, served by the relay API itself at `GET /`.

The page and its assets (`_console_assets/`: index.html, console.js, console.css, favicon.svg) are shipped in
the package and carry no data: everything the page shows it reads with `fetch()` from the same relay API
endpoints any client uses (`/relay/agents`, `/relay/query`, `/relay/changes`, the operator endpoints), sending
the token the person typed as `Authorization: Bearer` (kept in the tab's sessionStorage, never in a URL). So
the console opens no new way in: every action passes the endpoints' own checks. The page names its assets
and the endpoints by relative URLs, so it also works behind a reverse proxy that serves it under a path prefix.

Every console response carries a strict Content-Security-Policy (scripts and styles from these files only, no
inline script, connections to this origin only, no framing, Trusted Types required with no policy: no string
ever reaches an HTML or script sink), `X-Content-Type-Options: nosniff`,
`X-Frame-Options: DENY` and `Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

#: Where the assets are served from (the page itself is `/`).
ASSET_PREFIX = "/console/"

#: The assets: file name -> media type.
ASSETS = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """One shipped asset's bytes (read once)."""
    return resources.files("replicator").joinpath("_console_assets", name).read_bytes()


def _response(name: str, media_type: str) -> Response:
    return Response(asset(name), media_type=media_type, headers=SECURITY_HEADERS)


def install_console(app: FastAPI) -> None:
    """Serve the console at `/` and its assets under `/console/` (left out of the OpenAPI schema)."""

    @app.get("/", include_in_schema=False)
    async def console_page() -> Response:
        return _response("index.html", "text/html; charset=utf-8")

    for name, media_type in ASSETS.items():
        _add_asset(app, name, media_type)


def _add_asset(app: FastAPI, name: str, media_type: str) -> None:
    async def serve_asset() -> Response:
        return _response(name, media_type)

    app.add_api_route(ASSET_PREFIX + name, serve_asset, methods=["GET"], include_in_schema=False)
