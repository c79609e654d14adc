"""The publisher wakes on commits, not on a clock: idle agents cost next to nothing, other processes' writes
are still captured, and packing a record with one dumps gives the bytes and cuts of change-by-change packing.

Real nats-server, real SQLite files; another process writes with Python's own sqlite3 module.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson

from agent_client import AgentStorage
from agent_client.publisher import Publisher
from tests.support.nats_server import NatsServer, free_port
from tests.support.stream_reader import (
    assert_exactly_once,
    assert_rows_identical,
    create_tables,
    flatten,
    local_rows,
    read_agent_stream,
    replay,
    storage,
    wait_until,
)

AGENT = "agent-1"

_EXTERNAL_WRITER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
conn.execute("PRAGMA busy_timeout = 10000")
conn.execute("BEGIN IMMEDIATE")
for i in range(int(sys.argv[2]), int(sys.argv[2]) + 3):
    conn.execute("INSERT INTO t (id, v) VALUES (?, ?)", (i, f"from another process {i}"))
conn.execute("COMMIT")
conn.close()
"""


def _publisher(st: AgentStorage) -> Publisher:
    pub = st._publisher
    assert pub is not None
    return pub


def _last_seq(db_path: Path) -> int:
    conn = sqlite3.connect(db_path)
    try:
        return int(conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'").fetchone()[0])
    finally:
        conn.close()


def _data_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


async def test_a_write_from_another_process_is_closed_published_and_applied(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", always=["t"])
        await st.write_data("t", {"id": 1, "v": "mine"})
        await st.flush()
        pub = _publisher(st)
        closed_before = pub.groups_closed
        for start in (100, 200):  # two transactions of another process, each while the agent is idle
            await asyncio.to_thread(
                subprocess.run, [sys.executable, "-c", _EXTERNAL_WRITER, str(st.db_path), str(start)], check=True
            )
            last = _last_seq(st.db_path)
            # nobody in this process committed: only the change signal can make the publisher look
            await wait_until(lambda: pub.acked_seq >= last, timeout=15, what="the other process's rows published")  # noqa: B023
        assert pub.groups_closed - closed_before >= 1, "the publisher closed the group the other process left open"
        await st.write_data("t", {"id": 2, "v": "mine again"})
        await st.flush()
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    replicated = replay(flatten(messages))["t"]
    assert {row["id"] for row in replicated.values()} == {1, 2, 100, 101, 102, 200, 201, 202}
    assert_rows_identical(replicated, local_rows(db_path, "t"))
    # each of the other process's transactions arrived whole, in one record of its own
    external = [m for m in messages if any(c[3] and c[3][0] in (100, 200) for c in m.record.changes)]
    assert [[c[3][0] for c in m.record.changes] for m in external] == [[100, 101, 102], [200, 201, 202]]


async def test_an_idle_agent_neither_polls_the_log_nor_writes(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", always=["t"])
        for i in range(20):
            await st.write_data("t", {"id": i, "v": "x"})
        await st.flush()
        pub = _publisher(st)
        # Let it settle: the last trim (about a second after the last PubAck), the read its commit causes, and the
        # one the change signal causes after it (an own commit moves the signal too). Settled: two looks at the
        # signal in a row with no read between them.
        await wait_until(lambda: pub.trims > 0 and pub._trimmed_seq == pub.acked_seq, timeout=10, what="a trim")
        for _ in range(20):
            seen = (pub.loop_reads + pub.thread_reads, pub.trims)
            checks = pub.signal_checks
            await wait_until(lambda: pub.signal_checks >= checks + 2, timeout=10, what="two looks at the signal")  # noqa: B023
            if (pub.loop_reads + pub.thread_reads, pub.trims) == seen:
                break
        outside = sqlite3.connect(st.db_path)
        try:
            version = _data_version(outside)
            rounds, reads = pub.rounds, pub.loop_reads + pub.thread_reads
            checks = pub.signal_checks
            await asyncio.sleep(2.0)
            assert _data_version(outside) == version, "an idle agent committed something (closing groups, trimming)"
        finally:
            outside.close()
        assert pub.loop_reads + pub.thread_reads == reads, "an idle agent read its log"
        assert pub.signal_checks > checks, "the change signal is looked at (writes of other processes)"
        # the change signal every 0.5 s: about 4 rounds in 2 s (the 50 ms poll this replaced made 40)
        assert pub.rounds - rounds <= 10, f"{pub.rounds - rounds} rounds in 2 s while idle"


async def test_one_dumps_per_record_gives_the_bytes_and_cuts_of_change_by_change_packing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    max_bytes = 2048
    async with storage(tmp_path, nats_server.url, max_record_bytes=max_bytes) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n REAL, b BLOB)", always=["t"])
        for i in range(30):  # one change per record
            await st.write_data("t", {"id": i, "v": f"row {i}", "n": i / 3, "b": bytes([i])})
        # a group that fits one record; one that must be cut by size; one past the one-dumps bound
        await st.batch_write([{"table": "t", "data": {"id": 1000 + i, "v": "s"}} for i in range(10)])
        await st.batch_write([{"table": "t", "data": {"id": 2000 + i, "v": "L" * (i * 7)}} for i in range(60)])
        await st.batch_write([{"table": "t", "data": {"id": 10_000 + i, "n": float(i)}} for i in range(1500)])
        async with st.transaction() as tx:
            await tx.execute("UPDATE t SET v = 'u' WHERE id < 1010")
        await st.flush(timeout=30)
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))
    cut_by_size = 0
    for i, m in enumerate(messages):
        changes = orjson.loads(m.data)["changes"]
        parts = [orjson.dumps(c) for c in changes]
        # the same bytes as encoding change by change and joining
        assert m.data.endswith(b'"changes":[' + b",".join(parts) + b"]}"), f"record {i}"
        size = sum(len(p) + 1 for p in parts)
        assert len(parts) == 1 or size <= max_bytes, f"record {i} is {size} bytes"
        if not m.record.final:  # cut exactly where the next change would not fit
            nxt = orjson.dumps(orjson.loads(messages[i + 1].data)["changes"][0])
            assert size + len(nxt) + 1 > max_bytes, f"record {i} was cut early"
            cut_by_size += 1
    assert cut_by_size >= 10


async def test_a_backlog_read_ahead_on_the_thread_keeps_every_group_whole(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """A backlog is read on the reader thread, the next batch read while the last is sent; reads end mid-group
    (read_batch 64, groups of 100), and every group still goes out as one record, in order, exactly once."""
    dead_url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: the agent logs offline
    async with storage(tmp_path, dead_url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n REAL)", always=["t"])
        for b in range(30):
            await st.batch_write(
                [{"table": "t", "data": {"id": b * 100 + k, "v": f"b{b}", "n": k / 7}} for k in range(100)]
            )
            await st.write_data("t", {"id": 100_000 + b, "v": "single"})
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    async with storage(tmp_path, nats_server.url) as st:
        pub = _publisher(st)
        pub.read_batch = 64  # set before the publisher's first round (it has not run yet)
        await st.flush(timeout=60)
        assert pub.thread_reads >= 30 and pub.records_published >= 60
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))
    sizes = [len(m.record.changes) for m in messages]
    assert sizes[-60:] == [100, 1] * 30, sizes[-60:]
