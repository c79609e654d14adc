"""Schema changes that must follow to the HTPC: DROP COLUMN and RENAME TO on `always` tables, through
agent_client and from other processes. Real `replicator serve`, real nats-server; central == local by checksum."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from agent_client import AgentStorage, Migration
from tests.support.htpc import (
    HtpcProcess,
    apoll,
    client_and_agent,
    sqlite_rows,
    table_digest,
    wait_agent_applied,
)

AGENT = "schema-agent"
TABLES = {
    "a": "CREATE TABLE a (id INTEGER PRIMARY KEY, keep TEXT, gone REAL, also_gone BLOB)",
    "b": "CREATE TABLE b (id INTEGER PRIMARY KEY, keep TEXT, gone TEXT)",
    "c": "CREATE TABLE c (k TEXT PRIMARY KEY, n INTEGER, gone INTEGER)",
}


def columns(db: Path, table: str) -> list[str]:
    return [str(r[0]) for r in sqlite_rows(db, "SELECT name FROM pragma_table_info(?)", (table,))]


def tables(db: Path) -> set[str]:
    rows = sqlite_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")
    return {str(r[0]) for r in rows if not str(r[0]).startswith(("_", "sqlite_"))}


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def plain_sqlite(db: Path, *statements: str) -> subprocess.CompletedProcess[str]:
    """Another process with a plain sqlite3 connection (no agent_client), as the sqlite3 shell would be."""
    script = (
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nfor s in sys.argv[2:]:\n    c.execute(s)\nc.commit()\n"
    )
    return run("-c", script, str(db), *statements)


async def converged(st: AgentStorage, client: httpx.AsyncClient, htpc: HtpcProcess, *names: str) -> None:
    """Everything committed is applied centrally, and each table is the same on both sides, column for column."""
    await st.flush(timeout=15)
    await wait_agent_applied(client, AGENT, await st.last_committed_seq(), epoch=st.epoch)
    central = htpc.central_db(AGENT)
    for name in names:
        cols = columns(st.db_path, name)
        assert columns(central, name) == cols, f"{name}: central columns differ"
        assert table_digest(central, name, cols) == table_digest(st.db_path, name, cols), f"{name}: rows differ"


async def fill(st: AgentStorage) -> None:
    await st.batch_write(
        [{"table": "a", "data": {"id": i, "keep": f"k{i}", "gone": i / 3, "also_gone": bytes([i])}} for i in range(30)]
        + [{"table": "b", "data": {"id": i, "keep": f"b{i}", "gone": "x"}} for i in range(10)]
        + [{"table": "c", "data": {"k": f"c{i}", "n": i, "gone": -i}} for i in range(10)]
    )


async def test_drop_column_follows_to_the_htpc(htpc: HtpcProcess, tmp_path: Path) -> None:
    """Through every agent_client path: storage.execute, a transaction, a migration, and `python -m agent_client
    sql` from another process while the agent runs (the plain sqlite3 shell is refused by SQLite itself)."""
    migrations = [Migration(i + 1, sql) for i, sql in enumerate(TABLES.values())]
    async with client_and_agent(htpc, AGENT, tmp_path / "agent", migrations, TABLES) as (client, st):
        await fill(st)
        await converged(st, client, htpc, *TABLES)

        await st.execute("ALTER TABLE a DROP COLUMN gone")
        async with st.transaction() as tx:
            await tx.execute("ALTER TABLE a DROP COLUMN also_gone")
            await tx.execute("UPDATE a SET keep = 'changed in the same transaction' WHERE id < 5")
        assert await st.migrate([*migrations, Migration(4, "ALTER TABLE b DROP COLUMN gone")]) == [4]
        await st.write_data("a", {"id": 100, "keep": "after"})
        await st.write_data("b", {"id": 100, "keep": "after"})
        await converged(st, client, htpc, "a", "b")
        assert columns(htpc.central_db(AGENT), "a") == ["id", "keep"]
        assert columns(htpc.central_db(AGENT), "b") == ["id", "keep"]

        refused = plain_sqlite(st.db_path, "ALTER TABLE c DROP COLUMN gone")
        assert refused.returncode != 0 and "error in trigger _cr_c_" in refused.stderr
        assert columns(st.db_path, "c") == ["k", "n", "gone"], "the refused statement changed something"
        done = run("-m", "agent_client", "sql", str(st.db_path), "ALTER TABLE c DROP COLUMN gone; UPDATE c SET n = 7")
        assert done.returncode == 0, done.stderr
        assert columns(st.db_path, "c") == ["k", "n"]
        await st.write_data("c", {"k": "new", "n": 1})
        await converged(st, client, htpc, "a", "b", "c")
        assert (await st.visibility()) == dict.fromkeys(TABLES, "always")


async def test_rename_keeps_the_table_replicated_and_the_htpc_follows(htpc: HtpcProcess, tmp_path: Path) -> None:
    """`ALTER TABLE t RENAME TO u` on an `always` table: it stays `always`, the HTPC drops t and copies u, whether
    the rename came through agent_client or from another process's plain sqlite3 connection."""
    migrations = [Migration(i + 1, sql) for i, sql in enumerate(TABLES.values())]
    async with client_and_agent(htpc, AGENT, tmp_path / "agent", migrations, TABLES) as (client, st):
        await fill(st)
        await converged(st, client, htpc, *TABLES)

        await st.execute("ALTER TABLE a RENAME TO a2")
        await st.write_data("a2", {"id": 200, "keep": "after the rename"})
        await converged(st, client, htpc, "a2", "b", "c")
        assert "a" not in tables(htpc.central_db(AGENT))

        other = plain_sqlite(
            st.db_path,
            "ALTER TABLE b RENAME TO b2",
            "INSERT INTO b2 (id, keep) VALUES (300, 'written by the other process after its rename')",
        )
        assert other.returncode == 0, other.stderr

        async def followed() -> dict[str, Any] | None:  # at the agent's next schema check
            vis = await st.visibility()
            return vis if vis.get("b2") == "always" and "b" not in vis else None

        await apoll(followed, 15, "the agent to follow the other process's rename")
        await st.write_data("b2", {"id": 301, "keep": "after"})
        await converged(st, client, htpc, "a2", "b2", "c")
        assert tables(htpc.central_db(AGENT)) == {"a2", "b2", "c"}
        assert await st.visibility() == {"a2": "always", "b2": "always", "c": "always"}
