"""The relay API's interactive docs (`/docs`, `/redoc`) served from the replicator itself, never from a CDN.

FastAPI's own `/docs` and `/redoc` pages load Swagger UI, ReDoc, a favicon and
Google Fonts from the internet, so on an HTPC without internet they are blank.
`install_api_docs` serves the same pages with every asset taken from the
`fastapi-offline` package (Swagger UI's `swagger-ui-bundle.js` and
`swagger-ui.css`, ReDoc's `redoc.standalone.js`, FastAPI's favicon) under
`/docs-assets/`, and answers the pages with a Content-Security-Policy that lets
the browser load nothing from another origin (ReDoc's bundle would otherwise
fetch the Redocly logo from its CDN; Swagger UI's validator badge is turned
off), `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
The pages follow the ASGI `root_path`, as FastAPI's do.

Call it on an app built with `FastAPI(docs_url=None, redoc_url=None)`; on an
app that still has FastAPI's CDN pages, those routes are replaced.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import Route

__all__ = [
    "ASSETS_URL",
    "CONTENT_SECURITY_POLICY",
    "DOCS_URL",
    "PAGE_HEADERS",
    "REDOC_URL",
    "assets_dir",
    "install_api_docs",
]

#: Where the pages are served, and where their assets are mounted.
DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"

#: Same-origin only. Inline script and style: FastAPI's Swagger page starts Swagger UI with an inline
#: script, and both UIs inject styles. ReDoc's search runs in a worker made from a blob: URL.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "worker-src 'self' blob:",
        "connect-src 'self'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ]
)

#: Every docs page's security headers: the policy above, no content sniffing, no Referer sent anywhere.
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

#: Swagger UI would show a badge image from validator.swagger.io for a spec served from a non-local host.
_SWAGGER_UI_OVERRIDES = {"validatorUrl": None}
_OAUTH2_REDIRECT_URL = DOCS_URL + "/oauth2-redirect"


def assets_dir() -> Path:
    """The directory of the bundled Swagger UI / ReDoc files (shipped by the `fastapi-offline` package)."""
    return Path(str(files("fastapi_offline") / "static"))


def _root(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _no_cdn(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(PAGE_HEADERS)
    return response


def _drop_fastapi_pages(app: FastAPI) -> None:
    """Remove FastAPI's CDN-backed `/docs`, oauth2-redirect and `/redoc` routes, if the app has them."""
    cdn_pages = {app.docs_url, app.redoc_url}
    if app.docs_url and app.swagger_ui_oauth2_redirect_url:
        cdn_pages.add(app.swagger_ui_oauth2_redirect_url)
    cdn_pages.discard(None)
    if cdn_pages:
        app.router.routes[:] = [r for r in app.router.routes if not (isinstance(r, Route) and r.path in cdn_pages)]
    app.docs_url = None
    app.redoc_url = None


def install_api_docs(app: FastAPI) -> None:
    """Serve `/docs` (Swagger UI), `/docs/oauth2-redirect` and `/redoc` (ReDoc) with same-origin assets only.

    The assets are mounted at `/docs-assets/`. An app without an OpenAPI schema (`openapi_url=None`) gets
    no docs pages, as with FastAPI's own.
    """
    _drop_fastapi_pages(app)
    openapi_url = app.openapi_url
    if not openapi_url:
        return
    title = app.title
    swagger_parameters = {**(app.swagger_ui_parameters or {}), **_SWAGGER_UI_OVERRIDES}
    init_oauth = app.swagger_ui_init_oauth
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or _OAUTH2_REDIRECT_URL
    app.swagger_ui_oauth2_redirect_url = oauth2_redirect_url

    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return _no_cdn(
            get_swagger_ui_html(
                openapi_url=root + openapi_url,
                title=f"{title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
                swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                oauth2_redirect_url=root + oauth2_redirect_url,
                init_oauth=init_oauth,
                swagger_ui_parameters=swagger_parameters,
            )
        )

    async def swagger_ui_oauth2_redirect(_request: Request) -> HTMLResponse:
        return _no_cdn(get_swagger_ui_oauth2_redirect_html())

    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return _no_cdn(
            get_redoc_html(
                openapi_url=root + openapi_url,
                title=f"{title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
                with_google_fonts=False,
            )
        )

    app.add_route(DOCS_URL, swagger_ui, include_in_schema=False)
    app.add_route(oauth2_redirect_url, swagger_ui_oauth2_redirect, include_in_schema=False)
    app.add_route(REDOC_URL, redoc, include_in_schema=False)
