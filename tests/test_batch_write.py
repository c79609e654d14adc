"""batch_write writes runs of same-shaped rows with one executemany: keys, atomicity and capture must not change."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_client import AgentStorage, ConstraintViolation, InvalidRow, Migration
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import assert_exactly_once, flatten, read_agent_stream

SCHEMA = [
    Migration(
        1,
        "CREATE TABLE a (id INTEGER PRIMARY KEY, v TEXT UNIQUE);"
        "CREATE TABLE b (id TEXT PRIMARY KEY, v TEXT);"
        "CREATE TABLE c (x INTEGER, y INTEGER, v TEXT, PRIMARY KEY (x, y));",
    )
]


async def test_keys_returned_for_every_kind_of_primary_key(tmp_path: Path, nats_server: NatsServer) -> None:
    async with AgentStorage("batcher", tmp_path, nats_url=nats_server.url) as st:
        await st.migrate(SCHEMA)
        for table in ("a", "b", "c"):
            await st.set_visibility(table, "always")
        assert await st.batch_write([{"table": "a", "data": {"v": f"r{i}"}} for i in range(5)]) == [1, 2, 3, 4, 5]
        await st.write_data("a", {"id": 100, "v": "hundred"})
        await st.write_data("a", {"id": 3, "v": "three"})  # an update, not a new key
        assert await st.batch_write([{"table": "a", "data": {"v": f"s{i}"}} for i in range(3)]) == [101, 102, 103]
        uuids = await st.batch_write([{"table": "b", "data": {"v": f"t{i}"}} for i in range(3)])
        stored = {r["id"]: r["v"] for r in await st.query_local("SELECT id, v FROM b")}
        assert [stored[k] for k in uuids] == ["t0", "t1", "t2"]
        assert await st.batch_write([{"table": "c", "data": {"x": 1, "y": i, "v": "z"}} for i in range(3)]) == [
            (1, 0),
            (1, 1),
            (1, 2),
        ]
        mixed = [
            {"table": "a", "data": {"id": 7, "v": "seven"}},
            {"table": "a", "data": {"id": 8, "v": "eight"}},
            {"table": "b", "data": {"id": "k", "v": "kay"}},
            {"table": "a", "data": {"v": "auto"}},
        ]
        assert (await st.batch_write(mixed))[:3] == [7, 8, "k"]
        before = await st.query_local("SELECT * FROM a ORDER BY id")
        with pytest.raises(ConstraintViolation):
            await st.batch_write([{"table": "a", "data": {"v": "new"}}, {"table": "a", "data": {"v": "r0"}}])
        with pytest.raises(InvalidRow):
            await st.batch_write(
                [{"table": "a", "data": {"v": "x", "nope": 1}}, {"table": "a", "data": {"v": "y", "nope": 2}}]
            )
        assert await st.query_local("SELECT * FROM a ORDER BY id") == before  # all or nothing
        await st.flush(timeout=10)
        last = await st.last_committed_seq()
        epoch = st.epoch
    messages = await read_agent_stream(nats_server.url, "batcher")
    assert_exactly_once(messages, "batcher", epoch, last)
    upserts = [c for c in flatten(messages) if c.op == "U" and c.layout.table == "a"]
    assert [c.values[1] for c in upserts[:5]] == ["r0", "r1", "r2", "r3", "r4"]
    by_index: dict[int, list[int]] = {}
    for change in flatten(messages):
        by_index.setdefault(change.record_index, []).append(change.seq)
    # the five-row batch is one transaction: all its changes are in a single record
    first_batch = [c.seq for c in upserts[:5]]
    assert any(set(first_batch) <= set(seqs) for seqs in by_index.values())


async def test_transaction_exactly_one_read_batch_long_is_published(tmp_path: Path, nats_server: NatsServer) -> None:
    """Regression: a group ending exactly at the publisher's read limit (5,000 rows) used to wait for the next write."""
    async with AgentStorage("exact", tmp_path, nats_url=nats_server.url) as st:
        await st.migrate(SCHEMA)
        await st.set_visibility("a", "always")
        await st.flush(timeout=10)
        await st.batch_write([{"table": "a", "data": {"v": f"v{i}"}} for i in range(5000)])
        await st.flush(timeout=15)
        last = await st.last_committed_seq()
        epoch = st.epoch
    messages = await read_agent_stream(nats_server.url, "exact")
    assert_exactly_once(messages, "exact", epoch, last)
