"""Threads of idle agents (agent_client/_sqlite_thread.py, local_store.py): a connection's thread ends while idle
and comes back on demand; a reader connection exists only once it is used. Real SQLite files."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from agent_client._sqlite_thread import SQLiteThread
from agent_client.local_store import connect, reader_connection


async def wait_idle(conn: SQLiteThread) -> None:
    for _ in range(500):
        if not conn.thread_alive:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the idle thread never ended")


def thread_names() -> list[str]:
    return [t.name for t in threading.enumerate()]


async def test_an_idle_thread_ends_and_the_next_call_starts_another(tmp_path: Path) -> None:
    db = tmp_path / "idle.db"
    conn = await SQLiteThread(lambda: connect(db, check_same_thread=False), name="idle-test", idle_exit_s=0.05).open()
    try:
        await conn.call(lambda c: c.execute("CREATE TABLE t (x)"))
        await wait_idle(conn)
        assert "idle-test" not in thread_names()
        for i in range(3):  # the same connection, used by a new thread after each idle spell
            await conn.call(lambda c, i=i: c.execute("INSERT INTO t VALUES (?)", (i,)))
            await wait_idle(conn)
        assert await conn.call(lambda c: [r[0] for r in c.execute("SELECT x FROM t")]) == [0, 1, 2]
        assert conn.threads_started >= 4
        assert await conn.call(lambda c: threading.get_ident()) != threading.get_ident()
    finally:
        await conn.close()
    await wait_idle(conn)


async def test_many_calls_racing_the_idle_exit_all_run(tmp_path: Path) -> None:
    db = tmp_path / "race.db"
    conn = await SQLiteThread(lambda: connect(db, check_same_thread=False), name="race-test", idle_exit_s=0.001).open()
    try:
        await conn.call(lambda c: c.execute("CREATE TABLE t (x)"))
        for i in range(200):
            await conn.call(lambda c, i=i: c.execute("INSERT INTO t VALUES (?)", (i,)))
            if i % 7 == 0:
                await asyncio.sleep(0.002)
        assert await conn.call(lambda c: c.execute("SELECT count(*), sum(x) FROM t").fetchone()) == (200, 19900)
    finally:
        await conn.close()


async def test_a_reader_connection_opens_nothing_until_used(tmp_path: Path) -> None:
    db = tmp_path / "lazy.db"
    setup = sqlite3.connect(db, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.execute("CREATE TABLE t (x)")
    setup.execute("INSERT INTO t VALUES (42)")
    setup.close()
    reader = reader_connection(db)
    assert not reader.thread_alive and reader.threads_started == 0
    try:
        assert await reader.call(lambda c: c.execute("SELECT x FROM t").fetchone()[0]) == 42
        assert reader.threads_started == 1
    finally:
        await reader.close()
    unused = reader_connection(db)
    await unused.close()  # closing one never used opens nothing
    assert unused.threads_started == 1  # (the close itself ran on a short-lived thread)
