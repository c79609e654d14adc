"""`/docs` and `/redoc` work without internet: every asset comes from the replicator itself (api_docs).

The pages are checked over real ASGI requests (same-origin URLs only, every asset answers with the right
content type), then a real headless Chromium renders them from a real uvicorn server on loopback with the
network off: every request that is not to loopback goes to a loopback recorder that refuses it. The
rendered DOM must hold the Swagger UI / ReDoc rendering of the app's operations, and the page must have asked
the recorder for nothing. A control run of FastAPI's stock CDN page under the same conditions stays blank
and is caught asking a CDN, so the check can fail.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from replicator.api_docs import ASSETS_URL, CONTENT_SECURITY_POLICY, assets_dir, install_api_docs

TITLE = "Docs probe API"
SUMMARY = "Read one probe item"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def probe_app(*, offline: bool = True, **kwargs: object) -> FastAPI:
    if offline:
        kwargs.setdefault("docs_url", None)
        kwargs.setdefault("redoc_url", None)
    app = FastAPI(title=TITLE, version="9.9", **kwargs)  # type: ignore[arg-type]

    @app.get("/items/{item_id}", summary=SUMMARY)
    def read_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    if offline:
        install_api_docs(app)
    return app


class _Refs(HTMLParser):
    """Every URL an HTML page makes the browser load or follow (src, href, action)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "action", "spec-url") and v is not None]


def references(html: str) -> list[str]:
    parser = _Refs()
    parser.feed(html)
    return parser.urls


def same_origin(url: str) -> bool:
    parts = urlsplit(url)
    return not parts.scheme and not parts.netloc and url.startswith("/")


# ----------------------------------------------------------------------------- over ASGI
def asgi_client(app: FastAPI, root_path: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, root_path=root_path), base_url="http://docs.test")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with asgi_client(probe_app()) as c:
        yield c


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_pages_reference_only_same_origin_urls(client: httpx.AsyncClient, page: str) -> None:
    resp = await client.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert "http://" not in resp.text and "https://" not in resp.text, resp.text  # no CDN, font or favicon host
    assert resp.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["referrer-policy"] == "no-referrer"
    for url in references(resp.text):
        assert same_origin(url), f"{page} references {url}"


async def test_docs_pages_name_their_assets(client: httpx.AsyncClient) -> None:
    docs = (await client.get("/docs")).text
    assert set(references(docs)) == {
        f"{ASSETS_URL}/swagger-ui.css",
        f"{ASSETS_URL}/favicon.png",
        f"{ASSETS_URL}/swagger-ui-bundle.js",
    }
    assert "url: '/openapi.json'" in docs and '"validatorUrl": null' in docs
    redoc = (await client.get("/redoc")).text
    assert set(references(redoc)) == {f"{ASSETS_URL}/redoc.standalone.js", f"{ASSETS_URL}/favicon.png", "/openapi.json"}
    assert "fonts.googleapis" not in redoc


async def test_every_referenced_asset_answers_with_its_content_type(client: httpx.AsyncClient) -> None:
    expected = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
    urls = {u for page in ("/docs", "/redoc") for u in references((await client.get(page)).text)}
    assert len(urls) == 5, urls
    for url in sorted(urls):
        resp = await client.get(url)
        assert resp.status_code == 200, url
        assert expected[Path(url).suffix] in resp.headers["content-type"], (url, resp.headers["content-type"])
        assert len(resp.content) > 1000, url
        if url.startswith(ASSETS_URL):
            assert resp.content == (assets_dir() / url.removeprefix(ASSETS_URL + "/")).read_bytes()
    assert SUMMARY in (await client.get("/openapi.json")).text


async def test_docs_stay_out_of_the_openapi_schema(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert list(paths) == ["/items/{item_id}"]


async def test_pages_follow_the_root_path() -> None:
    async with asgi_client(probe_app(), root_path="/htpc") as c:
        html = (await c.get("/docs")).text
        assert f"/htpc{ASSETS_URL}/swagger-ui-bundle.js" in html and "url: '/htpc/openapi.json'" in html
        assert "'/htpc/docs/oauth2-redirect'" in html
        assert f'src="/htpc{ASSETS_URL}/redoc.standalone.js"' in (await c.get("/redoc")).text


async def test_fastapi_cdn_pages_are_replaced() -> None:
    app = FastAPI(title=TITLE)  # FastAPI's own /docs and /redoc, from a CDN
    async with asgi_client(app) as c:
        assert "cdn.jsdelivr.net" in (await c.get("/docs")).text
    install_api_docs(app)
    async with asgi_client(app) as c:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            resp = await c.get(page)
            assert resp.status_code == 200 and "https://" not in resp.text, page
    assert sum(getattr(r, "path", None) == "/docs" for r in app.routes) == 1


async def test_no_docs_without_an_openapi_schema() -> None:
    async with asgi_client(probe_app(openapi_url=None)) as c:
        assert (await c.get("/docs")).status_code == 404 and (await c.get("/redoc")).status_code == 404


# ----------------------------------------------------------------------------- a real browser, network off
class _Recorder(socketserver.ThreadingTCPServer):
    """A loopback HTTP proxy that refuses every request and remembers what was asked of it."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordOne)
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def hosts(self) -> set[str]:
        found = set()
        for line in self.requests:
            method, _, rest = line.partition(" ")
            target = rest.split(" ", 1)[0]
            found.add(target.rsplit(":", 1)[0] if method == "CONNECT" else (urlsplit(target).hostname or target))
        return found


class _RecordOne(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(8192).decode("latin-1").strip()
        assert isinstance(self.server, _Recorder)
        self.server.requests.append(line)
        self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def _chromium_own(host: str) -> bool:
    """Chromium's own background services (updates, sign-in, time), which have nothing to do with the page."""
    return not host.startswith("fonts.") and host.endswith((".google.com", ".googleapis.com", ".gvt1.com"))


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    server = _Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Served:
    def __init__(self, app: FastAPI) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)  # connections wait in the backlog until uvicorn accepts them
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> _Served:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def render(url: str, proxy: str, profile: Path) -> str:
    """The DOM headless Chromium builds for `url`; every non-loopback request goes to `proxy`."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        # network off: names do not resolve, and whatever is not loopback goes to the refusing recorder
        f"--proxy-server={proxy}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=5000",
        "--dump-dom",
        url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the browser's helper processes, if any are left
        proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


@pytest.fixture
def chromium_profile(tmp_path: Path) -> Path:
    if CHROMIUM is None:
        pytest.skip(
            "chromium is not installed (Debian: apt-get install chromium); the offline rendering check needs it"
        )
    return tmp_path / "chromium-profile"


def test_chromium_renders_swagger_ui_and_redoc_offline(chromium_profile: Path, recorder: _Recorder) -> None:
    with _Served(probe_app()) as served:
        swagger = render(f"{served.url}/docs", recorder.url, chromium_profile)
        redoc = render(f"{served.url}/redoc", recorder.url, chromium_profile)

    # Swagger UI rendered the app's schema: its root, the title, the operation block
    assert 'class="swagger-ui"' in swagger
    assert '<h1 class="title">' + TITLE in swagger
    assert 'data-path="/items/{item_id}"' in swagger and "opblock-get" in swagger
    assert SUMMARY in swagger
    # ReDoc rendered it too: the title, the operation and its example response
    assert f">{TITLE} " in redoc and SUMMARY in redoc
    assert 'operation-type get">get' in redoc and 'class="redoc-json"' in redoc

    page_hosts = {h for h in recorder.hosts() if not _chromium_own(h)}
    assert page_hosts == set(), recorder.requests


def test_chromium_control_stock_cdn_docs_stay_blank_offline(chromium_profile: Path, recorder: _Recorder) -> None:
    """FastAPI's own /docs under the same conditions: the CDN is unreachable, and the recorder sees it asked for."""
    with _Served(probe_app(offline=False)) as served:
        swagger = render(f"{served.url}/docs", recorder.url, chromium_profile)
    assert 'id="swagger-ui"' in swagger
    assert "opblock" not in swagger and SUMMARY not in swagger
    assert "cdn.jsdelivr.net" in recorder.hosts(), recorder.requests


def test_real_server_serves_the_assets() -> None:
    """The loopback uvicorn server used above answers real HTTP (checked without a browser too)."""
    with _Served(probe_app()) as served:
        resp = httpx.get(f"{served.url}{ASSETS_URL}/swagger-ui.css", timeout=30)
        page = httpx.get(f"{served.url}/redoc", timeout=30)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/css")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert page.headers["x-content-type-options"] == "nosniff" and page.headers["referrer-policy"] == "no-referrer"
