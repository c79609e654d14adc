"""Queries across every agent (issue 12): `"*".t` and a join naming every agent, 50 agents x 1,000 rows.

.venv/bin/python bench/network_query.py [--agents 50] [--rows 1000] [--runs 300] [--warmup 20]

Starts a nats-server and `replicator serve`, writes `--rows` rows into table `items` of each of `--agents`
HTTP-only agents (`/relay/batch`), waits until every agent's copy holds them, then checks the network view
before measuring: `SELECT ... FROM "*".items WHERE agent_id = ?` for every agent must equal the rows written
(count + sha256), and the `"*"` total must be agents x rows. Measured over HTTP (`/relay/query`, one client,
sequential), after `--warmup` untimed runs:

- filter: `SELECT agent_id, id, name, price FROM "*".items WHERE grp = 7 AND price > 500` (a scan of the union);
- join: `"a00".items x0 JOIN "a01".items x1 ON x1.id = x0.id ... JOIN "a49".items` (every agent named) with a
  filter on x0, summing one column of every agent (9 agents are attached, the others read from the network
  store);
- first `"*"` query after the network table was dropped (a cold fill from every agent's snapshot), once.

Floors in the same run: the same two queries on one plain SQLite file holding the same union (table
`items(agent_id, id, ...)`, primary key (agent_id, id)), run in this process, with the statement cached and
prepared each time; `SELECT 1` over
`/relay/query` (the HTTP round trip every answer pays); for the filter also the same query over
`/relay/query` on one agent whose own table `union_items` holds the same union (what a `"*"` answer would
cost with no network store at all). The join has no such HTTP floor; its honest floor is the plain file with
the statement prepared each time, as /relay/query prepares every statement (its authorizer must see it):
a 50-way join spends most of its time in SQLite's planner. Every answer is compared with the floors'.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Replicator, bench_dir, nats_server, pct, report, summary

from agent_client import decode_value

ASKER = "bench-asker"
UNION = "bench-union"  # an agent whose own table holds the union (the filter's /relay/query floor)


def agent_name(i: int) -> str:
    return f"a{i:02d}"


def row(agent: str, k: int) -> dict[str, Any]:
    return {
        "id": k,
        "grp": k % 50,
        "price": float((k * 37 + len(agent) * 11 + int(agent[1:]) * 13) % 1000),
        "name": f"{agent}-{k}",
    }


def digest(rows: list[Any]) -> tuple[int, str]:
    encoded = sorted(repr(tuple(r)) for r in rows)
    return len(encoded), hashlib.sha256("\n".join(encoded).encode()).hexdigest()


FILTER = 'SELECT agent_id, id, name, price FROM "*".items WHERE grp = 7 AND price > 500'
FILTER_FLOOR = "SELECT agent_id, id, name, price FROM items WHERE grp = 7 AND price > 500"
FILTER_UNION = "SELECT owner, k, name, price FROM union_items WHERE grp = 7 AND price > 500"


def join_sql(agents: list[str], floor: bool) -> str:
    def source(i: int, a: str) -> str:
        return f"(SELECT * FROM items WHERE agent_id = '{a}') x{i}" if floor else f'"{a}".items x{i}'

    joins = " ".join(f"JOIN {source(i, a)} ON x{i}.id = x0.id" for i, a in enumerate(agents) if i)
    total = " + ".join(f"x{i}.price" for i in range(len(agents)))
    return f"SELECT x0.id, {total} FROM {source(0, agents[0])} {joins} WHERE x0.grp = 7 ORDER BY x0.id"


async def query(
    client: httpx.AsyncClient, sql: str, params: list[Any] | None = None, asker: str = ASKER, timeout_ms: int = 2000
) -> list[list[Any]]:
    resp = await client.post(
        "/relay/query",
        json={"agent_id": asker, "query": sql, "params": params or [], "max_rows": 10_000, "timeout_ms": timeout_ms},
    )
    if resp.status_code != 200:
        raise RuntimeError(f"{sql[:80]}...: {resp.status_code} {resp.text[:300]}")
    body = resp.json()
    assert not body["truncated"]
    return [[decode_value(v) for v in r] for r in body["rows"]]


async def timed(
    client: httpx.AsyncClient, sql: str, runs: int, warmup: int, asker: str = ASKER
) -> tuple[list[float], list[list[Any]]]:
    answer: list[list[Any]] = []
    for _ in range(warmup):
        answer = await query(client, sql, asker=asker)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        answer = await query(client, sql, asker=asker)
        times.append((time.perf_counter() - t0) * 1000)
    return times, answer


def floor_times(conn: sqlite3.Connection, sql: str, runs: int) -> tuple[list[float], list[Any]]:
    answer: list[Any] = []
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        answer = conn.execute(sql).fetchall()
        times.append((time.perf_counter() - t0) * 1000)
    return times, answer


async def run(base: Path, args: argparse.Namespace) -> None:
    agents = [agent_name(i) for i in range(args.agents)]
    expected = {a: [(a, k, row(a, k)["name"], row(a, k)["price"]) for k in range(args.rows)] for a in agents}
    with nats_server(base / "nats") as (nats_url, _nats):
        rep = Replicator(base / "htpc", nats_url)
        rep.start()
        try:
            async with httpx.AsyncClient(base_url=rep.url, timeout=120) as client:
                t0 = time.perf_counter()
                records = [
                    {"agent_id": a, "table": "items", "data": row(a, k)} for a in agents for k in range(args.rows)
                ]
                records.append(
                    {"agent_id": ASKER, "table": "items", "data": {"id": 0, "grp": 0, "price": 0.0, "name": "asker"}}
                )
                records += [
                    {
                        "agent_id": UNION,
                        "table": "union_items",
                        "data": {
                            "id": i * 100_000 + k,
                            "owner": a,
                            "k": k,
                            **{c: row(a, k)[c] for c in ("grp", "price", "name")},
                        },
                    }
                    for i, a in enumerate(agents)
                    for k in range(args.rows)
                ]
                for i in range(0, len(records), 1000):
                    resp = await client.post("/relay/batch", json={"records": records[i : i + 1000]})
                    resp.raise_for_status()
                for a, table, n in [
                    *((a, "items", args.rows) for a in agents),
                    (UNION, "union_items", len(agents) * args.rows),
                ]:
                    while True:
                        resp = await client.post(
                            "/relay/query", json={"agent_id": a, "query": f"SELECT count(*) FROM {table}"}
                        )
                        if resp.status_code == 200 and resp.json()["rows"] == [[n]]:
                            break
                        await asyncio.sleep(0.05)
                report("written and applied (relay batches)", time.perf_counter() - t0, "s")

                # The first "*" query fills the network table from every agent's snapshot (cold).
                t0 = time.perf_counter()
                await query(client, 'SELECT count(*) FROM "*".items', timeout_ms=30_000)
                report('first "*".items query (fills the network table: cold)', time.perf_counter() - t0, "s")

                # Verify the network view before measuring anything.
                valid = True
                for a in agents:
                    got = await query(client, 'SELECT agent_id, id, name, price FROM "*".items WHERE agent_id = ?', [a])
                    if digest(got) != digest(expected[a]):
                        print(f'  WRONG: {a}\'s rows in "*".items differ from what was written')
                        valid = False
                total = await query(client, 'SELECT count(*) FROM "*".items')
                want_total = args.agents * args.rows + 1
                if total != [[want_total]]:
                    print(f'  WRONG: "*".items holds {total} rows, not {want_total}')
                    valid = False
                print(
                    f"  data check: {args.agents} agents x {args.rows} rows, "
                    f"per-agent digests {'equal' if valid else 'DIFFER'}"
                )

                # The floor files: the same union in one plain SQLite file, statements cached (execution only) and
                # prepared each time (as /relay/query does: its authorizer sees every statement).
                floor_db = base / "floor.db"
                fconn = sqlite3.connect(floor_db)
                fconn.execute(
                    "CREATE TABLE items (agent_id TEXT, id INTEGER, grp INTEGER, price REAL, name TEXT, "
                    "PRIMARY KEY (agent_id, id))"
                )
                fconn.executemany(
                    "INSERT INTO items VALUES (?, ?, ?, ?, ?)",
                    [
                        (a, r["id"], r["grp"], r["price"], r["name"])
                        for a in agents
                        for r in (row(a, k) for k in range(args.rows))
                    ]
                    + [(ASKER, 0, 0, 0.0, "asker")],
                )
                fconn.commit()
                pconn = sqlite3.connect(floor_db, cached_statements=0)

                round_trip, _ = await timed(client, "SELECT 1", args.runs, args.warmup)
                f_times, f_answer = floor_times(fconn, FILTER_FLOOR, args.runs)
                fp_times, _ = floor_times(pconn, FILTER_FLOOR, args.runs)
                u_times, u_answer = await timed(client, FILTER_UNION, args.runs, args.warmup, asker=UNION)
                q_times, q_answer = await timed(client, FILTER, args.runs, args.warmup)
                filter_ok = digest(q_answer) == digest(f_answer) == digest(u_answer) and len(f_answer) > 0
                j_floor_times, j_floor = floor_times(fconn, join_sql(agents, True), args.runs)
                jp_times, _ = floor_times(pconn, join_sql(agents, True), max(10, args.runs // 5))
                j_times, j_answer = await timed(client, join_sql(agents, False), args.runs, args.warmup)
                join_ok = len(j_answer) == len(j_floor) > 0 and all(
                    a[0] == b[0] and abs(a[1] - b[1]) < 1e-6 for a, b in zip(j_answer, j_floor, strict=True)
                )
                print(
                    f"  filter answer: {len(q_answer)} rows ({'equal' if filter_ok else 'DIFFERENT'} to the floors'); "
                    f"join answer: {len(j_answer)} rows x {args.agents} agents ({'equal' if join_ok else 'DIFFERENT'})"
                )
                fconn.close()
                pconn.close()

                report("HTTP round trip (/relay/query SELECT 1) p50", pct(round_trip, 50), "ms")
                for label, times in (
                    ('"*".items filter', q_times),
                    ("floor: same filter, /relay/query on one agent's own union table", u_times),
                    ("floor: same filter, plain SQLite, prepared each time", fp_times),
                    ("floor: same filter, plain SQLite, statement cached", f_times),
                    (f"{args.agents}-agent join", j_times),
                    ("floor: same join, plain SQLite, prepared each time", jp_times),
                    ("floor: same join, plain SQLite, statement cached", j_floor_times),
                ):
                    report(f"{label} p50", pct(times, 50), "ms")
                    report(f"{label} p99", pct(times, 99), "ms")

                # A fresh write by one agent, then the next "*" query (catch-up of one agent on the query path).
                fresh: list[float] = []
                for k in range(20):
                    resp = await client.post(
                        "/relay/batch",
                        json={
                            "records": [
                                {
                                    "agent_id": agents[k % args.agents],
                                    "table": "items",
                                    "data": {**row(agents[k % args.agents], k), "name": f"fresh {k}"},
                                }
                            ]
                        },
                    )
                    resp.raise_for_status()
                    while True:
                        t0 = time.perf_counter()
                        got = await query(
                            client,
                            'SELECT name FROM "*".items WHERE agent_id = ? AND id = ?',
                            [agents[k % args.agents], k],
                        )
                        if got == [[f"fresh {k}"]]:
                            fresh.append((time.perf_counter() - t0) * 1000)
                            break
                        await asyncio.sleep(0.002)
                report('"*" query after one agent\'s write (catch-up) p50', pct(fresh, 50), "ms")

                ok = valid and filter_ok and join_ok
                for name, q, times, floor in (
                    ('"*".t filter query p50 (50 agents x 1,000 rows)', 50, q_times, u_times),
                    ('"*".t filter query p99', 99, q_times, u_times),
                    ("50-agent join p50", 50, j_times, jp_times),
                    ("50-agent join p99", 99, j_times, jp_times),
                ):
                    summary(name, pct(times, q), "ms", floor=pct(floor, q), target="report", met=True, valid=ok)
                if not ok:
                    raise SystemExit(1)
        finally:
            rep.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    with bench_dir() as base:
        asyncio.run(run(base, args))


if __name__ == "__main__":
    main()
