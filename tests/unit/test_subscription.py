"""FeedSubscription against a scripted loopback HTTP server: resume points, no repeat, resets, refusals.

Each connection to the server gets the next scripted answer (then the server closes it), so a stream that
drops in the middle of a transaction or of a snapshot is exact and repeatable.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from agent_client import (
    Backoff,
    Change,
    FeedError,
    FeedProtocolError,
    FeedSchema,
    FeedSubscription,
    InvalidAgentId,
    InvalidIdentifier,
    MustRefetch,
    StorageClosed,
    UpToDate,
    sse_event,
)

F = "00000000000000f1"
G = "00000000000000f2"
SCHEMA_F = FeedSchema("t", ("id", "v"), ("INTEGER", "TEXT"), ("id",), f"{F}_1")
SCHEMA_G = FeedSchema("t", ("id", "v"), ("INTEGER", "TEXT"), ("id",), f"{G}_5")


def ins(i: int, offset: str, last: bool) -> Change:
    return Change("insert", "t", {"id": i}, {"id": i, "v": f"v{i}"}, offset, last)


def sse(*events: object) -> bytes:
    return b"".join(sse_event(e) for e in events)  # type: ignore[arg-type]


@asynccontextmanager
async def scripted(answers: list[tuple[int, bytes]]) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A server answering the i-th request with answers[i] (status, body); yields (url, the queries seen)."""
    seen: list[dict[str, str]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        target = head.split(b" ", 2)[1].decode()
        seen.append(dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query)))
        status, body = answers[min(len(seen), len(answers)) - 1]
        ctype = b"text/event-stream" if status == 200 else b"application/json"
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: %s\r\nConnection: close\r\n\r\n" % (status, ctype) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()


async def test_drops_mid_transaction_and_mid_snapshot_resume_without_repeat() -> None:
    answers = [
        (200, sse(SCHEMA_F, ins(1, f"{F}_1", True), UpToDate(f"{F}_1"), ins(2, f"{F}_2", False))),  # drops
        (200, sse(ins(2, f"{F}_2", False), ins(3, f"{F}_2", True), UpToDate(f"{F}_2"))),
        (200, sse(MustRefetch("epoch changed"))),
        (200, sse(SCHEMA_G, ins(7, f"{G}_5", False))),  # a snapshot cut short
        (200, sse(SCHEMA_G, ins(7, f"{G}_5", False), ins(8, f"{G}_5", True), UpToDate(f"{G}_5"))),
    ]
    async with scripted(answers) as (url, seen), httpx.AsyncClient() as client:
        sub = FeedSubscription(client, url, "a", "t", backoff=Backoff(0.01, 0.02))
        got: list[object] = []
        async for event in sub:
            got.append(event)
            if event == UpToDate(f"{G}_5"):
                break
        await sub.aclose()
    assert got[:6] == [
        SCHEMA_F,
        ins(1, f"{F}_1", True),
        UpToDate(f"{F}_1"),
        ins(2, f"{F}_2", False),  # once: the first copy was never yielded (its transaction was cut)
        ins(3, f"{F}_2", True),
        UpToDate(f"{F}_2"),
    ]
    assert got[6] == MustRefetch("epoch changed")
    assert got[7:9] == [SCHEMA_G, ins(7, f"{G}_5", False)]
    assert isinstance(got[9], MustRefetch) and "interrupted" in got[9].reason
    assert got[10:] == [SCHEMA_G, ins(7, f"{G}_5", False), ins(8, f"{G}_5", True), UpToDate(f"{G}_5")]
    assert [q.get("offset") for q in seen] == [None, f"{F}_1", f"{F}_2", None, None]
    assert all(q["live"] == "true" and q["agent"] == "a" and q["table"] == "t" for q in seen)


async def test_refusal_raises_and_409_is_a_reset() -> None:
    refused = b'{"error": "table_not_visible", "message": "t is on_demand"}'
    async with scripted([(403, refused)]) as (url, _seen), httpx.AsyncClient() as client:
        with pytest.raises(FeedError) as exc:
            async for _ in FeedSubscription(client, url, "a", "t"):
                pass
        assert exc.value.status == 403 and exc.value.code == "table_not_visible"
    gone = b'[{"control": "must-refetch", "reason": "too old"}]'
    answers = [(409, gone), (200, sse(SCHEMA_F, UpToDate(f"{F}_1")))]
    async with scripted(answers) as (url, seen), httpx.AsyncClient() as client:
        sub = FeedSubscription(client, url, "a", "t", offset=f"{F}_9", live=False, backoff=Backoff(0.01, 0.02))
        got = [e async for e in sub]
    assert got == [MustRefetch("too old"), SCHEMA_F, UpToDate(f"{F}_1")]
    assert [q.get("offset") for q in seen] == [f"{F}_9", None]
    assert sub.offset == f"{F}_1"


async def test_server_errors_are_retried() -> None:
    busy = b'{"error": "too_many_subscribers", "message": "later"}'
    answers = [(503, busy), (503, busy), (200, sse(SCHEMA_F, UpToDate(f"{F}_1")))]
    async with scripted(answers) as (url, seen), httpx.AsyncClient() as client:
        sub = FeedSubscription(client, url, "a", "t", live=False, backoff=Backoff(0.01, 0.02))
        got = [e async for e in sub]
    assert got == [SCHEMA_F, UpToDate(f"{F}_1")] and len(seen) == 3


async def test_arguments_are_checked_before_any_request() -> None:
    async with httpx.AsyncClient() as client:
        with pytest.raises(InvalidAgentId):
            FeedSubscription(client, "http://127.0.0.1:9", "Not An Id", "t")
        with pytest.raises(InvalidIdentifier):
            FeedSubscription(client, "http://127.0.0.1:9", "a", "_cr_feed")
        with pytest.raises(FeedProtocolError):
            FeedSubscription(client, "http://127.0.0.1:9", "a", "t", offset="junk")


async def test_a_subscription_ends_when_its_client_is_closed() -> None:
    hold = sse(SCHEMA_F, UpToDate(f"{F}_1"))
    async with scripted([(200, hold)]) as (url, _seen):
        client = httpx.AsyncClient()
        sub = FeedSubscription(client, url, "a", "t", backoff=Backoff(0.01, 0.02))
        assert await sub.__anext__() == SCHEMA_F
        assert await sub.__anext__() == UpToDate(f"{F}_1")
        await client.aclose()
        with pytest.raises(StorageClosed):
            await sub.__anext__()
        await sub.aclose()


async def test_aclose_while_another_task_iterates() -> None:
    async with scripted([(200, sse(SCHEMA_F, UpToDate(f"{F}_1")))]) as (url, _seen), httpx.AsyncClient() as client:
        sub = FeedSubscription(client, url, "a", "t", backoff=Backoff(5.0, 5.0))  # then a long reconnect delay
        got: list[object] = []

        async def run() -> None:
            async for event in sub:
                got.append(event)

        task = asyncio.create_task(run())
        while len(got) < 2:
            await asyncio.sleep(0.01)
        await sub.aclose()  # the task is waiting inside the iterator (the reconnect delay)
        await asyncio.wait_for(task, 10)  # ends by itself, well before the 5 s delay would
        assert got == [SCHEMA_F, UpToDate(f"{F}_1")] and sub.state == "closed"
