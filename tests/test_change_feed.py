"""`GET /relay/changes` through real processes: agents -> nats-server -> `replicator serve` -> HTTP feed.

Every message the HTPC sends is decoded with agent_client's `decode_feed_message`; a subscriber's copy (the
snapshot plus every change applied in order) is compared with the agent's own table by count and digest.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from agent_client import (
    AgentStorage,
    Change,
    FeedEvent,
    FeedOffset,
    FeedSchema,
    Migration,
    MustRefetch,
    UpToDate,
    decode_feed_message,
    encode_feed_message,
    sse_event,
)
from replicator.feed_hub import _sse, change_message
from tests.support.credentials import make_credentials
from tests.support.htpc import (
    HtpcProcess,
    agent_session,
    apoll,
    client_and_agent,
    rows_digest,
    settle_agent,
)

ITEMS = Migration(
    1,
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty REAL, data BLOB);\n"
    "CREATE TABLE other (k TEXT PRIMARY KEY, v INTEGER);\n"
    "CREATE TABLE hidden (k TEXT PRIMARY KEY);\n"
    "CREATE TABLE asked (k TEXT PRIMARY KEY)",
    "feed tables",
)
ITEM_COLUMNS = ("id", "name", "qty", "data")
SSE = {"Accept": "text/event-stream"}


# ---------------------------------------------------------------------- a subscriber's copy
class Copy:
    """A table rebuilt from feed messages, checking the feed's rules as it goes."""

    def __init__(self) -> None:
        self.rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.offset: str | None = None
        self.schema: FeedSchema | None = None
        self.units: list[str] = []  # the offset of every transaction applied, in order
        self.ops: Counter[str] = Counter()
        self._pending: list[Change] = []

    def apply(self, events: Iterable[FeedEvent]) -> None:
        for event in events:
            if isinstance(event, FeedSchema):
                assert not self._pending
                self.schema, self.rows, self.offset = event, {}, None
            elif isinstance(event, Change):
                if self._pending:
                    assert event.offset == self._pending[0].offset, "a transaction's changes share their offset"
                self._pending.append(event)
                if event.last:
                    self._commit()
            elif isinstance(event, UpToDate):
                assert not self._pending, "up-to-date inside a transaction"
                self.offset = event.offset
            else:
                raise AssertionError(f"unexpected {event!r}")

    def _commit(self) -> None:
        unit, self._pending = self._pending, []
        offset = unit[0].offset
        if self.schema is None or offset != self.schema.offset:  # snapshot rows are not a transaction
            assert offset not in self.units, f"transaction {offset} delivered twice"
            self.units.append(offset)
        for change in unit:
            self.ops[change.op] += 1
            key = tuple(sorted(change.key.items()))
            if change.op == "delete":
                self.rows.pop(key, None)
            else:
                assert change.row is not None
                self.rows[key] = dict(change.row)
        self.offset = offset

    def digest(self, columns: Iterable[str] = ITEM_COLUMNS) -> tuple[int, str]:
        return rows_digest([tuple(row[c] for c in columns) for row in self.rows.values()])


def decode_all(body: bytes) -> list[FeedEvent]:
    raw = orjson.loads(body)
    assert isinstance(raw, list)
    return [decode_feed_message(orjson.dumps(m)) for m in raw]


async def local_digest(storage: AgentStorage, table: str = "items", columns: Iterable[str] = ITEM_COLUMNS) -> Any:
    cols = list(columns)
    rows = await storage.query_local(f"SELECT {', '.join(cols)} FROM {table}")
    return rows_digest([tuple(r[c] for c in cols) for r in rows])


async def feed(client: httpx.AsyncClient, agent: str, table: str = "items", **params: Any) -> httpx.Response:
    query = {
        "agent": agent,
        "table": table,
        **{k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()},
    }
    return await client.get("/relay/changes", params=query, timeout=90)


async def catch_up(client: httpx.AsyncClient, agent: str, copy: Copy, table: str = "items") -> int:
    """Follow the JSON feed from the copy's offset until an up-to-date; the responses it took."""
    for responses in range(1, 1000):
        resp = await feed(client, agent, table, offset=copy.offset)
        assert resp.status_code == 200, resp.text
        events = decode_all(resp.content)
        copy.apply(events)
        if events and isinstance(events[-1], UpToDate):
            return responses
    raise AssertionError("never caught up")


async def snapshot_copy(client: httpx.AsyncClient, agent: str, table: str = "items") -> Copy:
    """A copy filled from the feed's snapshot (the JSON feed without an offset)."""
    copy = Copy()
    copy.apply(decode_all((await feed(client, agent, table)).content))
    return copy


async def write_history(storage: AgentStorage, start: int, count: int) -> None:
    """Inserts, then updates and deletes, some in multi-row local transactions."""
    await storage.batch_write(
        [
            {"table": "items", "data": {"id": i, "name": f"n{i}", "qty": i / 3, "data": os.urandom(i % 7)}}
            for i in range(start, start + count)
        ]
    )
    for i in range(start, start + count, 5):
        await storage.write_data("items", {"id": i, "name": f"updated {i}"})
    async with storage.transaction() as tx:
        await tx.execute("DELETE FROM items WHERE id % 7 = 0 AND id >= ?", (start,))
        await tx.write_data("other", {"k": f"k{start}", "v": start})
        await tx.write_data("items", {"id": start, "name": "in the same transaction"})


# ---------------------------------------------------------------------- SSE reading
class EventStream:
    """Server-Sent Events of one open response, decoded."""

    def __init__(self, resp: httpx.Response) -> None:
        self.resp = resp
        self._lines = resp.aiter_lines()
        self.comments = 0
        self.ids: list[str] = []

    async def next(self) -> FeedEvent | None:
        """The next event (None at the end of the stream)."""
        kind: str | None = None
        data: str | None = None
        event_id: str | None = None
        async for line in self._lines:
            if line == "":
                if data is None:
                    continue
                event = decode_feed_message(data)
                assert kind == ("change" if isinstance(event, Change) else "control"), (kind, data)
                if (isinstance(event, Change) and event.last) or isinstance(event, UpToDate):
                    assert event_id is not None and event_id == event.offset
                    self.ids.append(event_id)
                else:
                    assert event_id is None
                return event
            if line.startswith(":"):
                self.comments += 1
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith("id: "):
                event_id = line[4:]
        return None

    async def until(self, copy: Copy, done: Any) -> None:
        while True:
            event = await asyncio.wait_for(self.next(), 60)
            assert event is not None, "the stream ended"
            copy.apply([event])
            if isinstance(event, UpToDate) and done():
                return


@contextlib.asynccontextmanager
async def sse(client: httpx.AsyncClient, agent: str, table: str = "items", **params: Any) -> AsyncIterator[EventStream]:
    query = {
        "agent": agent,
        "table": table,
        **{k: str(v).lower() if isinstance(v, bool) else v for k, v in params.items()},
    }
    async with client.stream(
        "GET", "/relay/changes", params=query, headers=SSE, timeout=httpx.Timeout(10, read=90)
    ) as resp:
        assert resp.status_code == 200, (await resp.aread()).decode()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["x-accel-buffering"] == "no"
        yield EventStream(resp)


# ---------------------------------------------------------------------- the format
def test_messages_are_framed_as_agent_client_frames_them() -> None:
    key, row = {"id": 3}, {"id": 3, "b": {"b": "AAE="}, "r": {"f": "inf"}, "t": "é"}
    for op, r in (("insert", row), ("update", row), ("delete", None)):
        for last in (True, False):
            mine = change_message(op, "t", key, r, "0123456789abcdef_7", last)
            event = decode_feed_message(mine)
            assert mine == encode_feed_message(event)
            assert _sse(b"change", mine, "0123456789abcdef_7" if last else None) == sse_event(event)
    up = UpToDate("0123456789abcdef_7")
    assert _sse(b"control", encode_feed_message(up), up.offset) == sse_event(up)
    gone = MustRefetch("why")
    assert _sse(b"control", encode_feed_message(gone)) == sse_event(gone)


# ---------------------------------------------------------------------- JSON feed
async def test_snapshot_then_changes_equal_the_agents_table(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-json", tmp_path / "a", [ITEMS], ["items", "other"]) as (
        client,
        storage,
    ):
        await write_history(storage, 1, 120)
        await settle_agent(client, storage)
        resp = await feed(client, "feed-json")
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text
        events = decode_all(resp.content)
        schema = events[0]
        assert isinstance(schema, FeedSchema)
        assert (schema.table, schema.columns, schema.pk) == ("items", ITEM_COLUMNS, ("id",))
        assert schema.types == ("INTEGER", "TEXT", "REAL", "BLOB")
        rows = [e for e in events if isinstance(e, Change)]
        assert all(c.op == "insert" and c.offset == schema.offset for c in rows)
        assert [c.last for c in rows] == [False] * (len(rows) - 1) + [True]
        assert events[-1] == UpToDate(schema.offset)
        copy = Copy()
        copy.apply(events)
        assert copy.digest() == await local_digest(storage)

        # Changes after the offset: several rounds of history, each caught up by offset.
        for start in (200, 400, 600):
            await write_history(storage, start, 60)
            await settle_agent(client, storage)
            await catch_up(client, "feed-json", copy)
            assert copy.digest() == await local_digest(storage)
        assert copy.ops["insert"] >= 180 and copy.ops["update"] >= 36 and copy.ops["delete"] >= 24, copy.ops

        # The offset is caught up: without live, just up-to-date (the same offset).
        resp = await feed(client, "feed-json", offset=copy.offset)
        assert decode_all(resp.content) == [UpToDate(copy.offset or "")]


async def test_a_transaction_arrives_whole(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-txn", tmp_path / "a", [ITEMS], ["items", "other"]) as (
        client,
        storage,
    ):
        await storage.write_data("items", {"id": 0, "name": "first"})
        await settle_agent(client, storage)
        copy = await snapshot_copy(client, "feed-txn")
        before = copy.offset
        big = [
            {"table": "items", "data": {"id": i, "name": "x" * 2000, "data": os.urandom(500)}} for i in range(1, 3001)
        ]
        await storage.batch_write(big)  # one local transaction, published in several parts
        await settle_agent(client, storage)
        resp = await feed(client, "feed-txn", offset=before)
        events = decode_all(resp.content)
        changes = [e for e in events if isinstance(e, Change)]
        assert len(changes) == 3000 and len({c.offset for c in changes}) == 1
        assert [c.last for c in changes].count(True) == 1 and changes[-1].last
        assert isinstance(events[-1], UpToDate) and events[-1].offset == changes[0].offset
        copy.apply(events)
        assert copy.digest() == await local_digest(storage)

        # Live over SSE: the same kind of transaction comes as consecutive events, one `last`, one offset.
        async with sse(client, "feed-txn", offset=copy.offset, live=True) as stream:
            await stream.until(copy, lambda: True)
            await storage.batch_write(
                [{"table": "items", "data": {"id": i, "name": "y" * 2000}} for i in range(1, 3001)]
            )
            streamed: list[FeedEvent] = []
            while not (streamed and isinstance(streamed[-1], UpToDate)):
                event = await asyncio.wait_for(stream.next(), 60)
                assert event is not None
                streamed.append(event)
        changes = [e for e in streamed if isinstance(e, Change)]
        assert len(changes) == 3000 and len({c.offset for c in changes}) == 1
        assert [c.last for c in changes] == [False] * 2999 + [True]
        assert all(c.op == "update" for c in changes)
        copy.apply(streamed)
        assert copy.digest() == await local_digest(storage)


def _process_figures(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process."""
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


async def test_idle_subscribers_hold_no_thread_and_no_connection_each(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-idle", tmp_path / "a", [ITEMS], ["items"]) as (client, storage):
        await storage.write_data("items", {"id": 1, "name": "one"})
        await settle_agent(client, storage)
        streams = 60
        async with contextlib.AsyncExitStack() as stack:
            opened = []
            one = await stack.enter_async_context(sse(client, "feed-idle", live=True))
            await one.until(Copy(), lambda: True)  # the hub's threads and the agent's connection exist now
            threads_before, fds_before = _process_figures(module_htpc.pid)
            limits = httpx.Limits(max_connections=streams + 5)
            many = await stack.enter_async_context(
                httpx.AsyncClient(base_url=module_htpc.url, timeout=30, limits=limits)
            )
            for _ in range(streams):
                stream = await stack.enter_async_context(sse(many, "feed-idle", live=True))
                await stream.until(Copy(), lambda: True)
                opened.append(stream)
            threads, fds = _process_figures(module_htpc.pid)
            assert threads - threads_before <= 2, (threads_before, threads)  # no thread per subscriber
            assert fds - fds_before <= streams + 6, (fds_before, fds)  # a socket each, no SQLite files each
            metrics = (await client.get("/metrics")).text
            assert f"replicator_feed_subscribers {float(streams + 1)}" in metrics
            # One commit reaches every one of them.
            await storage.write_data("items", {"id": 2, "name": "to all"})
            for stream in [one, *opened]:
                copy = Copy()
                copy.rows = {}
                await stream.until(copy, lambda copy=copy: bool(copy.units))
                assert list(copy.rows.values()) == [{"id": 2, "name": "to all", "qty": None, "data": None}]

        async def released() -> bool:  # every stream closed by its client gave its place back
            return "replicator_feed_subscribers 0.0" in (await client.get("/metrics")).text

        await apoll(released, 20, "the subscribers of closed streams released")


async def test_long_poll_waits_for_a_change_and_times_out(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-poll", tmp_path / "a", [ITEMS], ["items", "other"]) as (
        client,
        storage,
    ):
        await storage.write_data("items", {"id": 1, "name": "one"})
        await settle_agent(client, storage)
        copy = await snapshot_copy(client, "feed-poll")
        start = copy.offset
        # Nothing new: after timeout_ms, just up-to-date at the same offset.
        resp = await feed(client, "feed-poll", offset=start, live=True, timeout_ms=300)
        assert resp.status_code == 200 and decode_all(resp.content) == [UpToDate(start or "")]
        # Another table moved the head: still only up-to-date, further on.
        await storage.write_data("other", {"k": "a", "v": 1})
        await settle_agent(client, storage)
        resp = await feed(client, "feed-poll", offset=start, live=True, timeout_ms=300)
        (moved,) = decode_all(resp.content)
        assert isinstance(moved, UpToDate) and moved.offset != start
        assert FeedOffset.parse(moved.offset).n > FeedOffset.parse(start or "").n
        # Waiting (up to 60 s) returns with the write made meanwhile.
        poll = asyncio.create_task(feed(client, "feed-poll", offset=moved.offset, live=True, timeout_ms=60_000))
        await asyncio.sleep(0.3)
        assert not poll.done()
        await storage.write_data("items", {"id": 2, "name": "two"})
        resp = await asyncio.wait_for(poll, 60)
        events = decode_all(resp.content)
        assert [(e.op, dict(e.key)) for e in events if isinstance(e, Change)] == [("insert", {"id": 2})]
        assert isinstance(events[-1], UpToDate)
        copy.apply(events)
        assert copy.digest() == await local_digest(storage)


async def test_requests_refused_with_stable_codes(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-vis", tmp_path / "a", [ITEMS], ["items"]) as (client, storage):
        await storage.set_visibility("asked", "on_demand")
        await storage.write_data("items", {"id": 1})
        await storage.write_data("hidden", {"k": "secret"})  # private: never leaves the agent
        await settle_agent(client, storage)
        await apoll(lambda: _has_table(client, "feed-vis", "asked"), 20, "the on_demand table announced")
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({"agent": "Bad Agent!", "table": "items"}, 400, "invalid_agent_id"),
            ({"table": "items"}, 400, "invalid_agent_id"),
            ({"agent": "feed-vis"}, 400, "invalid_request"),
            ({"agent": "feed-vis", "table": "items", "offset": "nope"}, 400, "invalid_offset"),
            ({"agent": "feed-vis", "table": "items", "offset": "0123456789abcdef_-1"}, 400, "invalid_offset"),
            ({"agent": "feed-vis", "table": "items", "timeout_ms": "abc"}, 400, "invalid_request"),
            ({"agent": "feed-vis", "table": "items", "timeout_ms": "60001"}, 400, "invalid_request"),
            ({"agent": "feed-vis", "table": "items", "live": "maybe"}, 400, "invalid_request"),
            ({"agent": "nobody-here", "table": "items"}, 404, "unknown_agent"),
            ({"agent": "feed-vis", "table": "hidden"}, 404, "unknown_table"),
            ({"agent": "feed-vis", "table": "nothing"}, 404, "unknown_table"),
            ({"agent": "feed-vis", "table": "_cr_feed"}, 404, "unknown_table"),
            ({"agent": "feed-vis", "table": "asked"}, 403, "table_not_visible"),
        ]
        for params, status, code in cases:
            for headers in ({}, SSE):
                resp = await client.get("/relay/changes", params=params, headers=headers)
                assert resp.status_code == status, (params, resp.text)
                body = resp.json()
                assert body["error"] == code and body["message"], (params, body)


async def _has_table(client: httpx.AsyncClient, agent: str, table: str) -> bool:
    resp = await client.get(f"/relay/agents/{agent}")
    return resp.status_code == 200 and table in resp.json()["tables"]["on_demand"]


# ---------------------------------------------------------------------- SSE
async def test_sse_snapshot_and_live_changes(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-sse", tmp_path / "a", [ITEMS], ["items", "other"]) as (
        client,
        storage,
    ):
        await write_history(storage, 1, 50)
        await settle_agent(client, storage)
        copy = Copy()
        # Not live: snapshot, up-to-date, end.
        async with sse(client, "feed-sse") as stream:
            while (event := await stream.next()) is not None:
                copy.apply([event])
        assert copy.offset is not None and copy.digest() == await local_digest(storage)
        # Live from that offset: every commit's transaction, then up-to-date.
        async with sse(client, "feed-sse", offset=copy.offset, live=True) as stream:
            await stream.until(copy, lambda: True)  # the catch-up's up-to-date
            for start in (100, 200):
                await write_history(storage, start, 40)
                seq = await settle_agent(client, storage)
                head = await _central_offset(client, "feed-sse")
                await stream.until(copy, lambda head=head: copy.offset == head)
                assert copy.digest() == await local_digest(storage), seq
        # Resume with Last-Event-ID (what an EventSource sends): nothing repeated, nothing missed.
        await write_history(storage, 300, 30)
        await settle_agent(client, storage)
        async with client.stream(
            "GET",
            "/relay/changes",
            params={"agent": "feed-sse", "table": "items"},
            headers={**SSE, "Last-Event-ID": copy.offset or ""},
        ) as resp:
            stream = EventStream(resp)
            while (event := await stream.next()) is not None:
                copy.apply([event])
        assert copy.digest() == await local_digest(storage)


async def _central_offset(client: httpx.AsyncClient, agent: str) -> str:
    """The head of the agent's feed as the JSON feed says it (an up-to-date after a snapshot of `other`)."""
    resp = await feed(client, agent, "other")
    up = decode_all(resp.content)[-1]
    assert isinstance(up, UpToDate)
    return up.offset


async def test_schema_change_ends_a_live_stream_with_must_refetch(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "feed-ddl", tmp_path / "a", [ITEMS], ["items"]) as (client, storage):
        await storage.write_data("items", {"id": 1, "name": "one"})
        await settle_agent(client, storage)
        copy = Copy()
        async with sse(client, "feed-ddl", live=True) as stream:
            await stream.until(copy, lambda: True)
            await storage.write_data("items", {"id": 2, "name": "two"})
            await storage.execute("ALTER TABLE items ADD COLUMN extra TEXT")
            events: list[FeedEvent] = []
            while (event := await asyncio.wait_for(stream.next(), 60)) is not None:
                events.append(event)
        assert isinstance(events[-1], MustRefetch) and "schema" in events[-1].reason
        copy.apply(events[:-1])
        assert set(copy.rows) == {(("id", 1),), (("id", 2),)}
        # The JSON feed from the offset before the change: 409.
        resp = await feed(client, "feed-ddl", offset=copy.offset)
        assert resp.status_code == 409 and isinstance(decode_all(resp.content)[0], MustRefetch)
        fresh = await snapshot_copy(client, "feed-ddl")
        assert fresh.schema is not None and "extra" in fresh.schema.columns


def test_curl_shows_changes_arrive(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")

    async def scenario() -> None:
        async with client_and_agent(module_htpc, "feed-curl", tmp_path / "a", [ITEMS], ["items"]) as (client, storage):
            await storage.write_data("items", {"id": 1, "name": "before"})
            await settle_agent(client, storage)
            url = f"{module_htpc.url}/relay/changes?agent=feed-curl&table=items&live=true"
            proc = await asyncio.create_subprocess_exec(
                curl, "-sN", "-H", "Accept: text/event-stream", url, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL
            )
            try:
                assert proc.stdout is not None
                seen: list[FeedEvent] = []

                async def read_until(pred: Any) -> None:
                    while True:
                        line = await asyncio.wait_for(proc.stdout.readline(), 60)  # type: ignore[union-attr]
                        assert line, "curl's stream ended"
                        if line.startswith(b"data: "):
                            seen.append(decode_feed_message(line[6:].strip()))
                            if pred(seen[-1]):
                                return

                await read_until(lambda e: isinstance(e, UpToDate))
                await storage.write_data("items", {"id": 2, "name": "arrives live"})
                await read_until(lambda e: isinstance(e, Change) and e.last)
                live = seen[-1]
                assert isinstance(live, Change) and live.row is not None and live.row["name"] == "arrives live"
            finally:
                proc.send_signal(signal.SIGTERM)
                await proc.wait()

    asyncio.run(scenario())


# ---------------------------------------------------------------------- across restarts and new databases
async def test_resume_across_replicator_sigkill_loses_and_repeats_nothing(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(htpc, "feed-crash", tmp_path / "a", [ITEMS], ["items", "other"]) as (client, storage):
        await write_history(storage, 1, 100)
        await settle_agent(client, storage)
        copy = await snapshot_copy(client, "feed-crash")
        await write_history(storage, 200, 50)
        await settle_agent(client, storage)
        await catch_up(client, "feed-crash", copy)
        seen_before = list(copy.units)
        htpc.kill()
        await write_history(storage, 300, 50)  # while the HTPC is down
        htpc.start()
        await write_history(storage, 400, 50)
        await settle_agent(client, storage, timeout=60)
        await catch_up(client, "feed-crash", copy)  # Copy fails on any transaction delivered twice
        assert copy.units[: len(seen_before)] == seen_before
        assert copy.digest() == await local_digest(storage)
        # SSE from an offset taken before the crash sees the same (only) later transactions.
        replay = Copy()
        replay.rows = {}
        replay.offset = seen_before[-1]
        async with sse(client, "feed-crash", offset=seen_before[-1]) as stream:
            while (event := await stream.next()) is not None:
                replay.apply([event])
        assert replay.units == copy.units[len(seen_before) :]


def _remove_agent_db(agent_dir: Path, agent: str) -> None:
    """Delete an agent's database file and its -wal and -shm (the agent recreates it with a new epoch)."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(agent_dir / f"{agent}.db{suffix}")


async def test_must_refetch_after_the_agents_database_is_recreated(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    agent_dir = tmp_path / "a"
    async with httpx.AsyncClient(base_url=module_htpc.url, timeout=30) as client:
        async with agent_session(
            "feed-epoch", agent_dir, htpc_url=module_htpc.url, migrations=[ITEMS], visibility={"items": "always"}
        ) as first:
            await first.batch_write([{"table": "items", "data": {"id": i, "name": "old"}} for i in range(30)])
            await settle_agent(client, first)
        old = await snapshot_copy(client, "feed-epoch")
        assert len(old.rows) == 30
        _remove_agent_db(agent_dir, "feed-epoch")
        async with agent_session(
            "feed-epoch", agent_dir, htpc_url=module_htpc.url, migrations=[ITEMS], visibility={"items": "always"}
        ) as second:
            await second.batch_write([{"table": "items", "data": {"id": i, "name": "new"}} for i in range(100, 105)])
            await settle_agent(client, second)
            resp = await feed(client, "feed-epoch", offset=old.offset)
            assert resp.status_code == 409, resp.text
            (gone,) = decode_all(resp.content)
            assert isinstance(gone, MustRefetch) and gone.reason
            resp = await feed(client, "feed-epoch", offset=old.offset, live=True, timeout_ms=100)
            assert resp.status_code == 409
            async with sse(client, "feed-epoch", offset=old.offset, live=True) as stream:
                assert isinstance(await stream.next(), MustRefetch)
                assert await stream.next() is None  # and the stream ends
            fresh = await snapshot_copy(client, "feed-epoch")
            assert fresh.digest(("id", "name", "qty", "data")) == await local_digest(second)
            assert {k[0][1] for k in fresh.rows} == set(range(100, 105))


async def test_live_stream_sees_a_new_database_as_must_refetch(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    agent_dir = tmp_path / "a"
    async with httpx.AsyncClient(base_url=module_htpc.url, timeout=30) as client:
        async with agent_session(
            "feed-epoch-live", agent_dir, htpc_url=module_htpc.url, migrations=[ITEMS], visibility={"items": "always"}
        ) as first:
            await first.write_data("items", {"id": 1, "name": "old"})
            await settle_agent(client, first)
        copy = Copy()
        async with sse(client, "feed-epoch-live", live=True) as stream:
            await stream.until(copy, lambda: True)
            _remove_agent_db(agent_dir, "feed-epoch-live")
            async with agent_session(
                "feed-epoch-live",
                agent_dir,
                htpc_url=module_htpc.url,
                migrations=[ITEMS],
                visibility={"items": "always"},
            ) as second:
                await second.write_data("items", {"id": 2, "name": "new"})
                event = await asyncio.wait_for(stream.next(), 60)
                while isinstance(event, UpToDate):
                    event = await asyncio.wait_for(stream.next(), 60)
                assert isinstance(event, MustRefetch), event
                assert await stream.next() is None


# ---------------------------------------------------------------------- auth, the cap, shutdown
async def test_auth_any_token_reads_a_bad_one_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "htpc"
    tokens, seeds = make_credentials(data, ("feed-owner", "feed-reader"))
    htpc = HtpcProcess(data, None, extra_args=["--auth", "on"])
    htpc.start()
    try:
        info = httpx.get(f"{htpc.url}/relay/info", timeout=10).json()
        async with agent_session(
            "feed-owner",
            tmp_path / "owner",
            htpc_url=htpc.url,
            nats_url=info["nats_url"],
            migrations=[ITEMS],
            visibility={"items": "always"},
            nats_seed_file=seeds["feed-owner"],
            htpc_token=tokens["feed-owner"],
        ) as storage:
            await storage.write_data("items", {"id": 1, "name": "shared"})
            async with httpx.AsyncClient(
                base_url=htpc.url, timeout=30, headers={"Authorization": f"Bearer {tokens['ops']}"}
            ) as ops:
                await settle_agent(ops, storage)
            params = {"agent": "feed-owner", "table": "items"}
            for who in ("feed-reader", "feed-owner", "ops"):
                resp = httpx.get(
                    f"{htpc.url}/relay/changes", params=params, headers={"Authorization": f"Bearer {tokens[who]}"}
                )
                assert resp.status_code == 200, (who, resp.text)
                copy = Copy()
                copy.apply(decode_all(resp.content))
                assert copy.digest() == await local_digest(storage)
            for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Bearer"}):
                for extra in ({}, SSE):
                    resp = httpx.get(f"{htpc.url}/relay/changes", params=params, headers={**headers, **extra})
                    assert resp.status_code == 401 and resp.json()["error"] == "unauthorized", resp.text
    finally:
        htpc.close()


async def test_subscriber_cap_and_shutdown_with_open_streams(htpc_factory: Any, tmp_path: Path) -> None:
    htpc: HtpcProcess = htpc_factory(None, extra_args=["--feed-max-subscribers", "2"])
    htpc.start()
    async with client_and_agent(htpc, "feed-cap", tmp_path / "a", [ITEMS], ["items"]) as (client, storage):
        await storage.write_data("items", {"id": 1})
        await settle_agent(client, storage)
        async with sse(client, "feed-cap", live=True) as one, sse(client, "feed-cap", live=True) as two:
            for stream in (one, two):
                await stream.until(Copy(), lambda: True)
            resp = await client.get(
                "/relay/changes", params={"agent": "feed-cap", "table": "items", "live": "true"}, headers=SSE
            )
            assert resp.status_code == 503 and resp.json()["error"] == "too_many_subscribers"
            assert resp.headers.get("retry-after")
            metrics = (await client.get("/metrics")).text
            assert "replicator_feed_subscribers 2.0" in metrics and "replicator_feed_refused_total 1.0" in metrics
            # SIGTERM with both streams open: they end, the service stops cleanly (exit 0).
            await asyncio.to_thread(htpc.stop)
            for stream in (one, two):
                with contextlib.suppress(httpx.HTTPError):
                    while await asyncio.wait_for(stream.next(), 30) is not None:
                        pass


async def test_relay_tables_have_a_feed_too(module_htpc: HtpcProcess) -> None:
    async with httpx.AsyncClient(base_url=module_htpc.url, timeout=30) as client:

        async def relay(records: list[dict[str, Any]]) -> None:
            resp = await client.post("/relay/batch", json={"agent_id": "feed-relay", "records": records})
            assert resp.status_code == 202, resp.text

        async def has(table: str, count: int) -> bool:
            q = {"agent_id": "feed-relay", "query": f"SELECT count(*) FROM {table}"}
            resp = await client.post("/relay/query", json=q)
            return resp.status_code == 200 and resp.json()["rows"] == [[count]]

        await relay([{"table": "notes", "data": {"id": i, "text": f"t{i}"}} for i in range(5)])
        await relay([{"table": "log", "data": {"line": f"l{i}"}} for i in range(3)])  # no primary key
        await apoll(lambda: has("notes", 5), 20, "relay rows applied")
        await apoll(lambda: has("log", 3), 20, "relay rows applied")
        notes, log = Copy(), Copy()
        notes.apply(decode_all((await feed(client, "feed-relay", "notes")).content))
        log.apply(decode_all((await feed(client, "feed-relay", "log")).content))
        assert notes.schema is not None and notes.schema.pk == ("id",) and len(notes.rows) == 5
        assert log.schema is not None and log.schema.pk == () and all(k[0][0] == "rowid" for k in log.rows)
        await relay([{"table": "notes", "data": {"id": 1, "text": "changed"}}, {"table": "notes", "data": {"id": 9}}])
        await relay([{"table": "log", "data": {"line": "l3"}}])
        await apoll(lambda: has("log", 4), 20, "relay rows applied")
        resp = await feed(client, "feed-relay", "notes", offset=notes.offset)
        events = decode_all(resp.content)
        assert [(e.op, dict(e.key)) for e in events if isinstance(e, Change)] == [
            ("update", {"id": 1}),
            ("insert", {"id": 9}),
        ]
        notes.apply(events)
        await catch_up(client, "feed-relay", log, "log")
        answer = await client.post(
            "/relay/query", json={"agent_id": "feed-relay", "query": "SELECT id, text FROM notes"}
        )
        assert rows_digest([tuple(r) for r in answer.json()["rows"]]) == notes.digest(("id", "text"))
        answer = await client.post(
            "/relay/query", json={"agent_id": "feed-relay", "query": "SELECT rowid, line FROM log"}
        )
        assert sorted(tuple(r) for r in answer.json()["rows"]) == sorted(
            (k[0][1], row["line"]) for k, row in log.rows.items()
        )
