"""One thread owning one sqlite3.Connection (agent_client/_sqlite_thread.py), driven from asyncio."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from pathlib import Path

import pytest

from agent_client._sqlite_thread import SQLiteThread


def connect(path: Path) -> SQLiteThread:
    return SQLiteThread(lambda: sqlite3.connect(path, isolation_level=None), name="test-sqlite")


async def test_calls_run_in_order_on_one_thread_that_is_not_the_loops(tmp_path: Path) -> None:
    conn = await connect(tmp_path / "a.db").open()
    try:
        await conn.call(lambda c: c.execute("CREATE TABLE t (x)"))

        def insert(c: sqlite3.Connection, i: int) -> int:
            c.execute("INSERT INTO t VALUES (?)", (i,))
            return threading.get_ident()

        threads = await asyncio.gather(*(conn.call(functools.partial(insert, i=i)) for i in range(20)))
        assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
        assert await conn.call(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY rowid")]) == list(range(20))
    finally:
        await conn.close()


async def test_a_failure_reaches_the_caller_and_the_connection_goes_on(tmp_path: Path) -> None:
    conn = await connect(tmp_path / "a.db").open()
    try:
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await conn.call(lambda c: c.execute("SELECT * FROM missing"))
        with pytest.raises(ZeroDivisionError):
            await conn.call(lambda c: 1 // 0)
        assert await conn.call(lambda c: c.execute("SELECT 7").fetchone()[0]) == 7
    finally:
        await conn.close()


async def test_a_cancelled_caller_does_not_break_the_thread(tmp_path: Path) -> None:
    conn = await connect(tmp_path / "a.db").open()
    gate = threading.Event()
    try:
        slow = asyncio.ensure_future(conn.call(lambda c: gate.wait(10)))
        await asyncio.sleep(0)
        slow.cancel()
        gate.set()
        assert await conn.call(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
        assert slow.cancelled()
    finally:
        await conn.close()


async def test_close_closes_the_connection_and_later_calls_fail(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    conn = await SQLiteThread(lambda: sqlite3.connect(path, check_same_thread=False)).open()
    inner: list[sqlite3.Connection] = []
    await conn.call(inner.append)
    await conn.close()
    await conn.close()  # idempotent
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        inner[0].execute("SELECT 1")
    with pytest.raises(ValueError, match="closed"):
        await conn.call(lambda c: c.execute("SELECT 1"))


async def test_a_connect_failure_is_raised_by_open(tmp_path: Path) -> None:
    conn = SQLiteThread(lambda: sqlite3.connect(tmp_path / "no" / "such" / "dir.db"))
    with pytest.raises(sqlite3.OperationalError):
        await conn.open()
    with pytest.raises(ValueError, match="closed"):
        await conn.call(lambda c: None)
