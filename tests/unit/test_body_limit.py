"""BodyLimit refuses bodies over the limit, declared or streamed, with a JSON 413; smaller ones pass intact."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from replicator.body_limit import BodyLimit

LIMIT = 1024


async def _echo(scope: Scope, receive: Receive, send: Send) -> None:
    body = await Request(scope, receive).body()
    await Response(body, media_type="application/octet-stream")(scope, receive, send)


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=BodyLimit(_echo, limit=LIMIT)), base_url="http://t")


async def _chunks(total: int, size: int = 100) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        chunk = b"x" * min(size, total - sent)
        sent += len(chunk)
        yield chunk


def _assert_413(resp: httpx.Response) -> None:
    assert resp.status_code == 413
    assert resp.json() == {"error": "payload_too_large", "message": f"request body over {LIMIT} bytes"}


async def test_declared_body_over_the_limit() -> None:
    async with _client() as client:
        _assert_413(await client.post("/", content=b"x" * (LIMIT + 1)))


@pytest.mark.parametrize("declared", ["99999999999999999999", "12abc", "-1"])
async def test_declared_length_too_big_or_not_a_number(declared: str) -> None:
    async with _client() as client:
        _assert_413(await client.post("/", content=b"{}", headers={"content-length": declared}))


async def test_streamed_body_over_the_limit() -> None:
    async with _client() as client:
        resp = await client.post("/", content=_chunks(LIMIT + 1))
        assert "content-length" not in resp.request.headers  # chunked: only counting the stream catches it
        _assert_413(resp)


@pytest.mark.parametrize("size", [0, LIMIT])
async def test_bodies_within_the_limit_reach_the_app_intact(size: int) -> None:
    async with _client() as client:
        declared = await client.post("/", content=b"y" * size)
        streamed = await client.post("/", content=_chunks(size))
    assert declared.status_code == streamed.status_code == 200
    assert declared.content == b"y" * size and streamed.content == b"x" * size


async def test_a_client_gone_mid_body_never_reaches_the_application() -> None:
    called: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append((await receive()).get("body", b""))

    messages = iter(
        [
            {"type": "http.request", "body": b'{"agent_id": "a", "ta', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )

    async def receive() -> dict[str, object]:
        return next(messages)

    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/relay/immediate", "headers": []}
    await BodyLimit(app, limit=LIMIT)(scope, receive, send)  # type: ignore[arg-type]
    assert called == [] and sent == []
