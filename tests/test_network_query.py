"""Issue 12, queries across every agent: `"*".t` and queries naming any number of agents, against a real
`replicator serve` and nats-server.

50 HTTP-only agents write a relay table `notes` (some with an extra column), three real AgentStorage agents
replicate `candidates` (one lacks a column, one keeps it on_demand) and a private table. `"*".notes` must
equal the union of every agent's rows (count + sha256), joins of `"*".t` with a named agent's table and
queries naming 12+ agents must equal what the per-agent queries answer, a write read back with min_seq must
be in the very next `"*"` answer, on_demand and private tables never appear, and hostile queries against
`"*"` are refused exactly as against any agent (nothing changes in the network store either).
"""

from __future__ import annotations

import sqlite3
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
    apoll,
    decode_rows,
    rows_digest,
    wait_agent_applied,
)

RELAY_AGENTS = [f"net-r{k:02d}" for k in range(50)]
ROWS_PER_AGENT = 40
TAGGED = set(RELAY_AGENTS[40:])  # these agents' notes also have a `tag` column; the others lack it
CAND_A, CAND_B, CAND_C = "net-a", "net-b", "net-c"
SCHEMA_FULL = Migration(
    1,
    "CREATE TABLE candidates (id INTEGER PRIMARY KEY, name TEXT NOT NULL, skill TEXT);\n"
    "CREATE TABLE secrets (id INTEGER PRIMARY KEY, v TEXT)",
)
SCHEMA_LACKING = Migration(1, "CREATE TABLE candidates (id INTEGER PRIMARY KEY, name TEXT NOT NULL)")
REFUSED = {"query_not_allowed": 403, "invalid_query": 400, "invalid_request": 400}


def note(agent: str, k: int) -> dict[str, Any]:
    row: dict[str, Any] = {"id": k, "body": f"{agent} note {k}", "score": (k * 7) % 13 + 0.5}
    if agent in TAGGED:
        row["tag"] = f"t{k % 4}"
    return row


def expected_notes() -> list[tuple[Any, ...]]:
    """(agent_id, id, body, score, tag) of every agent's notes, as written."""
    return [
        (a, k, note(a, k)["body"], note(a, k)["score"], note(a, k).get("tag"))
        for a in RELAY_AGENTS
        for k in range(ROWS_PER_AGENT)
    ]


@dataclass
class Net:
    htpc: HtpcProcess
    base: Path

    def network_fingerprint(self) -> tuple[Any, ...]:
        path = self.htpc.data_dir / "network.db"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
            tables = [r[1] for r in schema if r[0] == "table"]
            return tuple(schema), tuple(rows_digest(conn.execute(f'SELECT * FROM "{t}"').fetchall()) for t in tables)
        finally:
            conn.close()


async def _query(client: httpx.AsyncClient, agent: str, sql: str, **extra: Any) -> httpx.Response:
    return await client.post("/relay/query", json={"agent_id": agent, "query": sql, "params": [], **extra})


async def rows_of(client: httpx.AsyncClient, agent: str, sql: str, **extra: Any) -> list[tuple[Any, ...]]:
    resp = await _query(client, agent, sql, **extra)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["truncated"] is False
    return decode_rows(body["rows"])


async def _seed(htpc: HtpcProcess, base: Path) -> None:
    async with httpx.AsyncClient(base_url=htpc.url, timeout=30) as client:
        records = [
            {"agent_id": a, "table": "notes", "data": note(a, k)} for a in RELAY_AGENTS for k in range(ROWS_PER_AGENT)
        ]
        for i in range(0, len(records), 500):
            resp = await client.post("/relay/batch", json={"records": records[i : i + 500]})
            assert resp.status_code == 202, resp.text

        async def all_applied() -> bool:
            for a in RELAY_AGENTS:
                resp = await _query(client, a, "SELECT count(*) FROM notes")
                if resp.status_code != 200 or resp.json()["rows"] != [[ROWS_PER_AGENT]]:
                    return False
            return True

        await apoll(all_applied, 60, "every relay agent's notes applied")
        for agent, migration, visibility in (
            (CAND_A, SCHEMA_FULL, {"candidates": "always"}),  # secrets stays private
            (CAND_B, SCHEMA_LACKING, {"candidates": "always"}),
            (CAND_C, SCHEMA_FULL, {"candidates": "on_demand", "secrets": "on_demand"}),
        ):
            async with agent_session(
                agent, base / agent, htpc_url=htpc.url, migrations=[migration], visibility=visibility
            ) as storage:
                rows: list[dict[str, Any]] = [{"id": k, "name": f"{agent} cand {k}"} for k in range(10)]
                if migration is SCHEMA_FULL:
                    rows = [{**r, "skill": f"skill {k % 3}"} for k, r in enumerate(rows)]
                await storage.batch_write([{"table": "candidates", "data": r} for r in rows])
                if migration is SCHEMA_FULL:
                    await storage.write_data("secrets", {"id": 1, "v": f"{agent} secret"})
                await storage.flush(timeout=10)
                await wait_agent_applied(client, agent, await storage.last_committed_seq(), epoch=storage.epoch)


@pytest.fixture(scope="module")
def net(module_htpc: HtpcProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("net-agents")
    run_in_thread(lambda: _seed(module_htpc, base))
    yield Net(module_htpc, base)


@pytest.fixture
async def client(module_htpc: HtpcProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=module_htpc.url, timeout=30) as c:
        yield c


# ----------------------------------------------------------------------------- "*".t
async def test_star_equals_union_of_every_agents_rows(net: Net, client: httpx.AsyncClient) -> None:
    want = expected_notes()
    got = await rows_of(client, CAND_A, 'SELECT agent_id, id, body, score, tag FROM "*".notes')
    assert rows_digest(got) == rows_digest(want)
    # ... and equal to what each agent's own table answers (agents lacking `tag` give NULL).
    per_agent: list[tuple[Any, ...]] = []
    for a in RELAY_AGENTS:
        cols = "id, body, score, tag" if a in TAGGED else "id, body, score, NULL"
        per_agent += [(a, *r) for r in await rows_of(client, a, f"SELECT {cols} FROM notes")]
    assert rows_digest(got) == rows_digest(per_agent)
    # SELECT *: the owner first, then the union of the agents' columns.
    resp = await _query(client, CAND_A, "SELECT * FROM \"*\".notes WHERE agent_id = 'net-r41' ORDER BY id")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["columns"][0] == "agent_id" and set(body["columns"]) == {"agent_id", "id", "body", "score", "tag"}


async def test_star_filter_and_aggregate(net: Net, client: httpx.AsyncClient) -> None:
    got = await rows_of(
        client,
        "net-r03",
        'SELECT agent_id, count(*) FROM "*".notes WHERE score > 6 AND tag IS NOT NULL GROUP BY agent_id',
    )
    want: dict[str, int] = {}
    for a, _k, _body, score, tag in expected_notes():
        if score > 6 and tag is not None:
            want[a] = want.get(a, 0) + 1
    assert {r[0]: r[1] for r in got} == want and set(want) == TAGGED


async def test_star_joined_with_a_named_agents_table(net: Net, client: httpx.AsyncClient) -> None:
    got = await rows_of(
        client,
        CAND_B,
        'SELECT n.agent_id, n.id, o.body FROM "*".notes n JOIN "net-r07".notes o ON o.id = n.id '
        "WHERE n.agent_id IN ('net-r01', 'net-r45') AND n.id < 5",
    )
    want = [(a, k, note("net-r07", k)["body"]) for a in ("net-r01", "net-r45") for k in range(5)]
    assert rows_digest(got) == rows_digest(want)
    # With the asker's own table (unqualified) too.
    got = await rows_of(
        client,
        CAND_A,
        "SELECT c.name, n.body FROM candidates c JOIN \"*\".notes n ON n.id = c.id WHERE n.agent_id = 'net-r02'",
    )
    assert rows_digest(got) == rows_digest([(f"{CAND_A} cand {k}", note("net-r02", k)["body"]) for k in range(10)])


async def test_agents_lacking_a_column_give_null(net: Net, client: httpx.AsyncClient) -> None:
    got = await rows_of(client, CAND_A, 'SELECT agent_id, id, name, skill FROM "*".candidates')
    want: list[tuple[Any, ...]] = [(CAND_A, k, f"{CAND_A} cand {k}", f"skill {k % 3}") for k in range(10)]
    want += [(CAND_B, k, f"{CAND_B} cand {k}", None) for k in range(10)]
    assert rows_digest(got) == rows_digest(want)  # and net-c's on_demand candidates are not there


# ----------------------------------------------------------------------------- many named agents
async def test_query_naming_fifteen_agents_equals_per_agent_answers(net: Net, client: httpx.AsyncClient) -> None:
    named = RELAY_AGENTS[:15]
    union = " UNION ALL ".join(f"SELECT '{a}', id, body FROM \"{a}\".notes" for a in named)
    got = await rows_of(client, CAND_A, union)
    want: list[tuple[Any, ...]] = []
    for a in named:
        want += [(a, *r) for r in await rows_of(client, a, "SELECT id, body FROM notes")]
    assert len(want) == 15 * ROWS_PER_AGENT and rows_digest(got) == rows_digest(want)


async def test_join_of_twelve_agents_with_and_without_aliases(net: Net, client: httpx.AsyncClient) -> None:
    named = RELAY_AGENTS[10:22]
    joins = " ".join(f'JOIN "{a}".notes x{i} ON x{i}.id = x0.id' for i, a in enumerate(named) if i)
    got = await rows_of(
        client,
        named[0],
        f'SELECT x0.id, {", ".join(f"x{i}.body" for i in range(len(named)))} FROM "{named[0]}".notes x0 {joins}',
    )
    assert rows_digest(got) == rows_digest([(k, *(note(a, k)["body"] for a in named)) for k in range(ROWS_PER_AGENT)])
    # Schema-qualified column references, no aliases (the same table name in every agent).
    cols = ", ".join(f'"{a}".notes.body' for a in named)
    tables = ", ".join(f'"{a}".notes' for a in named)
    where = " AND ".join(f'"{a}".notes.id = "{named[0]}".notes.id' for a in named[1:])
    got = await rows_of(client, CAND_B, f'SELECT "{named[0]}".notes.id, {cols} FROM {tables} WHERE {where}')
    assert rows_digest(got) == rows_digest([(k, *(note(a, k)["body"] for a in named)) for k in range(ROWS_PER_AGENT)])


async def test_all_fifty_agents_in_one_join(net: Net, client: httpx.AsyncClient) -> None:
    joins = " ".join(f'JOIN "{a}".notes x{i} ON x{i}.id = x0.id' for i, a in enumerate(RELAY_AGENTS) if i)
    sums = " + ".join(f"x{i}.score" for i in range(len(RELAY_AGENTS)))
    got = await rows_of(
        client, CAND_A, f'SELECT x0.id, {sums} FROM "{RELAY_AGENTS[0]}".notes x0 {joins} ORDER BY x0.id'
    )
    want = [(k, sum(note(a, k)["score"] for a in RELAY_AGENTS)) for k in range(ROWS_PER_AGENT)]
    assert [r[0] for r in got] == [w[0] for w in want]
    assert all(abs(g[1] - w[1]) < 1e-6 for g, w in zip(got, want, strict=True))


# ----------------------------------------------------------------------------- freshness
async def test_write_then_star_query_with_min_seq_sees_it(net: Net, client: httpx.AsyncClient) -> None:
    async with agent_session(
        CAND_A, net.base / CAND_A, htpc_url=net.htpc.url, migrations=[SCHEMA_FULL], visibility={"candidates": "always"}
    ) as storage:
        await rows_of(client, CAND_A, 'SELECT count(*) FROM "*".candidates')  # the network table exists already
        for step in range(3):
            await storage.write_data("candidates", {"id": 100 + step, "name": f"fresh {step}", "skill": "new"})
            await storage.execute("UPDATE candidates SET skill = ? WHERE id = 0", (f"updated {step}",))
            await storage.execute("DELETE FROM candidates WHERE id = ?", (9 - step,))
            await storage.flush(timeout=10)
            seq = await storage.last_committed_seq()
            # SQLite also takes a string literal as a table name: `"*".'candidates'` must be caught up the same.
            table = "'candidates'" if step == 1 else "candidates"
            got = await rows_of(
                client,
                CAND_A,
                f"SELECT id, name, skill FROM \"*\".{table} WHERE agent_id = 'net-a'",
                min_seq=seq,
                epoch=storage.epoch,
            )
            local = [tuple(r.values()) for r in await storage.execute("SELECT id, name, skill FROM candidates")]
            assert rows_digest(got) == rows_digest(local), step
            assert (0, f"{CAND_A} cand 0", f"updated {step}") in got and (9 - step) not in [r[0] for r in got]


async def test_relay_update_is_seen(net: Net, client: httpx.AsyncClient) -> None:
    await rows_of(client, CAND_A, 'SELECT count(*) FROM "*".notes')
    resp = await client.post(
        "/relay/batch", json={"records": [{"agent_id": "net-r49", "table": "notes", "data": {"id": 39, "body": "x"}}]}
    )
    assert resp.status_code == 202, resp.text

    async def seen() -> list[tuple[Any, ...]] | None:
        rows = await rows_of(
            client, CAND_A, "SELECT body, score FROM \"*\".notes WHERE agent_id = 'net-r49' AND id = 39"
        )
        return rows if rows and rows[0][0] == "x" else None

    rows = await apoll(seen, 15, "the relay update in the network store")
    assert rows == await rows_of(client, "net-r49", "SELECT body, score FROM notes WHERE id = 39")
    count = await rows_of(client, CAND_A, "SELECT count(*) FROM \"*\".notes WHERE agent_id = 'net-r49'")
    assert count == [(ROWS_PER_AGENT,)]  # an update, not a second row


# ----------------------------------------------------------------------------- visibility and refusals
async def test_on_demand_and_private_tables_never_appear(net: Net, client: httpx.AsyncClient) -> None:
    owners = await rows_of(client, CAND_A, 'SELECT DISTINCT agent_id FROM "*".candidates')
    assert sorted(r[0] for r in owners) == [CAND_A, CAND_B]
    for table in ("secrets", "nothing_like_it"):
        resp = await _query(client, CAND_A, f'SELECT * FROM "*".{table}')
        assert resp.status_code == 404 and resp.json()["error"] == "unknown_table", resp.text


HOSTILE_STAR = [
    ("network schema", 'SELECT * FROM "*".sqlite_master'),
    ("network schema alias", 'SELECT * FROM "*".sqlite_schema'),
    ("network internals", 'SELECT * FROM "*"._cr_net'),
    ("network offsets", 'SELECT * FROM "*"._cr_net_offsets'),
    ("network key map", 'SELECT * FROM "*"."_cr_keys_notes"'),
    ("network key map join", 'SELECT n.id FROM "*".notes n JOIN "*"."_cr_keys_notes" k ON k.rid = n.rowid'),
    ("delete", 'DELETE FROM "*".notes'),
    ("insert", "INSERT INTO \"*\".notes (agent_id, id) VALUES ('planted', 1)"),
    ("update", 'UPDATE "*".notes SET body = 1'),
    ("drop", 'DROP TABLE "*".notes'),
    ("detach", 'DETACH DATABASE "*"'),
    ("pragma", 'PRAGMA "*".journal_mode = DELETE'),
    (
        "overflow agent schema",
        " UNION ALL ".join(f'SELECT 1 FROM "{a}".notes' for a in RELAY_AGENTS[:11])
        + ' UNION ALL SELECT 1 FROM "net-r30".sqlite_master',
    ),
    (
        "overflow agent internals",
        " UNION ALL ".join(f'SELECT 1 FROM "{a}".notes' for a in RELAY_AGENTS[:11])
        + ' UNION ALL SELECT 1 FROM "net-r30"._cr_state',
    ),
]


@pytest.mark.parametrize("sql", [pytest.param(sql, id=name) for name, sql in HOSTILE_STAR])
async def test_hostile_star_queries_refused(net: Net, client: httpx.AsyncClient, sql: str) -> None:
    await rows_of(client, CAND_A, 'SELECT count(*) FROM "*".notes')  # the network table exists
    before = net.network_fingerprint()
    resp = await _query(client, CAND_A, sql)
    body = resp.json()
    assert body.get("error") in REFUSED, (resp.status_code, body)
    assert resp.status_code == REFUSED[body["error"]], (resp.status_code, body)
    assert "rows" not in body
    assert net.network_fingerprint() == before


async def test_network_store_survives_a_restart(net: Net, client: httpx.AsyncClient) -> None:
    before = await rows_of(client, CAND_A, 'SELECT agent_id, id, body, score, tag FROM "*".notes')
    net.htpc.restart()
    after = await rows_of(client, CAND_A, 'SELECT agent_id, id, body, score, tag FROM "*".notes')
    assert rows_digest(after) == rows_digest(before) and len(after) == len(RELAY_AGENTS) * ROWS_PER_AGENT
