"""Issue 9, the read-only query path: one principal's queries cannot stall, starve or read past another's.

A real `replicator serve --auth on` (its embedded nats-server secured by per-agent keys) holds a victim's
rows and an attacker's megabyte strings, both replicated by real AgentStorage instances with their own keys.
The attacker then runs, with its own token, the queries that used to take 10-25 s in one SQLite step
(instr, LIKE, GLOB, replace, trim on megabytes, printf('%.*c', N), zeroblob), answers of hundreds of
megabytes, a prepare-time bomb, 300 distinct sets of attached agents, and reads of other agents' schemas.
Each is answered with a clear 4xx (or 408 query_timeout) and a stable code; while the attacker holds all
the queries it may run at once, its next one is refused 429 and the victim's queries are answered with
all their rows. Wall times are printed beside the time bound (run with -s); nothing is asserted on time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_client import AgentStorage, Migration
from tests.support.credentials import make_credentials, run_in_thread
from tests.support.htpc import HtpcProcess, apoll, poll, run_cli

TIMEOUT_MS = 1000
POOL_SIZE = 4
MAX_RESULT = 4_000_000
MAX_VALUE = 1_048_576
BIG = 3_000_000  # characters of each of the attacker's stored strings
VICTIM_ROWS = [(k, f"item {k}", k * 0.25) for k in range(50)]
POOL_AGENTS = [f"pool-{k:02d}" for k in range(12)]

VICTIM_SCHEMA = [Migration(1, "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL)")]
ATTACKER_SCHEMA = [
    Migration(
        1,
        "CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT);\nCREATE TABLE nums (id INTEGER PRIMARY KEY, n INTEGER)",
    )
]
LIVE_SCHEMA = [Migration(1, "CREATE TABLE interviews (id TEXT PRIMARY KEY, notes TEXT)")]


@dataclass
class Iso:
    htpc: HtpcProcess
    tokens: dict[str, str]
    seeds: dict[str, Path]

    def client(self, who: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.htpc.url, headers={"Authorization": f"Bearer {self.tokens[who]}"}, timeout=30
        )


async def _replicate(iso: Iso, agent: str, base: Path, schema: list[Migration], rows: dict[str, list[Any]]) -> None:
    async with AgentStorage(
        agent,
        base / agent,
        htpc_url=iso.htpc.url,
        nats_seed_file=iso.seeds[agent],
        htpc_token=iso.tokens[agent],
    ) as storage:
        await storage.migrate(schema)
        for table, data in rows.items():
            await storage.set_visibility(table, "always")
            await storage.batch_write([{"table": table, "data": d} for d in data])
        await storage.flush(timeout=30)
        seq, epoch = await storage.last_committed_seq(), storage.epoch
    async with iso.client("ops") as ops:

        async def applied() -> bool:
            resp = await ops.get(f"/relay/agents/{agent}")
            return resp.status_code == 200 and resp.json()["epoch"] == epoch and resp.json()["watermark"] >= seq

        await apoll(applied, 60, f"{agent} applied")


async def _seed(iso: Iso, base: Path) -> None:
    await _replicate(
        iso, "victim", base, VICTIM_SCHEMA, {"items": [{"id": k, "name": n, "price": p} for k, n, p in VICTIM_ROWS]}
    )
    await _replicate(
        iso,
        "attacker",
        base,
        ATTACKER_SCHEMA,
        {
            "big": [{"id": 1, "v": "a" * BIG}, {"id": 2, "v": "ab" * (BIG // 2)}],
            "nums": [{"id": k, "n": k} for k in range(50)],
        },
    )
    async with iso.client("ops") as ops:
        for agent in POOL_AGENTS:
            resp = await ops.post("/relay/immediate", json={"agent_id": agent, "table": "t", "data": {"id": 1}})
            assert resp.status_code == 202, resp.text

        async def all_applied() -> bool:
            for agent in POOL_AGENTS:
                resp = await ops.post("/relay/query", json={"agent_id": agent, "query": "SELECT count(*) FROM t"})
                if resp.status_code != 200 or resp.json()["rows"] != [[1]]:
                    return False
            return True

        await apoll(all_applied, 60, "pool agents applied")


@pytest.fixture(scope="module")
def iso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Iso]:
    base = tmp_path_factory.mktemp("iso-query")
    data = base / "htpc"
    tokens, seeds = make_credentials(data, ("victim", "attacker", "live"))
    assert run_cli("auth", "--data-dir", str(data), "share", "live", "--with", "attacker").returncode == 0
    htpc = HtpcProcess(
        data,
        None,
        extra_args=[
            "--auth",
            "on",
            "--query-timeout-ms",
            str(TIMEOUT_MS),
            "--query-max-concurrent",
            "2",
            "--query-pool-size",
            str(POOL_SIZE),
            "--query-max-result-bytes",
            str(MAX_RESULT),
            "--query-max-value-bytes",
            str(MAX_VALUE),
        ],
    )
    htpc.start()
    try:
        result = Iso(htpc, tokens, seeds)
        run_in_thread(lambda: _seed(result, base / "agents"), timeout=150)
        yield result
    finally:
        htpc.close()


async def _query(client: httpx.AsyncClient, agent: str, sql: str, **extra: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = await client.post("/relay/query", json={"agent_id": agent, "query": sql, **extra})
    return resp, time.monotonic() - started


async def _victim_reads_everything(iso: Iso) -> list[float]:
    """The victim's own query, five times: every row, exactly; returns the latencies."""
    latencies = []
    async with iso.client("victim") as victim:
        for _ in range(5):
            resp, took = await _query(victim, "victim", "SELECT id, name, price FROM items ORDER BY id")
            assert resp.status_code == 200, resp.text
            assert [tuple(r) for r in resp.json()["rows"]] == VICTIM_ROWS
            latencies.append(took)
    return latencies


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


# One SQLite step each, 10-25 s (or minutes) with SQLite's builtins on these 3 MB strings.
ONE_STEP_ATTACKS = {
    "instr": "SELECT count(*) FROM big WHERE instr(v, substr(v, 1, 1000000) || 'c')",
    "like literal": "SELECT count(*) FROM big WHERE v LIKE '%' || substr(v, 1, 9000) || 'b%'",
    "like one-char wildcards": (
        "SELECT count(*) FROM big WHERE v LIKE '%' || replace(substr(v, 1, 4000), 'a', '_') || 'c%'"
    ),
    "glob": "SELECT count(*) FROM big WHERE v GLOB '*' || replace(substr(v, 1, 3000), 'a', '?') || 'c*'",
    "replace": "SELECT length(replace(v, substr(v, 1, 1000000) || 'c', 'x')) FROM big",
    "trim": "SELECT length(trim(v, replace(substr(v, 1, 1000000), 'a', 'c') || 'a')) FROM big",
    "strftime": "SELECT length(strftime(replace(substr(v, 1, 8000000), 'a', '%J'), 'now')) FROM big",
}


@pytest.mark.parametrize("name", list(ONE_STEP_ATTACKS))
async def test_one_step_attack_ends_within_its_bound(iso: Iso, name: str) -> None:
    async with iso.client("attacker") as attacker:
        resp, took = await _query(attacker, "attacker", ONE_STEP_ATTACKS[name])
    body = resp.json()
    print(
        f"\n{name:25s} -> {resp.status_code} {body.get('error', body.get('rows'))} in {took:.3f} s "
        f"(timeout {TIMEOUT_MS / 1000} s)"
    )
    assert resp.status_code in (200, 408, 422), resp.text
    if resp.status_code != 200:
        assert body["error"] in ("query_timeout", "query_too_complex"), body
    assert await _victim_reads_everything(iso)


@pytest.mark.parametrize(
    ("sql", "code"),
    [
        ("SELECT printf('%.*c', 1000000000, 'x')", "value_too_large"),
        ("SELECT format('%1000000000d', 1)", "value_too_large"),
        ("SELECT zeroblob(16000000) FROM nums LIMIT 12", "value_too_large"),
        ("SELECT randomblob(100000000)", "value_too_large"),
        ("SELECT length(printf('%s', v)) FROM big", "value_too_large"),
    ],
)
async def test_values_a_query_makes_are_bounded(iso: Iso, sql: str, code: str) -> None:
    async with iso.client("attacker") as attacker:
        resp, took = await _query(attacker, "attacker", sql)
    print(f"\n{sql:50s} -> {resp.status_code} in {took:.3f} s")
    assert resp.status_code == 422 and resp.json()["error"] == code, resp.text
    assert str(MAX_VALUE) in resp.json()["message"]


async def test_answer_size_is_bounded_in_bytes(iso: Iso) -> None:
    rss_before = _rss_mb(iso.htpc.pid)
    async with iso.client("attacker") as attacker:
        resp, took = await _query(attacker, "attacker", "SELECT zeroblob(1000000) FROM nums")  # 50 MB of rows
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] == "result_too_large" and str(MAX_RESULT) in resp.json()["message"]
        big_rows, took_big = await _query(attacker, "attacker", "SELECT v FROM big UNION ALL SELECT v FROM big")
        assert big_rows.status_code == 422 and big_rows.json()["error"] == "result_too_large", big_rows.text
        ok, _ = await _query(attacker, "attacker", "SELECT id, length(v) FROM big ORDER BY id")
        assert ok.status_code == 200 and ok.json()["rows"] == [[1, BIG], [2, BIG]]
        one, _ = await _query(attacker, "attacker", "SELECT v FROM big WHERE id = 1")  # 3 MB: under the bound
        assert one.status_code == 200 and one.json()["rows"] == [["a" * BIG]]
    rss_after = _rss_mb(iso.htpc.pid)
    print(
        f"\n50 MB answer refused in {took:.3f} s, 12 MB in {took_big:.3f} s; HTPC RSS {rss_before[0]:.0f} -> "
        f"{rss_after[0]:.0f} MB (peak {rss_after[1]:.0f} MB); limit {MAX_RESULT} bytes"
    )


async def test_attacker_at_its_maximum_is_refused_while_the_victim_is_served(iso: Iso) -> None:
    """Two slow queries are all the attacker may run; its next four get 429 and the victim is not slowed."""
    slow = "SELECT count(*) FROM big WHERE v LIKE '%' || replace(substr(v, 1, 4000), 'a', '_') || 'c%'"
    baseline = await _victim_reads_everything(iso)
    async with iso.client("attacker") as attacker, iso.client("ops") as ops:
        held = [asyncio.ensure_future(_query(attacker, "attacker", slow, timeout_ms=3000)) for _ in range(2)]
        await asyncio.sleep(0.3)
        refused = await asyncio.gather(*(_query(attacker, "attacker", slow) for _ in range(4)))
        latencies = await _victim_reads_everything(iso)
        op, _ = await _query(ops, "victim", "SELECT count(*), total(price) FROM items")
        health_started = time.monotonic()
        health = await ops.get("/health")
        health_took = time.monotonic() - health_started
        results = await asyncio.gather(*held)
    for resp, _took in refused:
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"] == "too_many_queries" and resp.headers["Retry-After"] == "1"
    assert op.status_code == 200 and op.json()["rows"] == [[50, sum(p for _k, _n, p in VICTIM_ROWS)]]
    assert health.status_code == 200
    for resp, _took in results:
        assert resp.status_code == 408 and resp.json()["error"] == "query_timeout", resp.text
    print(
        f"\nattacker's held queries: {[round(t, 3) for _r, t in results]} s (timeout 3 s); refused in "
        f"{[round(t, 4) for _r, t in refused]} s; victim latencies {[round(t, 4) for t in latencies]} s "
        f"(before the attack {[round(t, 4) for t in baseline]} s); "
        f"/health {health_took:.4f} s"
    )
    async with iso.client("attacker") as attacker:  # its slots are back once its queries ended
        resp, _ = await _query(attacker, "attacker", "SELECT count(*) FROM nums")
        assert resp.status_code == 200 and resp.json()["rows"] == [[50]]


async def test_one_row_of_many_linear_calls_is_answered_at_its_bound(iso: Iso) -> None:
    """600 upper() calls on a 3 MB value in one row: SQLite checks its progress handler only between rows.

    The caller is answered 408 at its bound (+ grace); SQLite's thread finishes in the background and keeps
    one of the attacker's two slots meanwhile, while the victim is served.
    """
    bomb = "SELECT " + " + ".join(["length(upper(v))"] * 600) + " FROM big WHERE id = 1"
    async with iso.client("attacker") as attacker:
        resp, took = await _query(attacker, "attacker", bomb)
    latencies = await _victim_reads_everything(iso)
    print(
        f"\n600 x upper(3 MB) in one row -> {resp.status_code} {resp.json().get('error')} in {took:.3f} s "
        f"(timeout {TIMEOUT_MS / 1000} s); victim latencies meanwhile {[round(t, 4) for t in latencies]} s"
    )
    assert resp.status_code == 408 and resp.json()["error"] == "query_timeout", resp.text


async def test_prepare_time_bomb_is_refused(iso: Iso) -> None:
    parts = ["a0(x) AS (SELECT 1)"]
    for i in range(1, 21):
        p = f"a{i - 1}"
        parts.append(
            f"a{i}(x) AS (SELECT (SELECT max(x) FROM {p}) + (SELECT min(x) FROM {p}) + (SELECT count(x) FROM {p}))"
        )
    bomb = "WITH " + ", ".join(parts) + " SELECT x FROM a20"  # 2 KB; SQLite alone: minutes and gigabytes
    async with iso.client("attacker") as attacker:
        resp, took = await _query(attacker, "attacker", bomb)
    print(f"\n{len(bomb)}-byte CTE bomb -> {resp.status_code} in {took:.4f} s")
    assert resp.status_code == 422 and resp.json()["error"] == "query_too_complex", resp.text
    assert iso.htpc.running
    assert await _victim_reads_everything(iso)


async def test_pool_of_query_connections_stays_bounded_in_open_files(iso: Iso) -> None:
    """300 distinct sets of attached agents: open files of the HTPC return to a bounded number."""
    sets = [c for size in (1, 2, 3, 4) for c in itertools.combinations(POOL_AGENTS, size)][:300]
    async with iso.client("ops") as ops:
        for agent in POOL_AGENTS[:POOL_SIZE]:  # warm: the pool holds POOL_SIZE connections already
            await _query(ops, agent, "SELECT 1 FROM t")
        before = _fd_count(iso.htpc.pid)
        peak = before
        for k, agents in enumerate(sets):
            sql = "SELECT count(*) FROM " + ", ".join(f'"{a}".t' for a in agents)
            resp, _ = await _query(ops, POOL_AGENTS[k % len(POOL_AGENTS)], sql)
            assert resp.status_code == 200 and resp.json()["rows"] == [[1]], resp.text
            if k % 25 == 0:
                peak = max(peak, _fd_count(iso.htpc.pid))
        after = _fd_count(iso.htpc.pid)
        metrics = await ops.get("/health")
    files_per_connection = 3 * (1 + 4)  # main + 4 attached, each with -wal and -shm
    print(
        f"\nopen files of the HTPC: {before} before, peak {peak}, {after} after {len(sets)} distinct attach sets "
        f"(pool {POOL_SIZE} connections)"
    )
    assert metrics.status_code == 200
    assert after <= before + POOL_SIZE * files_per_connection + 10
    assert peak <= before + (POOL_SIZE + 8) * files_per_connection + 10


@pytest.mark.parametrize(
    "sql",
    [
        'SELECT name, sql FROM "victim".sqlite_master',
        'SELECT name FROM "victim".sqlite_schema',
        'SELECT count(*) FROM "victim".sqlite_master',
        'SELECT * FROM "victim"._cr_state',
        "SELECT name FROM dbstat",
        'SELECT name FROM "victim".dbstat',
        "SELECT sql FROM sqlite_stmt",
        "SELECT json_patch('{}', '{\"a\":1}')",
    ],
)
async def test_other_agents_schema_and_internals_are_hidden(iso: Iso, sql: str) -> None:
    async with iso.client("attacker") as attacker:
        resp, _ = await _query(attacker, "attacker", sql)
    assert resp.status_code == 403 and resp.json()["error"] == "query_not_allowed", resp.text
    assert "rows" not in resp.json()


async def test_own_schema_stays_readable(iso: Iso) -> None:
    """Decision: an agent may read its own schema (not its internal tables' rows), and other agents' tables."""
    async with iso.client("attacker") as attacker:
        own, _ = await _query(attacker, "attacker", "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        qualified, _ = await _query(attacker, "attacker", 'SELECT count(*) FROM "attacker".sqlite_master')
        rows, _ = await _query(attacker, "attacker", 'SELECT count(*) FROM "victim".items')
    assert own.status_code == 200 and ["big"] in own.json()["rows"] and ["nums"] in own.json()["rows"]
    assert qualified.status_code == 200
    assert rows.status_code == 200 and rows.json()["rows"] == [[50]]


def _flatten_bomb(levels: int, inner: str) -> str:
    """Nested FROM subqueries each naming the column below three times: SQLite copies it 3**levels times."""
    q = inner
    for i in range(1, levels + 1):
        q = f"SELECT x{i - 1} || x{i - 1} || x{i - 1} AS x{i} FROM ({q})"
    return q


async def test_on_demand_queries_answered_by_the_agent_have_the_same_bounds(iso: Iso, tmp_path: Path) -> None:
    """The live agent answers the attacker's forwarded queries itself: the same guards stop them there."""
    attacks = {
        "like": "SELECT count(*) FROM interviews WHERE hex(zeroblob(1000000)) LIKE "
        "'%' || substr(replace(hex(zeroblob(2500)), '0', '_'), 1, 4990) || '1%'",
        "printf": "SELECT printf('%.*c', 1000000000, 'x') FROM interviews",
        "bomb": _flatten_bomb(14, 'SELECT notes AS x0 FROM "live".interviews'),
    }
    async with AgentStorage(
        "live",
        tmp_path / "live",
        htpc_url=iso.htpc.url,
        nats_seed_file=iso.seeds["live"],
        htpc_token=iso.tokens["live"],
    ) as live:
        await live.migrate(LIVE_SCHEMA)
        await live.set_visibility("interviews", "on_demand")
        await live.batch_write([{"table": "interviews", "data": {"id": f"i{k}", "notes": f"n{k}"}} for k in range(5)])
        await live.flush(timeout=30)
        async with iso.client("attacker") as attacker:

            async def declared() -> bool:
                resp, _ = await _query(attacker, "attacker", 'SELECT count(*) FROM "live".interviews')
                return resp.status_code == 200

            await apoll(declared, 30, "live's on_demand table known to the HTPC")
            for name, sql in attacks.items():
                resp, took = await _query(
                    attacker, "attacker", sql.replace("FROM interviews", 'FROM "live".interviews')
                )
                print(
                    f"\non_demand {name:8s} -> {resp.status_code} {resp.json().get('error')} in {took:.3f} s "
                    f"(timeout {TIMEOUT_MS / 1000} s)"
                )
                assert resp.status_code in (408, 422), resp.text
                assert resp.json()["error"] in ("query_timeout", "value_too_large", "query_too_complex")
            ok, _ = await _query(attacker, "attacker", 'SELECT id, notes FROM "live".interviews ORDER BY id')
            assert ok.status_code == 200 and ok.json()["answered_by"] == "live"
            assert ok.json()["rows"] == [[f"i{k}", f"n{k}"] for k in range(5)]
        local = await live.query_local("SELECT id, notes FROM interviews ORDER BY id")
        assert local == [{"id": f"i{k}", "notes": f"n{k}"} for k in range(5)]


def test_htpc_survived_every_attack(iso: Iso) -> None:
    assert iso.htpc.running
    poll(lambda: iso.htpc.get("/health").status_code == 200, 5, "/health")
