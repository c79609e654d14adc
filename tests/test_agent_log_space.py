"""The local change log's disk: its size is reported, and the pages a large drain frees go back to the file
system (incremental auto-vacuum). Measured in pages and bytes of real SQLite files, never in time."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from agent_client import AgentStorage
from tests.support.nats_server import NatsServer, free_port
from tests.support.stream_reader import create_tables, storage, wait_until

ROWS = 50_000
BODY = "x" * 120


def pages(db: Path) -> tuple[int, int, int]:
    """(page_count, freelist_count, page_size) read by a connection of its own."""
    conn = sqlite3.connect(db)
    try:
        count, free, size = (
            int(conn.execute(f"PRAGMA {p}").fetchone()[0]) for p in ("page_count", "freelist_count", "page_size")
        )
        return count, free, size
    finally:
        conn.close()


async def test_a_large_backlog_is_reported_and_its_pages_go_back_after_the_drain(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    offline = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: the backlog stays in the log
    async with storage(tmp_path, offline) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)", always=["t"])
        for start in range(0, ROWS, 5000):
            await st.batch_write([{"table": "t", "data": {"id": i, "body": BODY}} for i in range(start, start + 5000)])
        await st.execute("UPDATE t SET body = 'short'")  # the table shrinks; the log holds both images
        health = await st.health_check()
        db_path = st.db_path
    assert health["backlog"]["changes"] >= 2 * ROWS
    log_bytes = health["log_bytes"]
    assert log_bytes >= ROWS * len(BODY), f"log_bytes {log_bytes} does not count the backlog"
    assert health["local_db"]["log_bytes"] == log_bytes and health["local_db"]["auto_vacuum"] == "incremental"
    peak_pages, _free, page_size = pages(db_path)
    assert health["local_db"]["file_bytes"] == peak_pages * page_size

    async with storage(tmp_path, nats_server.url) as st:
        await st.flush(timeout=60)

        async def drained() -> dict[str, Any] | None:
            h = await st.health_check()
            freed = h["local_db"]["file_bytes"] <= peak_pages * page_size - 0.8 * log_bytes
            return h if freed and h["local_db"]["free_bytes"] < 4 * 1024 * 1024 else None

        await wait_until(drained, timeout=30, interval=0.1, what="the drained log's pages to go back")
        after = await st.health_check()
        assert after["log_bytes"] < log_bytes / 20
    count, free, _ = pages(db_path)
    assert count * page_size <= peak_pages * page_size - 0.8 * log_bytes
    assert db_path.stat().st_size == count * page_size, "the file itself was not cut back"
    assert free * page_size < 4 * 1024 * 1024


async def test_a_database_made_before_incremental_vacuum_is_converted_when_small(tmp_path: Path) -> None:
    agents = tmp_path / "agents"
    agents.mkdir()
    old = sqlite3.connect(agents / "agent-1.db")
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")  # made by an older build: auto_vacuum NONE
    old.executemany("INSERT INTO t VALUES (?, ?)", [(i, BODY) for i in range(1000)])
    old.commit()
    assert old.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    old.close()
    async with AgentStorage("agent-1", agents, nats_url=f"nats://127.0.0.1:{free_port()}") as st:
        health = await st.health_check()
        assert health["local_db"]["auto_vacuum"] == "incremental"
        assert (await st.query_local("SELECT count(*) AS n FROM t"))[0]["n"] == 1000
