"""The agent's side of a resync, over a real nats-server: the request on `agents.<id>.query`, the reply, the
log it leaves, idempotency, and a publisher stuck on an unsendable change set free by it."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson

from agent_client import (
    AgentStorage,
    ChangeRecord,
    FlushTimeout,
    query_subject,
)
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import (
    assert_rows_identical,
    create_tables,
    flatten,
    local_rows,
    read_agent_statuses,
    read_agent_stream,
    replay,
    set_max_msg_size,
    storage,
    wait_until,
)

AGENT = "agent-1"
SCHEMA = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB, note TEXT)",
    "CREATE TABLE od (k TEXT PRIMARY KEY, n INTEGER)",
    "CREATE TABLE p (k TEXT PRIMARY KEY, secret TEXT)",
)


@contextlib.asynccontextmanager
async def client(url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, name="test-htpc")
    try:
        yield nc
    finally:
        await nc.close()


async def ask(nc: nats.NATS, request: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """A request on the agent's query subject, as the HTPC sends it (retried until the agent has subscribed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            msg = await nc.request(query_subject(AGENT), orjson.dumps(request), timeout=timeout)
        except nats.errors.NoRespondersError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        reply: dict[str, Any] = orjson.loads(msg.data)
        return reply


def resync_request(request_id: str) -> dict[str, Any]:
    return {"control": "resync", "request_id": request_id}


async def setup(st: AgentStorage) -> None:
    await create_tables(st, *SCHEMA, always=["t"])
    await st.set_visibility("od", "on_demand")
    await st.set_visibility("p", "private")
    await st.batch_write(
        [{"table": "t", "data": {"id": i, "body": bytes([i]) * i, "note": f"n{i}"}} for i in range(20)]
    )
    await st.write_data("od", {"k": "a", "n": 1})
    await st.write_data("p", {"k": "k", "secret": "never leaves"})


def resync_records(messages: list[Any], request_id: str) -> list[ChangeRecord]:
    return [m.record for m in messages if m.record.resync_request == request_id]


async def test_resync_is_served_once_per_request_id(nats_server: NatsServer, tmp_path: Path) -> None:
    request_id = secrets.token_hex(16)
    async with storage(tmp_path, nats_server.url) as st, client(nats_server.url) as nc:
        await setup(st)
        await st.flush()
        before = await st.last_committed_seq()
        reply = await ask(nc, resync_request(request_id))
        assert reply == {"resync": "accepted", "request_id": request_id, "at_seq": before + 1}
        await st.flush()
        after = await st.last_committed_seq()
        # the same request again: the same answer, nothing new in the log
        assert await ask(nc, resync_request(request_id)) == reply
        assert await st.last_committed_seq() == after
        # a normal query still works next to the controls
        answer = await ask(nc, {"query": "SELECT count(*) AS n FROM t"})
        assert answer["rows"] == [[20]]
        await st.write_data("t", {"id": 100, "note": "after the resync"})
        await st.flush()
        epoch, db_path = st.epoch, st.db_path
    # the request id survives a restart: still the same answer, still no new work
    async with storage(tmp_path, nats_server.url) as st, client(nats_server.url) as nc:
        last = await st.last_committed_seq()
        assert await ask(nc, resync_request(request_id)) == reply
        assert await st.last_committed_seq() == last

    messages = await read_agent_stream(nats_server.url, AGENT)
    records = resync_records(messages, request_id)
    assert len(records) == 1, "one resync record per request id"
    rec = records[0]
    assert (rec.epoch, rec.first_seq) == (epoch, before + 1)
    ops = [(op, rec.layouts[str(lid)].table if op != "R" else None) for _s, op, lid, _v in rec.changes]
    assert ops == [("R", None), ("V", "od"), ("S", "t")] + [("U", "t")] * 20
    assert rec.final
    changes = flatten(messages)
    assert all(c.table != "p" for c in changes), "a private table reached the wire"
    assert_rows_identical(replay(changes)["t"], local_rows(db_path, "t"))


async def test_controls_the_agent_does_not_understand_are_answered_with_an_error(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st, client(nats_server.url) as nc:
        await setup(st)
        await st.flush()
        last = await st.last_committed_seq()
        for bad in ("", "0" * 31, "G" * 32, None, 12):
            reply = await ask(nc, {"control": "resync", "request_id": bad})
            assert reply["error"] == "invalid_request" and "32 lowercase hex" in reply["message"]
        reply = await ask(nc, {"control": "drop-everything"})
        assert reply["error"] == "unknown_control"
        reply = await ask(nc, {"control": ["resync"]})
        assert reply["error"] == "unknown_control"
        assert await st.last_committed_seq() == last, "a refused control changed the log"


async def test_a_publisher_stuck_on_an_unsendable_change_is_freed_by_fixing_the_row_and_a_resync(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await set_max_msg_size(nats_server.url, 64 * 1024)
    request_id = secrets.token_hex(16)
    async with storage(tmp_path, nats_server.url) as st, client(nats_server.url) as nc:
        await setup(st)
        await st.flush()
        acked = st.acked_seq
        assert acked is not None
        await st.write_data("t", {"id": 7, "body": secrets.token_bytes(100_000)})  # one change: too large
        big = await st.last_committed_seq()
        await st.write_data("t", {"id": 8, "note": "behind the block"})

        async def blocked() -> dict[str, Any] | None:
            health = await st.health_check()
            return health if health["blocked"] else None

        await wait_until(blocked, timeout=15, what="health_check to report the publisher blocked")
        health = await st.health_check()
        assert f"change {big} (table t)" in health["blocked"] and "bytes" in health["blocked"]
        assert isinstance(health["blocked_since"], float)
        assert health["acked_seq"] == acked and health["backlog"]["changes"] == 2
        assert health["log_bytes"] > 100_000
        try:
            await st.flush(timeout=0.5)
            raise AssertionError("flush succeeded while blocked")
        except FlushTimeout:
            pass

        # the HTPC hears about it: a status record that says why
        async def blocked_status() -> Any:
            statuses = await read_agent_statuses(nats_server.url, AGENT)
            return [s for s in statuses if s.record.blocked]

        reports = await _eventually(blocked_status, "a status record saying the agent is blocked")
        report = reports[0].record
        assert report.blocked == health["blocked"]
        assert (report.acked_seq, report.epoch) == (acked, st.epoch)
        assert report.last_seq in (big, big + 1)  # the block may be reported before the write behind it commits
        assert report.log_bytes > 100_000

        # fixing the row alone does not help: the change is still ahead in the log
        await st.write_data("t", {"id": 7, "body": b"small now"})
        assert (await st.health_check())["blocked"]

        reply = await ask(nc, resync_request(request_id))
        assert reply["resync"] == "accepted" and reply["at_seq"] == big + 3
        await st.flush(timeout=15)
        health = await st.health_check()
        assert health["blocked"] is None and health["blocked_since"] is None
        assert health["backlog"]["changes"] == 0

        async def cleared_status() -> Any:
            statuses = await read_agent_statuses(nats_server.url, AGENT)
            seen_block = False
            for s in statuses:
                seen_block = seen_block or bool(s.record.blocked)
                if seen_block and s.record.blocked is None:
                    return s
            return None

        cleared = await _eventually(cleared_status, "a status record saying the block is over")
        assert cleared.record.acked_seq >= reply["at_seq"]
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    published = {c.seq for c in flatten(messages)}
    assert big not in published and big + 1 not in published and big + 2 not in published
    assert resync_records(messages, request_id)
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))


async def test_writes_during_resyncs_are_neither_lost_nor_doubled(nats_server: NatsServer, tmp_path: Path) -> None:
    """Writers keep committing while resyncs are served; the stream replayed as the HTPC does equals the table."""
    async with storage(tmp_path, nats_server.url, max_record_bytes=4096) as st, client(nats_server.url) as nc:
        await setup(st)
        stop = asyncio.Event()

        async def writer(offset: int) -> None:
            i = 0
            while not stop.is_set():
                await st.write_data("t", {"id": offset + i % 50, "note": f"w{offset}.{i}"})
                if i % 7 == 0:
                    async with st.transaction() as tx:
                        await tx.execute("DELETE FROM t WHERE id = ?", (offset + (i * 3) % 50,))
                i += 1
                await asyncio.sleep(0.001)

        tasks = [asyncio.create_task(writer(k * 1000)) for k in range(1, 3)]
        served = []
        for _ in range(3):
            await asyncio.sleep(0.15)
            served.append(await ask(nc, resync_request(secrets.token_hex(16))))
        stop.set()
        await asyncio.gather(*tasks)
        assert all(r["resync"] == "accepted" for r in served)
        assert [r["at_seq"] for r in served] == sorted({r["at_seq"] for r in served})
        await st.flush(timeout=20)
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    for r in served:
        assert resync_records(messages, r["request_id"]), f"resync {r['request_id']} never reached the stream"
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))


async def _eventually(fn: Any, what: str, timeout: float = 15.0) -> Any:
    result: Any = None

    async def check() -> bool:
        nonlocal result
        result = await fn()
        return bool(result)

    await wait_until(check, timeout=timeout, interval=0.1, what=what)
    return result
