"""`/relay/query` is read-only by construction: hostile SQL is refused with a 4xx JSON error, runaway queries are cut
off by the time bound, and afterwards every central database (and the data directory) is exactly as before.

Runs against a real `replicator serve` whose central copies were filled by real AgentStorage instances.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_client import Migration
from tests.support.credentials import run_in_thread
from tests.support.htpc import (
    HtpcProcess,
    agent_session,
    rows_digest,
    wait_agent_applied,
)

AGENT, OTHER = "sec-agent", "sec-other"
SCHEMA = Migration(
    1,
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL, raw BLOB);\n"
    "CREATE TABLE tags (item_id INTEGER, tag TEXT, PRIMARY KEY (item_id, tag))",
)


@dataclass
class Seeded:
    htpc: HtpcProcess
    agents: tuple[str, ...]

    def fingerprint(self) -> dict[str, Any]:
        """Everything a successful attack could change: rows, replication state, schema, journal mode, files."""
        out: dict[str, Any] = {}
        for agent in self.agents:
            path = self.htpc.central_db(agent)
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
                tables = [r[1] for r in schema if r[0] == "table"]
                out[agent] = {
                    "schema": schema,
                    "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                    "rows": {t: rows_digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables},
                }
            finally:
                conn.close()
        out["files"] = sorted(
            str(p.relative_to(self.htpc.data_dir.parent))
            for p in self.htpc.data_dir.parent.rglob("*")
            if not p.name.endswith(("-wal", "-shm", ".log"))
        )
        return out


async def _seed(htpc: HtpcProcess, base: Path) -> None:
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        for agent, offset in ((AGENT, 0), (OTHER, 100)):
            async with agent_session(
                agent,
                base / agent,
                htpc_url=htpc.url,
                migrations=[SCHEMA],
                visibility={"items": "always", "tags": "always"},
            ) as storage:
                await storage.batch_write(
                    [
                        {
                            "table": "items",
                            "data": {"id": offset + k, "name": f"item {k}", "price": k * 0.5, "raw": bytes([k])},
                        }
                        for k in range(20)
                    ]
                    + [{"table": "tags", "data": {"item_id": offset + k, "tag": f"t{k % 3}"}} for k in range(20)]
                )
                await storage.flush(timeout=10)
                await wait_agent_applied(client, agent, await storage.last_committed_seq(), epoch=storage.epoch)


@pytest.fixture(scope="module")
def seeded(module_htpc: HtpcProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    base = tmp_path_factory.mktemp("sec-agents")
    run_in_thread(lambda: _seed(module_htpc, base))
    yield Seeded(module_htpc, (AGENT, OTHER))


@pytest.fixture
async def client(module_htpc: HtpcProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=module_htpc.url, timeout=30) as c:
        yield c


async def run_query(client: httpx.AsyncClient, sql: str, agent: str = AGENT, **extra: Any) -> httpx.Response:
    return await client.post("/relay/query", json={"agent_id": agent, "query": sql, "params": [], **extra})


REFUSED = {"query_not_allowed": 403, "invalid_query": 400, "invalid_request": 400}

HOSTILE: list[tuple[str, str]] = [
    ("insert", "INSERT INTO items (id, name) VALUES (999, 'planted')"),
    ("insert select", "INSERT INTO items SELECT id + 1000, name, price, raw FROM items"),
    ("update", "UPDATE items SET name = 'pwned'"),
    ("delete", "DELETE FROM items"),
    ("replace", "REPLACE INTO items (id, name) VALUES (1, 'replaced')"),
    (
        "upsert returning",
        "INSERT INTO items (id, name) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET name = 'y' RETURNING *",
    ),
    ("delete other agent", 'DELETE FROM "sec-other".items'),
    ("drop", "DROP TABLE items"),
    ("create", "CREATE TABLE planted (x)"),
    ("create temp", "CREATE TEMP TABLE planted AS SELECT * FROM items"),
    ("create view", "CREATE TEMP VIEW v AS SELECT 1"),
    ("alter", "ALTER TABLE items ADD COLUMN planted TEXT"),
    ("create index", "CREATE INDEX planted_idx ON items (name)"),
    ("attach file", "ATTACH DATABASE 'planted.db' AS planted"),
    ("attach memory", "ATTACH DATABASE ':memory:' AS planted"),
    ("detach", "DETACH DATABASE main"),
    ("vacuum into", "VACUUM INTO 'stolen-copy.db'"),
    ("vacuum", "VACUUM"),
    ("pragma journal_mode write", "PRAGMA journal_mode=DELETE"),
    ("pragma writable_schema", "PRAGMA writable_schema=ON"),
    ("pragma query_only off", "PRAGMA query_only=0"),
    ("pragma user_version", "PRAGMA user_version=42"),
    ("load_extension", "SELECT load_extension('x')"),
    ("load_extension entry", "SELECT load_extension('/tmp/evil.so', 'sqlite3_evil_init')"),
    ("fts3_tokenizer", "SELECT fts3_tokenizer('simple')"),
    ("multi statement", "SELECT 1; DELETE FROM items"),
    ("multi statement select", "SELECT * FROM items; SELECT * FROM _cr_state"),
    ("read _cr_state", "SELECT * FROM _cr_state"),
    ("read _cr_tables qualified", "SELECT * FROM main._cr_tables"),
    ("read _cr_state subquery", "SELECT (SELECT value FROM _cr_state WHERE key = 'watermark')"),
    ("read other agent _cr_state", 'SELECT * FROM "sec-other"._cr_state'),
    ("read own _cr_state qualified", 'SELECT * FROM "sec-agent"._cr_relay_seen'),
    ("read _cr_epochs in join", "SELECT i.id FROM items i JOIN _cr_epochs e ON 1"),
    ("begin", "BEGIN IMMEDIATE"),
    ("savepoint", "SAVEPOINT s"),
    ("analyze", "ANALYZE"),
    ("reindex", "REINDEX"),
    ("explain delete", "EXPLAIN DELETE FROM items"),
]


@pytest.mark.parametrize("sql", [pytest.param(sql, id=name) for name, sql in HOSTILE])
async def test_hostile_query_refused_and_nothing_changes(seeded: Seeded, client: httpx.AsyncClient, sql: str) -> None:
    before = seeded.fingerprint()
    resp = await run_query(client, sql)
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    body = resp.json()
    assert body.get("error") in REFUSED, (resp.status_code, body)
    assert resp.status_code == REFUSED[body["error"]], (resp.status_code, body)
    assert isinstance(body.get("message"), str) and body["message"]
    assert "rows" not in body
    assert seeded.fingerprint() == before


async def test_read_queries_still_answer(seeded: Seeded, client: httpx.AsyncClient) -> None:
    """The control for the refusals above: ordinary reads (joins, CTEs, other agents) work on the same data."""
    resp = await run_query(
        client,
        "SELECT t.tag, count(*), total(i.price) FROM items i JOIN tags t ON t.item_id = i.id GROUP BY t.tag "
        "ORDER BY t.tag",
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["rows"] == [
        [f"t{g}", len(ks), sum(k * 0.5 for k in ks)] for g in range(3) for ks in [[k for k in range(20) if k % 3 == g]]
    ]
    resp = await run_query(
        client,
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 5) "
        'SELECT count(*) FROM n JOIN "sec-other".items o ON o.id = 100 + n.x',
    )
    assert resp.status_code == 200 and resp.json()["rows"] == [[5]], resp.text
    resp = await run_query(client, "SELECT id, raw FROM items WHERE id = ?", params=[3])
    assert resp.json()["rows"] == [[3, {"b": "Aw=="}]]


async def test_runaway_recursive_cte_is_cut_off_by_the_time_bound(seeded: Seeded, client: httpx.AsyncClient) -> None:
    before = seeded.fingerprint()
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    started = time.monotonic()
    resp = await run_query(client, forever)  # the server's default bound (2 s)
    elapsed = time.monotonic() - started
    assert resp.status_code == 408, resp.text
    assert resp.json()["error"] == "query_timeout"
    assert elapsed < 6, elapsed

    started = time.monotonic()
    cross = "SELECT count(*) FROM items a, items b, items c, items d, items e, items f, items g"
    resp = await run_query(client, cross, timeout_ms=300)  # 20**7 rows: far longer than 300 ms
    elapsed = time.monotonic() - started
    assert resp.status_code == 408 and resp.json()["error"] == "query_timeout", resp.text
    assert elapsed < 2.5, elapsed

    # A client cannot lift the bound past the server's maximum either, and the server is responsive afterwards.
    started = time.monotonic()
    resp = await run_query(client, "SELECT count(*) FROM items")
    assert resp.status_code == 200 and resp.json()["rows"] == [[20]]
    assert time.monotonic() - started < 1.0
    assert seeded.fingerprint() == before


async def test_concurrent_runaway_queries_do_not_starve_the_api(seeded: Seeded, client: httpx.AsyncClient) -> None:
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
    runaway = [asyncio.ensure_future(run_query(client, forever, timeout_ms=1500)) for _ in range(4)]
    await asyncio.sleep(0.2)
    started = time.monotonic()
    health = await client.get("/health")
    assert health.status_code == 200 and time.monotonic() - started < 1.0
    results = await asyncio.gather(*runaway)
    # One caller may run --query-max-concurrent (2) at once: the other two are refused at once, not queued.
    assert sorted(r.status_code for r in results) == [408, 408, 429, 429], [r.text for r in results]
    assert all(r.json()["error"] == "too_many_queries" for r in results if r.status_code == 429)


async def test_on_demand_hostile_queries_refused_by_the_live_agent(
    module_htpc: HtpcProcess, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    migration = Migration(
        1, "CREATE TABLE interviews (id TEXT PRIMARY KEY, notes TEXT);\nCREATE TABLE secrets (id TEXT PRIMARY KEY)"
    )
    async with agent_session(
        "sec-live",
        tmp_path / "agent",
        htpc_url=module_htpc.url,
        migrations=[migration],
        visibility={"interviews": "on_demand", "secrets": "private"},
    ) as storage:
        await storage.batch_write(
            [{"table": "interviews", "data": {"id": f"i{k}", "notes": f"n{k}"}} for k in range(5)]
            + [{"table": "secrets", "data": {"id": "s1"}}]
        )
        await wait_agent_applied(client, "sec-live", await storage.last_committed_seq(), epoch=storage.epoch)
        ok = await run_query(client, "SELECT count(*) FROM interviews", agent="sec-live")
        assert ok.status_code == 200 and ok.json()["answered_by"] == "sec-live", ok.text

        for sql in (
            "DELETE FROM interviews",
            "UPDATE interviews SET notes = 'pwned'",
            "INSERT INTO interviews SELECT id || 'x', notes FROM interviews",
            "SELECT * FROM interviews; DELETE FROM interviews",
            "SELECT i.id FROM interviews i JOIN _cr_log l ON 1",
            "SELECT load_extension('x') FROM interviews",
        ):
            resp = await run_query(client, sql, agent="sec-live")
            body = resp.json()
            assert body.get("error") in REFUSED and resp.status_code == REFUSED[body["error"]], (sql, resp.text)
        started = time.monotonic()
        resp = await run_query(
            client,
            "SELECT count(*) FROM " + ", ".join(f"interviews t{k}" for k in range(14)),  # 5**14 rows
            agent="sec-live",
            timeout_ms=500,
        )
        assert resp.status_code == 408 and resp.json()["error"] == "query_timeout", resp.text
        assert time.monotonic() - started < 4
        local = await storage.query_local("SELECT id, notes FROM interviews ORDER BY id")
        assert local == [{"id": f"i{k}", "notes": f"n{k}"} for k in range(5)]
        assert await storage.query_local("SELECT id FROM secrets") == [{"id": "s1"}]
        assert not (Path.cwd() / "planted.db").exists() and not (Path.cwd() / "stolen-copy.db").exists()


async def test_json_each_over_a_json_column_is_allowed(seeded: Seeded, client: httpx.AsyncClient) -> None:
    resp = await run_query(client, "SELECT count(*) FROM items, json_each('[1, 2, 3]') j WHERE items.id = j.value")
    assert resp.status_code == 200, resp.text
    assert resp.json()["rows"] == [[3]]
