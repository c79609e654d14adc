"""`AgentStorage.subscribe()` through real processes: agent A -> nats-server -> `replicator serve` -> SSE -> B.

A subscriber's copy (the snapshot plus every change applied in order) is compared with A's own table by count
and digest; every transaction offset is seen once; the iterator reconnects across an HTPC restart without loss
or repeat, and a recreated database surfaces as MustRefetch followed by a new snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import (
    AgentStorage,
    Change,
    FeedError,
    FeedSchema,
    FeedSubscription,
    Migration,
    MustRefetch,
    UpToDate,
)
from agent_client.subscription import SSEDecoder
from tests.support.htpc import HtpcProcess, agent_session, apoll, client_and_agent, rows_digest, settle_agent

ITEMS = Migration(
    1,
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty REAL, data BLOB);\n"
    "CREATE TABLE asked (k TEXT PRIMARY KEY)",
    "subscribe tables",
)
COLUMNS = ("id", "name", "qty", "data")


class Copy:
    """A table rebuilt from a subscription's events (a reset on MustRefetch), checking the iterator's rules."""

    def __init__(self) -> None:
        self.rows: dict[Any, tuple[Any, ...]] = {}
        self.offsets: list[str] = []  # every transaction boundary delivered, in order
        self.offset: str | None = None
        self.refetches = 0
        self.snapshots = 0
        self._pending: list[Change] = []

    def apply(self, event: Any) -> None:
        if isinstance(event, FeedSchema):
            assert not self._pending
            assert event.columns == COLUMNS and event.pk == ("id",)
            self.rows = {}
            self.snapshots += 1
        elif isinstance(event, MustRefetch):
            self._pending = []
            self.refetches += 1
        elif isinstance(event, Change):
            self._pending.append(event)
            if event.last:
                for ch in self._pending:
                    assert ch.offset == event.offset
                    if ch.op == "delete":
                        self.rows.pop(ch.key["id"], None)
                    else:
                        assert ch.row is not None
                        self.rows[ch.key["id"]] = tuple(ch.row[c] for c in COLUMNS)
                self._pending = []
                assert event.offset not in self.offsets, f"transaction {event.offset} delivered twice"
                self.offsets.append(event.offset)
                self.offset = event.offset
        elif isinstance(event, UpToDate):
            assert not self._pending
            self.offset = event.offset

    def digest(self) -> tuple[int, str]:
        return rows_digest(self.rows.values())


async def agent_digest(storage: AgentStorage) -> tuple[int, str]:
    rows = await storage.query_local("SELECT id, name, qty, data FROM items")
    return rows_digest(tuple(r[c] for c in COLUMNS) for r in rows)


@contextlib.asynccontextmanager
async def consuming(sub: FeedSubscription, copy: Copy) -> AsyncIterator[asyncio.Task[None]]:
    async def run() -> None:
        async for event in sub:
            copy.apply(event)

    task = asyncio.create_task(run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await sub.aclose()


async def write_history(a: AgentStorage, start: int, n: int) -> None:
    """Inserts, multi-row transactions, updates and deletes."""
    for i in range(start, start + n, 10):
        await a.batch_write(
            {"table": "items", "data": {"id": j, "name": f"n{j}", "qty": j / 3, "data": bytes([j % 256]) * 3}}
            for j in range(i, i + 10)
        )
        await a.write_data("items", {"id": i + 1, "name": f"updated {i}", "qty": float("inf")})
        await a.execute("DELETE FROM items WHERE id = ?", (i + 2,))


async def test_snapshot_then_live_equals_history_and_refusals(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        client_and_agent(module_htpc, "sub-a1", tmp_path / "a", [ITEMS], ["items"]) as (client, a),
        agent_session("sub-b1", tmp_path / "b", htpc_url=module_htpc.url) as b,
    ):
        await a.set_visibility("asked", "on_demand")
        await write_history(a, 0, 200)
        await settle_agent(client, a)
        copy = Copy()
        async with consuming(b.subscribe("sub-a1", "items"), copy):
            await apoll(lambda: _true(copy.snapshots == 1 and copy.offset is not None), 20, "the snapshot")
            await write_history(a, 1000, 300)
            await settle_agent(client, a)
            want = await agent_digest(a)
            await apoll(lambda: _true(copy.digest() == want), 20, "the live changes")
        assert copy.refetches == 0
        assert want[0] == 200 - 20 + 300 - 30

        # not live: the snapshot, then the iterator ends; from an offset: nothing before it
        events = [e async for e in b.subscribe("sub-a1", "items", live=False)]
        assert isinstance(events[0], FeedSchema) and isinstance(events[-1], UpToDate)
        assert sum(isinstance(e, Change) for e in events) == want[0]
        rest = [e async for e in b.subscribe("sub-a1", "items", offset=events[-1].offset, live=False)]
        assert rest == [UpToDate(events[-1].offset)]

        with pytest.raises(FeedError) as refused:
            async for _ in b.subscribe("sub-a1", "asked"):
                pass
        assert refused.value.status == 403 and refused.value.code == "table_not_visible"
        with pytest.raises(FeedError) as unknown:
            async for _ in b.subscribe("sub-a1", "nothing_here"):
                pass
        assert unknown.value.status == 404


async def test_reconnects_across_an_htpc_restart_without_loss_or_repeat(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        client_and_agent(htpc, "sub-a2", tmp_path / "a", [ITEMS], ["items"]) as (client, a),
        agent_session("sub-b2", tmp_path / "b", htpc_url=htpc.url) as b,
    ):
        await write_history(a, 0, 100)
        await settle_agent(client, a)
        copy = Copy()
        sub = b.subscribe("sub-a2", "items")
        async with consuming(sub, copy):
            await apoll(lambda: _true(copy.snapshots == 1 and sub.state == "live"), 20, "live")
            connects = sub.connects
            htpc.kill()
            await write_history(a, 1000, 100)  # committed locally while the HTPC is down
            await apoll(lambda: _true(sub.state in ("disconnected", "connecting")), 20, "the drop noticed")
            htpc.start()
            await write_history(a, 2000, 100)
            await settle_agent(client, a)
            want = await agent_digest(a)
            await apoll(lambda: _true(copy.digest() == want), 30, "the changes after the restart")
            assert sub.connects > connects
        assert copy.refetches == 0 and copy.snapshots == 1
        assert len(copy.offsets) == len(set(copy.offsets))


async def test_must_refetch_after_the_database_is_recreated(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        httpx_client(module_htpc) as client,
        agent_session("sub-b3", tmp_path / "b", htpc_url=module_htpc.url) as b,
    ):
        async with agent_session(
            "sub-a3", tmp_path / "a", htpc_url=module_htpc.url, migrations=[ITEMS], visibility={"items": "always"}
        ) as a:
            await write_history(a, 0, 50)
            await settle_agent(client, a)
        copy = Copy()
        sub = b.subscribe("sub-a3", "items")
        async with consuming(sub, copy):
            await apoll(lambda: _true(sub.state == "live"), 20, "live")
            for suffix in ("", "-wal", "-shm"):
                (tmp_path / "a" / f"sub-a3.db{suffix}").unlink(missing_ok=True)
            async with agent_session(
                "sub-a3", tmp_path / "a", htpc_url=module_htpc.url, migrations=[ITEMS], visibility={"items": "always"}
            ) as a2:
                await write_history(a2, 5000, 30)
                await settle_agent(client, a2)
                want = await agent_digest(a2)
                await apoll(lambda: _true(copy.refetches >= 1 and copy.digest() == want), 30, "the new data")
        assert copy.snapshots >= 2


def test_sse_decoder_splits_lines_anywhere() -> None:
    raw = (
        b': keep-alive\n\nevent: change\ndata: {"a":1}\nid: x_1\n\n'
        b"event: control\r\ndata: line1\r\ndata: line2\r\n\r\n"
        b"data:nospace\r\r: trailing comment\n"
    )
    whole = SSEDecoder().feed(raw)
    assert [(m.event, m.data, m.id) for m in whole] == [
        ("change", b'{"a":1}', "x_1"),
        ("control", b"line1\nline2", "x_1"),
        ("message", b"nospace", "x_1"),
    ]
    for step in (1, 2, 3, 7):
        dec = SSEDecoder()
        got = []
        for i in range(0, len(raw), step):
            got += dec.feed(raw[i : i + step])
        assert got == whole, step


def _true(value: bool) -> Any:
    async def done() -> bool:
        return value

    return done()


@contextlib.asynccontextmanager
async def httpx_client(htpc: HtpcProcess) -> AsyncIterator[Any]:
    import httpx

    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        yield client
