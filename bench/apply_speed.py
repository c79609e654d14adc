"""HTPC apply speed against its floors: 100-row transactions written and applied end to end, the drain of
one-row records from 100 agents pre-loaded in the stream, and the catch-up of a large backlog (peak RSS).

.venv/bin/python bench/apply_speed.py [--batch-rows 200000] [--agents 100] [--per-agent 200]
                                      [--catchup-rows 1000000] [--only batch drain catchup]

Each phase has its own nats-server, so each stream holds exactly what the phase measures.

batch: one agent writes `--batch-rows` rows in 100-row `batch_write` transactions while `replicator serve`
applies them; timed from the first write until the central watermark (GET /relay/agents/<id>, polled every
10 ms) reaches the last change. Floor: plain sqlite3 executemany of as many 100-row transactions, with the
capture trigger agent_client installs. Checked: central copy == local table (count + sha256).

drain: `--agents` AgentStorage publishers (in 4 worker processes) each write `--per-agent` one-row
`write_data`s, each flushed to JetStream before the next (so each is its own record), with no replicator
running. Then `replicator serve` starts and drains them; the rate is the change records applied (counted
by the floor's pass over the same stream) over the time from the first /metrics sample (polled every
20 ms) showing an applied record to the one showing them all, so process start-up is not counted.
Floor: `_floors.bare_consume`, a bare nats-py push consumer inserting each record into plain sqlite3 (the
records that arrived together share one commit per agent file, acked after it). Checked: every agent's
central copy == its local table, watermarks at the end.

catchup: one agent writes `--catchup-rows` rows in 100-row transactions and flushes them to JetStream with
no replicator running; then `replicator serve` starts; rate = changes applied between the first and the
last watermark sample (polled every 20 ms). Peak RSS = VmHWM of the serve process. Floor: the bare consumer
over the same stream. Checked: central copy == local table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Replicator,
    bench_dir,
    drain_rate,
    metric_total,
    nats_server,
    open_storage,
    report,
    serve_and_sample,
    summary,
    table_digest,
    wait_watermark,
)
from _floors import bare_consume, plain_connect, sqlite_batch_rows_per_s, trigger_db

from agent_client import AgentStorage

WORKERS = 4


async def batch(base: Path, args: argparse.Namespace) -> None:
    txs = args.batch_rows // 100
    floor_conn = plain_connect(await trigger_db(base / "floor"))
    sqlite_batch_rows_per_s(floor_conn, 10, 100)
    floor = sqlite_batch_rows_per_s(floor_conn, txs, 100)
    floor_conn.close()
    with nats_server(base / "js-batch") as (url, _proc):
        rep = Replicator(base / "htpc-batch", url)
        rep.start()
        try:
            st = await open_storage(base / "batch", "bench-batch", url)
            await st.batch_write([{"table": "events", "data": {"kind": "warm", "payload": "w"}}] * 10)
            await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 60)
            t0 = time.perf_counter()
            for i in range(txs):
                await st.batch_write(
                    [
                        {"table": "events", "data": {"kind": "bulk", "payload": f"{i}-{j}", "score": j / 7}}
                        for j in range(100)
                    ]
                )
            written = time.perf_counter() - t0
            done = await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 600)
            await st.close()
            valid = table_digest(st.db_path) == table_digest(rep.central_db(st.agent_id))
        finally:
            rep.stop()
    rate = txs * 100 / (done - t0)
    print(f"batch: {txs * 100:,} rows in 100-row transactions (central == local: {valid})")
    report("plain sqlite3 executemany + capture trigger (floor)", floor, "rows/s")
    report("written at the agent (local commits only)", txs * 100 / written, "rows/s")
    report("written at the agent and applied at the HTPC", rate, "rows/s")
    summary(
        "100-row txns written+applied",
        rate,
        "rows/s",
        floor=floor,
        target=">= 150,000/s and >= 0.5x floor",
        met=rate >= 150_000 and rate >= 0.5 * floor,
        valid=valid,
    )


async def preload_worker(url: str, base: Path, first: int, count: int, per_agent: int, out: Path) -> None:
    """Worker process: `count` agents each write `per_agent` one-row records, one flushed record at a time."""
    agents = [await open_storage(base, f"drain-{k:03d}", url) for k in range(first, first + count)]

    async def write(st: AgentStorage) -> None:
        for i in range(per_agent):
            await st.write_data("events", {"kind": "one", "payload": f"{st.agent_id}-{i}", "score": i / 3})
            await st.flush(timeout=60)

    await asyncio.gather(*(write(st) for st in agents))
    last = {st.agent_id: await st.last_committed_seq() for st in agents}
    for st in agents:
        await st.close()
    out.write_text(json.dumps(last))


async def drain(base: Path, args: argparse.Namespace) -> None:
    with nats_server(base / "js-drain") as (url, _proc):
        per = -(-args.agents // WORKERS)
        workers = []
        t = time.perf_counter()
        for w in range(WORKERS):
            first, count = w * per, min(per, args.agents - w * per)
            if count <= 0:
                continue
            out = base / f"preload-{w}.json"
            argv = [sys.executable, __file__, "--preload-worker", url, str(base / "agents"), str(first), str(count)]
            argv += [str(args.per_agent), str(out)]
            workers.append((subprocess.Popen(argv, start_new_session=True), out))
        last: dict[str, int] = {}
        for proc, out in workers:
            if proc.wait(900) != 0:
                raise RuntimeError("a preload worker failed")
            last.update(json.loads(out.read_text()))
        took = time.perf_counter() - t
        print(f"drain: {args.agents} agents x {args.per_agent} one-row records pre-loaded in {took:.1f} s")

        records, changes, seconds = await bare_consume(url, base / "bare-drain")
        floor = records / seconds

        rep = Replicator(base / "htpc-drain", url)
        try:
            started, samples = await serve_and_sample(
                rep, "/metrics", lambda r: metric_total(r.text, "replicator_records_applied_total"), records
            )
            async with httpx.AsyncClient(timeout=10) as client:
                agents = (await client.get(f"{rep.url}/relay/agents")).json()["agents"]
            watermarks = {a["agent_id"]: a["watermark"] for a in agents}
            valid = all(watermarks.get(agent) == seq for agent, seq in last.items())
            valid = valid and all(
                table_digest(base / "agents" / f"{agent}.db") == table_digest(rep.central_db(agent)) for agent in last
            )
        finally:
            rep.stop()
    rate, how = drain_rate(samples, records, started)
    print(f"  {records:,} change records ({changes:,} row changes) in the stream; every central copy exact: {valid}")
    print(f"  drain {how}")
    report("bare push consumer -> plain sqlite3, a commit per arrival (floor)", floor, "rec/s")
    report("replicator serve draining them", rate, "rec/s")
    summary(
        f"HTPC drain, 1-row records, {args.agents} agents",
        rate,
        "rec/s",
        floor=floor,
        target=">= 15,000/s",
        met=rate >= 15_000,
        valid=valid and bool(samples) and samples[-1][1] >= records,
    )


def _watermark(r: httpx.Response) -> float:
    """The central watermark in a `GET /relay/agents/<id>` answer (0 while the agent is not known yet)."""
    return float(r.json()["watermark"]) if r.status_code == 200 else 0.0


async def catchup(base: Path, args: argparse.Namespace) -> None:
    rows = args.catchup_rows // 100 * 100
    with nats_server(base / "js-catchup") as (url, _proc):
        st = await open_storage(base / "catchup", "bench-catchup", url)
        t = time.perf_counter()
        for i in range(rows // 100):
            await st.batch_write(
                [{"table": "events", "data": {"kind": "c", "payload": f"{i}-{j}", "score": j}} for j in range(100)]
            )
        await st.flush(timeout=900)
        last = await st.last_committed_seq()
        await st.close()
        print(f"catchup: {rows:,} rows written and in JetStream in {time.perf_counter() - t:.1f} s")

        _records, changes, seconds = await bare_consume(url, base / "bare-catchup")
        floor = changes / seconds

        rep = Replicator(base / "htpc-catchup", url)
        try:
            started, samples = await serve_and_sample(rep, f"/relay/agents/{st.agent_id}", _watermark, last)
            rss = rep.peak_rss_mb()
            valid = samples[-1][1] >= last and table_digest(st.db_path) == table_digest(rep.central_db(st.agent_id))
        finally:
            rep.stop()
    rate, how = drain_rate(samples, last, started)
    valid = valid and changes >= rows
    print(f"  {changes:,} row changes in the stream; central == local: {valid}; catch-up {how}")
    report("bare push consumer -> plain sqlite3 (floor)", floor, "rows/s")
    report("replicator serve catching up", rate, "rows/s")
    report("replicator peak RSS (VmHWM)", rss, "MB")
    summary(
        f"catch-up of {rows:,} rows",
        rate,
        "rows/s",
        floor=floor,
        target=">= 250,000/s",
        met=rate >= 250_000,
        valid=valid,
    )
    summary("catch-up peak RSS", rss, "MB", floor=None, target="<= 150 MB", met=rss <= 150, valid=valid)


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base:
        if "batch" in args.only:
            await batch(base, args)
        if "drain" in args.only:
            await drain(base, args)
        if "catchup" in args.only:
            await catchup(base, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-rows", type=int, default=200_000, help="rows of the end-to-end batch phase")
    parser.add_argument("--agents", type=int, default=100, help="agents whose records the drain phase pre-loads")
    parser.add_argument("--per-agent", type=int, default=200, help="one-row records each of those agents writes")
    parser.add_argument("--catchup-rows", type=int, default=1_000_000, help="rows of the catch-up backlog")
    parser.add_argument(
        "--only", nargs="+", choices=["batch", "drain", "catchup"], default=["batch", "drain", "catchup"]
    )
    parser.add_argument("--preload-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_rows < 100 or args.catchup_rows < 100 or args.agents < 1 or args.per_agent < 1:
        parser.error("--batch-rows and --catchup-rows must be at least 100, --agents and --per-agent at least 1")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.preload_worker:
        u, b, f, c, p, o = _args.preload_worker
        asyncio.run(preload_worker(u, Path(b), int(f), int(c), int(p), Path(o)))
    else:
        asyncio.run(main(_args))
