"""Small writes commit on the caller's event loop (agent_client/local_store.py's fast path), safely.

Real SQLite files; a second plain sqlite3 connection plays "another process" (it takes the same file locks).
Every test checks data: rows in the table, rows in the change log and their transaction groups.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import AgentStorage, ConstraintViolation, InvalidRow, Migration, change_log
from agent_client.local_store import CHECKPOINT_EVERY

AGENT = "fast-1"
SCHEMA = [
    Migration(
        1,
        "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER CHECK (qty >= 0), note TEXT)",
    ),
    Migration(2, "CREATE TABLE kv (k TEXT PRIMARY KEY, v)"),
]


@pytest.fixture
async def st(tmp_path: Path) -> AsyncIterator[AgentStorage]:
    storage = AgentStorage(AGENT, tmp_path, replicate=False)
    await storage.open()
    await storage.migrate(SCHEMA)
    await storage.set_visibility("items", "always")
    try:
        yield storage
    finally:
        await storage.close()


def other(db: Path) -> sqlite3.Connection:
    """Another connection to the agent's file, as another process would open it."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = other(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def clock(db: Path) -> int:
    return int(rows(db, "SELECT tx FROM _cr_clock WHERE id = 1")[0][0])


def log_rows(db: Path) -> list[tuple[Any, ...]]:
    """(seq, tx, op, v0) of every change logged for `items` (layout of the table: v0 is the id)."""
    return rows(db, "SELECT seq, tx, op, v0 FROM _cr_log WHERE op IN ('U', 'D') ORDER BY seq")


async def test_a_write_commits_on_the_loop_and_is_captured_in_a_closed_group(st: AgentStorage) -> None:
    store = st._store
    before = store.fast_commits
    assert await st.write_data("items", {"name": "a", "qty": 1}) == 1
    assert await st.batch_write([{"table": "items", "data": {"id": i, "name": f"n{i}", "qty": i}} for i in (2, 3)])
    assert store.fast_commits == before + 2
    assert rows(st.db_path, "SELECT id, name, qty FROM items ORDER BY id") == [(1, "a", 1), (2, "n2", 2), (3, "n3", 3)]
    logged = log_rows(st.db_path)
    assert [r[3] for r in logged] == [1, 2, 3]
    # every logged row is in a closed group (stamp below the clock), the batch in one group, the write in another
    assert all(r[1] < clock(st.db_path) for r in logged)
    assert logged[1][1] == logged[2][1] != logged[0][1]
    # a point read is answered on the loop connection (no thread hop), and sees the newest commit
    newest = rows(st.db_path, "SELECT max(seq) FROM _cr_log")[0][0]
    assert store.try_read(change_log.last_committed_seq) == (True, newest)
    assert await st.last_committed_seq() == newest
    assert await asyncio.to_thread(store.try_read, change_log.last_committed_seq) == (False, None)  # not its thread


async def test_a_busy_database_falls_back_to_the_writer_and_loses_nothing(st: AgentStorage) -> None:
    store = st._store
    blocker = other(st.db_path)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        blocker.execute("INSERT INTO items (id, name, qty) VALUES (100, 'other process', 0)")
        fallbacks = store.fallbacks
        write = asyncio.create_task(st.write_data("items", {"id": 1, "name": "mine", "qty": 5}))
        batch = asyncio.create_task(st.batch_write([{"table": "items", "data": {"id": 2, "name": "b", "qty": 2}}]))
        await asyncio.sleep(0.2)
        assert not write.done() and not batch.done()  # waiting for the lock on the writer thread, loop free
        assert store.fallbacks == fallbacks + 2
        blocker.execute("COMMIT")
        assert await write == 1
        assert await batch == [2]
    finally:
        blocker.close()
    assert rows(st.db_path, "SELECT id, name FROM items ORDER BY id") == [(1, "mine"), (2, "b"), (100, "other process")]
    assert sorted(r[3] for r in log_rows(st.db_path)) == [1, 2, 100]
    assert all(r[1] < clock(st.db_path) for r in log_rows(st.db_path))
    # and the fast path is back once the lock is free
    commits = store.fast_commits
    await st.write_data("items", {"id": 3, "name": "c", "qty": 3})
    assert store.fast_commits == commits + 1


async def test_no_fast_write_inside_an_open_transaction_of_the_same_storage(st: AgentStorage) -> None:
    async with st.transaction() as tx:
        await tx.execute("INSERT INTO items (id, name, qty) VALUES (10, 'tx', 1)")
        other_task = asyncio.create_task(st.write_data("items", {"id": 11, "name": "concurrent", "qty": 1}))
        await asyncio.sleep(0.05)
        assert not other_task.done()  # it waits for the transaction: never interleaved with it
        await tx.execute("UPDATE items SET qty = 2 WHERE id = 10")
    await other_task
    logged = log_rows(st.db_path)
    assert [r[3] for r in logged] == [10, 10, 11]  # the transaction's two changes, then the write
    assert logged[0][1] == logged[1][1] < logged[2][1] < clock(st.db_path)


async def test_a_write_from_another_thread_takes_the_writer_thread(st: AgentStorage) -> None:
    store = st._store
    commits, fallbacks = store.fast_commits, store.fallbacks

    def in_thread() -> Any:
        return asyncio.run(st.write_data("items", {"id": 7, "name": "from a thread", "qty": 7}))

    assert await asyncio.to_thread(in_thread) == 7
    assert store.fast_commits == commits and store.fallbacks == fallbacks + 1
    assert rows(st.db_path, "SELECT name FROM items WHERE id = 7") == [("from a thread",)]
    assert [r[3] for r in log_rows(st.db_path)] == [7]
    assert threading.current_thread() is threading.main_thread()


async def test_one_task_sees_its_writes_commit_in_order_whichever_path_they_take(st: AgentStorage) -> None:
    big = [{"table": "items", "data": {"id": 1000 + i, "name": "big", "qty": i}} for i in range(500)]
    await st.write_data("items", {"id": 1, "name": "first", "qty": 1})
    await st.batch_write(big)  # too large for the loop: the writer thread
    await st.write_data("items", {"id": 2, "name": "after", "qty": 1})
    ids = [r[3] for r in log_rows(st.db_path)]
    assert ids == [1, *range(1000, 1500), 2]


async def test_failed_writes_change_nothing(st: AgentStorage) -> None:
    await st.write_data("items", {"id": 1, "name": "ok", "qty": 1})
    before_rows = rows(st.db_path, "SELECT * FROM items ORDER BY id")
    before_log = log_rows(st.db_path)
    with pytest.raises(ConstraintViolation):
        await st.write_data("items", {"id": 2, "name": "bad", "qty": -1})
    with pytest.raises(ConstraintViolation):
        await st.write_data("items", {"id": 3, "qty": 1})  # name NOT NULL
    with pytest.raises(InvalidRow, match="no column"):
        await st.write_data("items", {"id": 4, "name": "x", "nope": 1})
    with pytest.raises(InvalidRow, match="64 bits"):
        await st.write_data("items", {"id": 5, "name": "x", "qty": 2**70})
    with pytest.raises(ConstraintViolation):  # all or nothing: the good rows before the bad one are gone too
        await st.batch_write(
            [
                {"table": "items", "data": {"id": 6, "name": "good", "qty": 1}},
                {"table": "kv", "data": {"k": "a", "v": 1}},
                {"table": "items", "data": {"id": 7, "name": "bad", "qty": -5}},
            ]
        )
    assert rows(st.db_path, "SELECT * FROM items ORDER BY id") == before_rows
    assert rows(st.db_path, "SELECT count(*) FROM kv") == [(0,)]
    assert log_rows(st.db_path) == before_log
    # the loop connection is not left inside a transaction: the next write commits
    await st.write_data("items", {"id": 8, "name": "next", "qty": 8})
    assert [r[3] for r in log_rows(st.db_path)] == [1, 8]


async def test_the_wal_stays_bounded_under_sustained_fast_writes(st: AgentStorage) -> None:
    store = st._store
    wal = st.db_path.with_name(st.db_path.name + "-wal")
    commits, fallbacks = store.fast_commits, store.fallbacks
    writes = CHECKPOINT_EVERY * 24
    for i in range(writes):
        await st.write_data("items", {"id": i, "name": "x" * 200, "qty": i})
    # nearly all on the loop connection, which never checkpoints (the few others waited for a checkpoint's end)
    assert store.fast_commits - commits + store.fallbacks - fallbacks == writes
    assert store.fast_commits - commits > writes * 0.9
    # Without checkpoints the WAL would hold every page written (~4 per commit: ~100 MB here); with them it
    # starts over every CHECKPOINT_EVERY commits (~4 MB), or a few rounds later if a reader was in the way.
    size = wal.stat().st_size
    assert size < 32 * 1024 * 1024, size
    assert rows(st.db_path, "SELECT count(*), sum(qty) FROM items") == [(writes, writes * (writes - 1) // 2)]


async def test_a_schema_change_by_another_connection_is_seen_by_the_next_write(st: AgentStorage) -> None:
    await st.write_data("kv", {"k": "a", "v": 1})
    ext = other(st.db_path)
    try:
        ext.execute("ALTER TABLE kv ADD COLUMN extra TEXT")
        await st.write_data("kv", {"k": "b", "v": 2, "extra": "new column"})
        ext.execute("ALTER TABLE kv DROP COLUMN extra")
        with pytest.raises(InvalidRow, match="no column"):
            await st.write_data("kv", {"k": "c", "v": 3, "extra": "gone"})
        # the table replaced by one whose key is an INTEGER PRIMARY KEY: the key is now SQLite's to assign
        ext.execute("DROP TABLE kv")
        ext.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v)")
        assert await st.write_data("kv", {"v": "auto"}) == 1
        # and back to a text key: a missing key is generated again (not a NULL key)
        ext.execute("DROP TABLE kv")
        ext.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v)")
        key = await st.write_data("kv", {"v": "uuid"})
        assert isinstance(key, str) and len(key) == 32
    finally:
        ext.close()
    assert rows(st.db_path, "SELECT k, v FROM kv") == [(key, "uuid")]


async def test_close_group_closes_what_another_process_logged(st: AgentStorage) -> None:
    ext = other(st.db_path)
    try:
        ext.execute("INSERT INTO items (id, name, qty) VALUES (50, 'shell', 1)")
    finally:
        ext.close()
    (logged,) = log_rows(st.db_path)
    assert logged[1] == clock(st.db_path)  # open: the other process closes no group
    await st._store.close_group()
    assert logged[1] < clock(st.db_path)
    assert log_rows(st.db_path) == [logged]


async def test_a_write_loop_does_not_starve_the_other_tasks(st: AgentStorage) -> None:
    """The fast path never awaits; writes back to back still let the loop run other tasks now and then."""
    turns = 0
    stop = False

    async def other_task() -> None:
        nonlocal turns
        while not stop:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    started = turns
    commits = st._store.fast_commits
    writes = CHECKPOINT_EVERY - 10  # no checkpoint in between (a write waiting for one would yield anyway)
    st._store._fast_commits = 0
    for i in range(writes):
        await st.write_data("items", {"id": i, "name": "n", "qty": i})
    during = turns - started
    stop = True
    await task
    assert st._store.fast_commits - commits == writes
    assert during > 0  # ~0 without the yields: the loop never ran the other task while the writes went on
