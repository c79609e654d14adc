"""End to end through real processes: AgentStorage -> nats-server -> `replicator serve` -> `/relay/query`.

Every test here runs a real nats-server and the replicator as a subprocess and talks HTTP to it; agents are
real AgentStorage instances in this process.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson

from agent_client import STREAM_NAME, AgentStorage, Migration, changes_subject
from tests.support.htpc import (
    FORGED_LAYOUT,
    HtpcProcess,
    agent_session,
    apoll,
    central_db_path,
    decode_rows,
    forged_record,
    run_cli,
    sqlite_rows,
    typed_value,
    wait_agent_applied,
)
from tests.support.nats_server import NatsServer

SAMPLES = Migration(
    1,
    "CREATE TABLE samples (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, anything)",
    "typed samples",
)
I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
INF = math.inf

# Values that JSON cannot carry naively, or that a sloppy implementation would coerce.
SAMPLE_ROWS: list[dict[str, Any]] = [
    {"id": 1, "i": I64_MAX, "r": 1.5, "t": "héllo wörld ✓ 日本語 🚀", "b": b"\x00\x01\xfe\xff", "anything": None},
    {"id": 2, "i": I64_MIN, "r": -0.0, "t": "", "b": b"", "anything": I64_MAX},
    {
        "id": 3,
        "i": 0,
        "r": INF,
        "t": "quote ' double \" backslash \\ newline \n tab \t",
        "b": bytes(range(256)),
        "anything": -0.0,
    },
    {"id": 4, "i": None, "r": -INF, "t": None, "b": None, "anything": b"\x00blob in an untyped column"},
    {"id": 5, "i": -1, "r": 5e-324, "t": "nul \x00 inside", "b": b"text-looking blob", "anything": "text"},
    {"id": 6, "i": 1, "r": 1.7976931348623157e308, "t": "1", "b": b"1", "anything": INF},
    {"id": 7, "i": 42, "r": 0.1, "t": "\U0010ffff", "b": b"\x80", "anything": 3.0},
    {"id": 8, "i": I64_MIN, "r": -2.5e-300, "t": "Ωμέγα", "b": b"\xff" * 100, "anything": -INF},
]
COLUMNS = "id, i, r, t, b, anything"


def _tuples(rows: list[dict[str, Any]], columns: list[str]) -> list[tuple[Any, ...]]:
    return [tuple(r[c] for c in columns) for r in rows]


def _typed(rows: list[tuple[Any, ...]]) -> list[list[tuple[str, str]]]:
    return [[typed_value(v) for v in row] for row in rows]


async def test_writes_visible_through_relay_query_with_exact_types(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        agent_session(
            "typed-agent", tmp_path / "agent", htpc_url=htpc.url, migrations=[SAMPLES], visibility={"samples": "always"}
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        await storage.batch_write([{"table": "samples", "data": row} for row in SAMPLE_ROWS[:4]])
        for row in SAMPLE_ROWS[4:]:
            await storage.write_data("samples", row)
        await storage.flush(timeout=10)
        await wait_agent_applied(client, "typed-agent", await storage.last_committed_seq(), epoch=storage.epoch)

        local = await storage.query_local(f"SELECT {COLUMNS} FROM samples ORDER BY id")
        local_rows = _tuples(local, COLUMNS.split(", "))
        resp = await client.post(
            "/relay/query",
            json={"agent_id": "typed-agent", "query": f"SELECT {COLUMNS} FROM samples ORDER BY id", "params": {}},
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["columns"] == COLUMNS.split(", ")
        central_rows = decode_rows(body["rows"])
        assert _typed(central_rows) == _typed(local_rows)

        # Independently of the local copy: the values that matter survived exactly, and the wire used tags.
        by_id = {row[0]: row for row in central_rows}
        assert by_id[1][1] == I64_MAX and type(by_id[1][1]) is int
        assert by_id[2][1] == I64_MIN and by_id[8][1] == I64_MIN
        assert by_id[3][2] == INF and by_id[4][2] == -INF
        assert by_id[2][5] == I64_MAX and type(by_id[2][5]) is int
        assert typed_value(by_id[3][5]) == typed_value(-0.0)  # untyped column: the sign of zero is kept
        assert by_id[6][5] == INF and by_id[8][5] == -INF
        assert by_id[7][5] == 3.0 and type(by_id[7][5]) is float
        assert by_id[3][4] == bytes(range(256)) and by_id[2][4] == b""
        assert by_id[1][3] == SAMPLE_ROWS[0]["t"] and by_id[7][3] == "\U0010ffff"
        assert by_id[4][1:5] == (None, -INF, None, None)
        raw = {row[0]: row for row in body["rows"]}
        assert raw[3][2] == {"f": "inf"} and raw[4][2] == {"f": "-inf"}
        assert raw[1][4] == {"b": "AAH+/w=="}

        # SQLite's own view of the storage classes agrees on both sides.
        typeof_sql = "SELECT id, typeof(i), typeof(r), typeof(t), typeof(b), typeof(anything) FROM samples ORDER BY id"
        local_types = [tuple(r.values()) for r in await storage.query_local(typeof_sql)]
        resp = await client.post("/relay/query", json={"agent_id": "typed-agent", "query": typeof_sql})
        assert resp.status_code == 200, resp.text
        assert [tuple(r) for r in resp.json()["rows"]] == local_types

        # Updates and deletes replicate too, still exactly.
        await storage.write_data("samples", {"id": 1, "r": -0.0, "anything": b"\x01"})
        async with storage.transaction() as tx:
            await tx.execute("DELETE FROM samples WHERE id IN (2, 5)")
            await tx.execute("UPDATE samples SET i = ? WHERE id = 3", (I64_MIN,))
        answer = await storage.query_network(f"SELECT {COLUMNS} FROM samples ORDER BY id", fresh=True)
        local_rows = _tuples(
            await storage.query_local(f"SELECT {COLUMNS} FROM samples ORDER BY id"), COLUMNS.split(", ")
        )
        assert [r[0] for r in local_rows] == [1, 3, 4, 6, 7, 8]
        assert _typed(decode_rows(answer["rows"])) == _typed(local_rows)


async def test_read_your_writes_and_not_yet_replicated(htpc: HtpcProcess, tmp_path: Path) -> None:
    migration = Migration(1, "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, n INTEGER)")
    async with (
        agent_session(
            "ryw-agent", tmp_path / "agent", htpc_url=htpc.url, migrations=[migration], visibility={"events": "always"}
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        for n in range(25):
            await storage.write_data("events", {"id": n, "kind": f"k{n}", "n": n * n})
            # No flush, no sleep: `fresh` makes the HTPC wait until it has applied our last commit.
            answer = await storage.query_network("SELECT count(*), max(id), total(n) FROM events", fresh=True)
            assert answer["rows"] == [[n + 1, n, float(sum(k * k for k in range(n + 1)))]], f"after write {n}"
            assert answer["applied_seq"] >= await storage.last_committed_seq()

        last = await storage.last_committed_seq()
        started = time.monotonic()
        resp = await client.post(
            "/relay/query",
            json={
                "agent_id": "ryw-agent",
                "query": "SELECT count(*) FROM events",
                "params": {},
                "min_seq": last + 1000,
                "timeout_ms": 400,
            },
        )
        elapsed = time.monotonic() - started
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"] == "not_yet_replicated"
        assert 0.35 <= elapsed < 5, elapsed

        # A min_seq that has been reached answers at once.
        resp = await client.post(
            "/relay/query",
            json={"agent_id": "ryw-agent", "query": "SELECT count(*) FROM events", "min_seq": last, "timeout_ms": 400},
        )
        assert resp.status_code == 200 and resp.json()["rows"] == [[25]]


async def test_cross_agent_join(htpc: HtpcProcess, tmp_path: Path) -> None:
    orders = Migration(
        1,
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, qty INTEGER NOT NULL);\n"
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
    )
    products = Migration(
        1,
        "CREATE TABLE products (sku TEXT PRIMARY KEY, name TEXT, price REAL);\n"
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",
    )
    async with (
        agent_session(
            "agent-a",
            tmp_path / "a",
            htpc_url=htpc.url,
            migrations=[orders],
            visibility={"orders": "always", "notes": "always"},
        ) as a,
        agent_session(
            "agent-b",
            tmp_path / "b",
            htpc_url=htpc.url,
            migrations=[products],
            visibility={"products": "always", "notes": "always"},
        ) as b,
    ):
        await b.batch_write(
            [
                {"table": "products", "data": {"sku": f"s{k}", "name": f"product {k}", "price": k * 1.25}}
                for k in range(10)
            ]
            + [{"table": "notes", "data": {"id": k, "body": f"b-note {k}"}} for k in range(3)]
        )
        await a.batch_write(
            [{"table": "orders", "data": {"id": k, "sku": f"s{(k * 3) % 12}", "qty": k + 1}} for k in range(20)]
            + [{"table": "notes", "data": {"id": k, "body": f"a-note {k}"}} for k in range(3)]
        )
        await b.query_network("SELECT 1", fresh=True)  # agent-b's writes are applied centrally

        join = (
            'SELECT o.id, p.name, o.qty * p.price AS total FROM orders o JOIN "agent-b".products p ON p.sku = o.sku '
            "WHERE o.qty >= ? ORDER BY o.id"
        )
        answer = await a.query_network(join, [3], fresh=True)
        local_products = {r["sku"]: r for r in await b.query_local("SELECT sku, name, price FROM products")}
        expected = [
            [o["id"], local_products[o["sku"]]["name"], o["qty"] * local_products[o["sku"]]["price"]]
            for o in await a.query_local("SELECT id, sku, qty FROM orders WHERE qty >= 3 ORDER BY id")
            if o["sku"] in local_products
        ]
        assert len(expected) >= 10  # the join really matches rows (s10, s11 have no product)
        assert answer["columns"] == ["id", "name", "total"]
        assert answer["rows"] == expected

        # An unqualified name is the asking agent's own table; the qualified one is the other agent's.
        answer = await a.query_network(
            'SELECT n.id, n.body, m.body FROM notes n JOIN "agent-b".notes m USING (id) ORDER BY n.id', fresh=True
        )
        assert answer["rows"] == [[k, f"a-note {k}", f"b-note {k}"] for k in range(3)]
        answer = await b.query_network('SELECT count(*) FROM "agent-a".orders', fresh=False)
        assert answer["rows"] == [[20]]
        # Naming one's own agent id explicitly means the same as leaving it out.
        answer = await a.query_network(
            'SELECT count(*) FROM "agent-a".orders o JOIN orders p USING (id) '
            'JOIN "agent-b".products q ON q.sku = o.sku'
        )
        assert answer["rows"] == [[len([o for o in range(20) if (o * 3) % 12 < 10])]]


async def test_on_demand_query_answered_live_then_agent_offline(htpc: HtpcProcess, tmp_path: Path) -> None:
    migration = Migration(
        1,
        "CREATE TABLE interviews (id TEXT PRIMARY KEY, candidate TEXT, at TEXT);\n"
        "CREATE TABLE shared (id INTEGER PRIMARY KEY, v TEXT);\n"
        "CREATE TABLE secrets (id INTEGER PRIMARY KEY, v TEXT)",
    )
    storage = AgentStorage("live-agent", tmp_path / "agent", htpc_url=htpc.url)
    await storage.open()
    try:
        await storage.migrate([migration])
        for table, vis in (("interviews", "on_demand"), ("shared", "always"), ("secrets", "private")):
            await storage.set_visibility(table, vis)
        await storage.batch_write(
            [
                {"table": "interviews", "data": {"id": f"i{k}", "candidate": f"cand {k}", "at": f"2026-01-0{k + 1}"}}
                for k in range(3)
            ]
            + [
                {"table": "shared", "data": {"id": 1, "v": "everyone sees this"}},
                {"table": "secrets", "data": {"id": 1, "v": "nobody sees this"}},
            ]
        )
        async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
            info = await wait_agent_applied(
                client, "live-agent", await storage.last_committed_seq(), epoch=storage.epoch
            )
            assert info["tables"]["on_demand"] == ["interviews"]
            assert info["tables"]["always"] == ["shared"]
            # The on_demand table's rows never went to the central store.
            central = await client.post(
                "/relay/query", json={"agent_id": "live-agent", "query": "SELECT * FROM shared"}
            )
            assert central.status_code == 200 and central.json().get("answered_by") is None

            query = "SELECT id, candidate FROM interviews WHERE at >= ? ORDER BY id"
            resp = await client.post(
                "/relay/query", json={"agent_id": "live-agent", "query": query, "params": ["2026-01-02"]}
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["answered_by"] == "live-agent"
            assert resp.json()["rows"] == [["i1", "cand 1"], ["i2", "cand 2"]]

            # Live: a local write is in the next answer at once, with no replication in between.
            await storage.write_data("interviews", {"id": "i9", "candidate": "late", "at": "2026-02-01"})
            resp = await client.post(
                "/relay/query", json={"agent_id": "live-agent", "query": "SELECT count(*), max(id) FROM interviews"}
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["rows"] == [[4, "i9"]] and resp.json()["answered_by"] == "live-agent"

            # The private table is reachable neither centrally nor through the live agent.
            resp = await client.post("/relay/query", json={"agent_id": "live-agent", "query": "SELECT * FROM secrets"})
            assert 400 <= resp.status_code < 500 and "error" in resp.json(), resp.text
            assert "nobody sees this" not in resp.text

            await storage.close()
            resp = await client.post(
                "/relay/query", json={"agent_id": "live-agent", "query": query, "params": ["2026-01-01"]}
            )
            assert resp.status_code == 503, resp.text
            assert resp.json()["error"] == "agent_offline"
            assert "live-agent" in resp.json()["message"]
    finally:
        await storage.close()


async def test_new_epoch_resets_central_copy(htpc: HtpcProcess, tmp_path: Path) -> None:
    v1 = Migration(
        1, "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT);\nCREATE TABLE old_only (k TEXT PRIMARY KEY)"
    )
    v1_new = Migration(1, "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT)", "same agent, new database")
    agent_dir = tmp_path / "agent"
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        async with agent_session(
            "epoch-agent",
            agent_dir,
            htpc_url=htpc.url,
            migrations=[v1],
            visibility={"items": "always", "old_only": "always"},
        ) as first:
            await first.batch_write([{"table": "items", "data": {"id": k, "name": f"old {k}"}} for k in range(50)])
            await first.write_data("old_only", {"k": "x"})
            old_epoch, old_seq = first.epoch, await first.last_committed_seq()
            await first.query_network("SELECT 1", fresh=True)
        old_state = await wait_agent_applied(client, "epoch-agent", old_seq, epoch=old_epoch)
        assert old_state["tables"]["always"] == ["items", "old_only"]

        for suffix in ("", "-wal", "-shm"):
            path = agent_dir / f"epoch-agent.db{suffix}"
            if path.exists():
                os.remove(path)

        async with agent_session(
            "epoch-agent", agent_dir, htpc_url=htpc.url, migrations=[v1_new], visibility={"items": "always"}
        ) as second:
            assert second.epoch != old_epoch
            await second.batch_write([{"table": "items", "data": {"id": k, "name": f"new {k}"}} for k in range(40, 45)])
            new_seq = await second.last_committed_seq()
            assert new_seq < old_seq  # the new history restarts at 1: a watermark check alone would skip it
            answer = await second.query_network("SELECT id, name FROM items ORDER BY id", fresh=True)
            assert answer["rows"] == [[k, f"new {k}"] for k in range(40, 45)]
            state = await wait_agent_applied(client, "epoch-agent", new_seq, epoch=second.epoch)
            assert state["watermark"] == new_seq
            assert state["tables"]["always"] == ["items"]
            resp = await client.post(
                "/relay/query", json={"agent_id": "epoch-agent", "query": "SELECT * FROM old_only"}
            )
            assert resp.status_code == 400 and resp.json()["error"] == "invalid_query", resp.text


async def test_on_demand_table_queried_by_another_agent(htpc: HtpcProcess, tmp_path: Path) -> None:
    migration = Migration(1, "CREATE TABLE interviews (id TEXT PRIMARY KEY, candidate TEXT)")
    async with (
        agent_session(
            "od-owner",
            tmp_path / "agent",
            htpc_url=htpc.url,
            migrations=[migration],
            visibility={"interviews": "on_demand"},
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        await storage.write_data("interviews", {"id": "i1", "candidate": "Ada"})
        await wait_agent_applied(client, "od-owner", await storage.last_committed_seq(), epoch=storage.epoch)
        resp = await client.post(
            "/relay/query",
            json={"agent_id": "od-asker", "query": 'SELECT id, candidate FROM "od-owner".interviews', "params": {}},
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["rows"] == [["i1", "Ada"]] and resp.json()["answered_by"] == "od-owner"


# ----------------------------------------------------------------------------- dead letters
async def test_malformed_records_go_to_dead_letters_and_the_consumer_continues(
    htpc: HtpcProcess, nats_server: NatsServer, tmp_path: Path
) -> None:
    valid = forged_record("dl-body", 1, [(1, "S", 0, [])], {"0": FORGED_LAYOUT})
    bad: list[tuple[str, bytes, str]] = [  # (subject agent, payload, expected reason fragment)
        ("dl-garbage", b"{this is not json", "not valid JSON"),
        (
            "dl-version",
            orjson.dumps({**orjson.loads(valid), "v": 99, "agent_id": "dl-version"}),
            "unknown record version",
        ),
        ("dl-subject", valid, "but was published on"),
        ("dl-trunc", valid[: len(valid) // 2], "not valid JSON"),
        ("dl-array", b"[1, 2, 3]", "not a JSON object"),
        ("dl-kind", orjson.dumps({"v": 1, "kind": "gossip", "agent_id": "dl-kind"}), "unknown record kind"),
        ("dl-gaps", orjson.dumps({**orjson.loads(valid), "agent_id": "dl-gaps", "last_seq": 5}), "invalid changes"),
        (
            "dl-relay",
            orjson.dumps(
                {"v": 1, "kind": "relay", "agent_id": "dl-relay", "rows": [{"table": "t", "data": {"x; DROP": 1}}]}
            ),
            "a relay record may not be published on 'agents.dl-relay.changes'",
        ),
        (
            "dl-forged",
            forged_record("dl-forged", 1, [(1, "S", 0, [])], {"0": FORGED_LAYOUT}),
            "",
        ),  # valid: creates t(id, name)
        (
            "dl-forged",
            forged_record(
                "dl-forged", 2, [(2, "U", 0, [1, "x"])], {"0": {**FORGED_LAYOUT, "columns": ["id", "nickname"]}}
            ),
            "schema mismatch",
        ),
        (
            "dl-forged",
            forged_record("dl-forged", 3, [(3, "U", 0, [2, "y"])], {"0": FORGED_LAYOUT}),
            "",
        ),  # waits behind seq 2
        (
            "dl-unknown-table",
            forged_record("dl-unknown-table", 1, [(1, "U", 0, [1, "x"])], {"0": FORGED_LAYOUT}),
            "not replicated here",
        ),
        ("dl-bigint", forged_record("dl-bigint", 1, [(1, "S", 0, [])], {"0": FORGED_LAYOUT}), ""),
        ("dl-bigint", forged_record("dl-bigint", 2, [(2, "U", 0, [2**63, "x"])], {"0": FORGED_LAYOUT}), "bad value"),
    ]
    expected = [(agent, reason) for agent, _payload, reason in bad if reason]

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for agent, payload, _reason in bad:
            ack = await js.publish(changes_subject(agent), payload)
            assert ack.stream == STREAM_NAME
    finally:
        await nc.close()

    migration = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    async with (
        agent_session(
            "dl-valid", tmp_path / "agent", htpc_url=htpc.url, migrations=[migration], visibility={"notes": "always"}
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        await storage.batch_write([{"table": "notes", "data": {"id": k, "body": f"after {k}"}} for k in range(10)])
        answer = await storage.query_network("SELECT count(*) FROM notes", fresh=True)
        assert answer["rows"] == [[10]]

        letters = (await client.get("/relay/dead-letters", params={"limit": 1000})).json()["dead_letters"]
        got = sorted((d["agent_id"], d["subject"], d["reason"]) for d in letters)
        assert len(got) == len(expected), got
        for agent, reason in expected:
            assert any(a == agent and s == changes_subject(agent) and reason in r for a, s, r in got), (agent, got)
        assert all(d["stream_seq"] > 0 and d["payload_bytes"] > 0 for d in letters)

        metrics = (await client.get("/metrics")).text
        assert f"\nreplicator_dead_letters {float(len(expected))}\n" in metrics
        assert f"\nreplicator_records_dead_letters_total {float(len(expected))}\n" in metrics

        # The forged agent's order is broken at seq 2: seq 1 applied, seq 3 waits; health and /relay/agents say so.
        forged = (await client.get("/relay/agents/dl-forged")).json()
        assert forged["watermark"] == 1 and forged["dead_letters"] == 1
        assert forged["blocked"] and "2-2" in forged["blocked"]
        resp = await client.post("/relay/query", json={"agent_id": "dl-forged", "query": "SELECT count(*) FROM t"})
        assert resp.json()["rows"] == [[0]]
        health = (await client.get("/health")).json()
        # Every agent whose change record was dead-lettered is blocked; the decode failures have no order to break.
        blocked = ["dl-bigint", "dl-forged", "dl-unknown-table"]
        assert health["dead_letters"] == len(expected) and sorted(health["blocked_agents"]) == blocked, health
        # Each is named (blocked, and a resync of it requested that its agent never answers); nothing else is.
        assert health["status"] == "degraded", health
        assert {a for a in blocked if any(a in p for p in health["problems"])} == set(blocked), health
        assert all(any(a in p for a in blocked) for p in health["problems"]), health
        pending = (await client.get("/relay/resyncs")).json()["resyncs"]
        assert sorted(r["agent_id"] for r in pending) == blocked

        cli = await asyncio.to_thread(run_cli, "dead-letters", "--url", htpc.url, "--limit", "100")
        assert cli.returncode == 0, cli.stderr
        lines = [line for line in cli.stdout.splitlines() if line.startswith("#")]
        assert len(lines) == len(expected), cli.stdout
        for d in letters:
            assert any(
                line.startswith(f"#{d['id']} ") and f"agent={d['agent_id']}" in line and d["reason"] in line
                for line in lines
            ), (d, cli.stdout)
        cli = await asyncio.to_thread(run_cli, "dead-letters", "--url", htpc.url, "--agent", "dl-forged")
        assert cli.returncode == 0 and len(cli.stdout.strip().splitlines()) == 1, cli.stdout
        assert "agent=dl-forged" in cli.stdout and "schema mismatch" in cli.stdout

        # And still later writes of the valid agent keep arriving.
        await storage.write_data("notes", {"id": 99, "body": "much later"})
        answer = await storage.query_network("SELECT body FROM notes WHERE id = 99", fresh=True)
        assert answer["rows"] == [["much later"]]

        # A restart forgets nothing: the dead letters, and that dl-forged is still blocked behind one.
        await asyncio.to_thread(htpc.stop)
        await asyncio.to_thread(htpc.start)
        await storage.write_data("notes", {"id": 100, "body": "after restart"})
        answer = await storage.query_network("SELECT body FROM notes WHERE id = 100", fresh=True)
        assert answer["rows"] == [["after restart"]]
        health = (await client.get("/health")).json()
        assert health["dead_letters"] == len(expected), health
        assert sorted(health["blocked_agents"]) == blocked, health
        forged = (await client.get("/relay/agents/dl-forged")).json()
        assert forged["watermark"] == 1 and "2-2" in forged["blocked"]


async def test_relay_write_while_nats_is_down_is_a_clear_503_then_works_again(
    htpc: HtpcProcess, nats_server: NatsServer
) -> None:
    row = {"agent_id": "outage-agent", "table": "events", "data": {"id": 1, "what": "before"}}
    async with httpx.AsyncClient(base_url=htpc.url, timeout=15) as client:
        assert (await client.post("/relay/immediate", json=row)).status_code == 202
        await asyncio.to_thread(nats_server.kill)

        resp = await client.post("/relay/immediate", json={**row, "data": {"id": 2, "what": "during"}})
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"] == "nats_unavailable"

        async def degraded() -> dict[str, Any] | None:
            health = (await client.get("/health")).json()
            return health if health["status"] == "degraded" else None

        health = await apoll(degraded, 20, "/health to report the lost NATS connection")
        assert health["nats"]["connected"] is False
        # Reads keep working from the central copy while NATS is away.
        resp = await client.post("/relay/query", json={"agent_id": "outage-agent", "query": "SELECT id FROM events"})
        assert resp.status_code == 200 and resp.json()["rows"] == [[1]]

        await asyncio.to_thread(nats_server.start)

        async def accepted() -> httpx.Response | None:
            resp = await client.post("/relay/immediate", json={**row, "data": {"id": 3, "what": "after"}})
            return resp if resp.status_code == 202 else None

        await apoll(accepted, 30, "relay writes accepted again once NATS is back", interval=0.2)

        async def applied() -> bool:
            resp = await client.post(
                "/relay/query", json={"agent_id": "outage-agent", "query": "SELECT id FROM events ORDER BY id"}
            )
            return resp.status_code == 200 and resp.json()["rows"] == [[1], [3]]

        await apoll(applied, 30, "the write after the outage applied (the refused one never was)")
        assert (await client.get("/health")).json()["status"] == "ok"


async def test_text_that_is_not_utf8_replicates_with_its_exact_bytes_and_storage_class(
    htpc: HtpcProcess, tmp_path: Path
) -> None:
    migration = Migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, any_col)")
    async with (
        agent_session(
            "bytes-agent", tmp_path / "agent", htpc_url=htpc.url, migrations=[migration], visibility={"t": "always"}
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        async with storage.transaction() as tx:  # what another process's raw SQL can store
            await tx.execute("INSERT INTO t VALUES (1, CAST(X'C3FF28' AS TEXT), CAST(X'80' AS TEXT))")
            await tx.execute("INSERT INTO t VALUES (2, 'plain', X'C3FF28')")
        await storage.flush(timeout=10)
        await wait_agent_applied(client, "bytes-agent", await storage.last_committed_seq(), epoch=storage.epoch)
        sql = "SELECT id, typeof(v), hex(v), typeof(any_col), hex(any_col) FROM t ORDER BY id"
        central = sqlite_rows(central_db_path(htpc.data_dir, "bytes-agent"), sql)
        assert central == sqlite_rows(storage.db_path, sql)
        assert central == [(1, "text", "C3FF28", "text", "80"), (2, "text", "706C61696E", "blob", "C3FF28")]
        resp = await client.post(
            "/relay/query", json={"agent_id": "bytes-agent", "query": "SELECT v, any_col FROM t ORDER BY id"}
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["rows"] == [[{"t": "w/8o"}, {"t": "gA=="}], ["plain", {"b": "w/8o"}]]
