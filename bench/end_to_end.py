"""End-to-end figures: replication lag, throughput, catch-up, query latency, and the guide's naive baseline.

.venv/bin/python bench/end_to_end.py [--seconds 5] [--rows 200000] [--catchup-rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    BIN,
    Replicator,
    bench_dir,
    free_port,
    naive_write,
    nats_server,
    open_storage,
    pct,
    report,
    wait_port,
)

from agent_client import AgentStorage


async def wait_applied(client: httpx.AsyncClient, rep: Replicator, agent_id: str, seq: int, timeout: float) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        r = await client.get(f"{rep.url}/relay/agents/{agent_id}")
        if r.status_code == 200 and r.json()["watermark"] >= seq:
            return time.perf_counter()
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{agent_id} not applied to {seq} in {timeout}s")


async def lag_at_rate(st: AgentStorage, rep: Replicator, rate: int = 1000, seconds: float = 5.0) -> list[float]:
    lags: list[float] = []
    probes: list[asyncio.Task[None]] = []
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=200)) as client:

        async def probe(seq: int, committed: float) -> None:
            r = await client.post(
                f"{rep.url}/relay/query",
                json={
                    "agent_id": st.agent_id,
                    "query": "SELECT count(*) FROM events",
                    "min_seq": seq,
                    "timeout_ms": 5000,
                },
            )
            if r.status_code == 200:
                lags.append(time.perf_counter() - committed)

        interval = 1.0 / rate
        start = time.perf_counter()
        n = int(rate * seconds)
        for i in range(n):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await st.write_data("events", {"kind": "lag", "payload": str(i), "score": 0.5})
            committed = time.perf_counter()
            if i % 10 == 0:
                seq = await st.last_committed_seq()
                probes.append(asyncio.create_task(probe(seq, committed)))
        await asyncio.gather(*probes)
    return lags


async def throughput(st: AgentStorage, rep: Replicator, *, txs: int, rows: int) -> float:
    async with httpx.AsyncClient(timeout=10) as client:
        t = time.perf_counter()
        for i in range(txs):
            await st.batch_write(
                [
                    {"table": "events", "data": {"kind": "tp", "payload": f"{i}-{j}", "score": j / 7}}
                    for j in range(rows)
                ]
            )
        last = await st.last_committed_seq()
        done = await wait_applied(client, rep, st.agent_id, last, 300)
        return txs * rows / (done - t)


async def single_row_tps(st: AgentStorage, rep: Replicator, seconds: float = 5.0, writers: int = 8) -> float:
    stop = time.perf_counter() + seconds
    count = 0

    async def writer() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await st.write_data("events", {"kind": "single", "payload": "x", "score": 1.0})
            count += 1

    async with httpx.AsyncClient(timeout=10) as client:
        t = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        done = await wait_applied(client, rep, st.agent_id, await st.last_committed_seq(), 300)
        return count / (done - t)


async def query_latency(
    rep: Replicator, agent_id: str, max_id: int, rate: int = 500, seconds: float = 5.0
) -> list[float]:
    lat: list[float] = []
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as client:

        async def one(i: int) -> None:
            t = time.perf_counter()
            r = await client.post(
                f"{rep.url}/relay/query",
                json={"agent_id": agent_id, "query": "SELECT * FROM events WHERE id = ?", "params": [1 + i % max_id]},
            )
            if r.status_code == 200 and r.json()["rows"]:
                lat.append(time.perf_counter() - t)

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
    return lat


async def naive_baseline(base: Path, seconds: float = 5.0) -> tuple[float, list[float]]:
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "python"), str(Path(__file__).parent / "naive_relay.py"), str(port), str(base / "naive-relay.db")],
        start_new_session=True,
    )
    try:
        wait_port(port)
        local = sqlite3.connect(base / "naive-agent.db")
        local.execute("PRAGMA journal_mode=WAL")
        local.execute("PRAGMA synchronous=NORMAL")
        local.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")
        lat: list[float] = []
        async with httpx.AsyncClient(timeout=5) as client:
            stop = time.perf_counter() + seconds
            n = 0
            t0 = time.perf_counter()
            while time.perf_counter() < stop:
                t = time.perf_counter()
                await naive_write(client, port, local, n)
                lat.append(time.perf_counter() - t)
                n += 1
            return n / (time.perf_counter() - t0), lat
    finally:
        proc.terminate()
        proc.wait(10)


async def ours_sequential(st: AgentStorage, seconds: float = 5.0) -> tuple[float, list[float]]:
    lat: list[float] = []
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        t = time.perf_counter()
        await st.write_data("events", {"kind": "seq", "payload": "x", "score": 0.5})
        lat.append(time.perf_counter() - t)
    return len(lat) / (time.perf_counter() - t0), lat


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each timed phase (lag, rates, baseline)")
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the throughput phase (100 per transaction)")
    parser.add_argument("--catchup-rows", type=int, default=1_000_000, help="backlog replayed after an outage")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.rows < 100 or args.catchup_rows < 100:
        parser.error("--seconds must be positive, --rows and --catchup-rows at least 100")
    return args


async def main(args: argparse.Namespace) -> None:
    seconds = args.seconds
    with bench_dir() as base, nats_server(base / "js") as (url, _nats):
        rep = Replicator(base / "htpc", url)
        rep.start()
        try:
            st = await open_storage(base / "a", "bench-lag", url)
            lags = await lag_at_rate(st, rep, seconds=seconds)
            report(
                "replication lag at 1,000 writes/s, commit -> /relay/query, p50",
                pct(lags, 50) * 1e3,
                "ms",
                "(issue 11: <= 3 ms, judged by lag.py)",
            )
            report("replication lag at 1,000 writes/s, p99", pct(lags, 99) * 1e3, "ms", "(issue 11: <= 15 ms)")
            report("  (probes answered)", len(lags), "")
            report(
                f"end-to-end rows/s, 100-row transactions ({args.rows // 100 * 100:,} rows)",
                await throughput(st, rep, txs=args.rows // 100, rows=100),
                "rows/s",
                "(issue 11: >= 150,000, judged by apply_speed.py)",
            )
            report(
                "end-to-end single-row transactions/s, 8 writers",
                await single_row_tps(st, rep, seconds),
                "tx/s",
                "(an earlier target: >= 10,000)",
            )
            max_id = (await st.query_local("SELECT max(id) AS m FROM events"))[0]["m"]
            qlat = await query_latency(rep, st.agent_id, max_id, seconds=seconds)
            report("/relay/query primary-key lookup at 500 req/s, p50", pct(qlat, 50) * 1e3, "ms")
            report("/relay/query primary-key lookup at 500 req/s, p99", pct(qlat, 99) * 1e3, "ms")
            ours_rate, ours_lat = await ours_sequential(st, seconds)
            await st.close()
        finally:
            rep.stop()

        naive_rate, naive_lat = await naive_baseline(base, seconds)
        report("baseline (guide): local insert + HTTP POST per write, writes/s", naive_rate, "w/s")
        report("baseline write p50 / p99", pct(naive_lat, 50) * 1e3, "ms", f"p99 {pct(naive_lat, 99) * 1e3:.3f} ms")
        report("ours: write_data (replicated via JetStream), one writer, writes/s", ours_rate, "w/s")
        report("ours write p50 / p99", pct(ours_lat, 50) * 1e3, "ms", f"p99 {pct(ours_lat, 99) * 1e3:.3f} ms")
        report("ratio ours / baseline, sequential writes/s", ours_rate / naive_rate, "x")

        # catch-up: the replicator is down while the agent writes; then it drains the backlog
        rep2 = Replicator(base / "htpc2", url)
        st = await open_storage(base / "c", "bench-catchup", url)
        rows, per_tx = args.catchup_rows, 100
        t = time.perf_counter()
        for i in range(rows // per_tx):
            await st.batch_write(
                [{"table": "events", "data": {"kind": "c", "payload": f"{i}-{j}", "score": j}} for j in range(per_tx)]
            )
        await st.flush(timeout=600)
        report(f"backlog written + in JetStream ({rows:,} rows)", time.perf_counter() - t, "s")
        last = await st.last_committed_seq()
        await st.close()
        t = time.perf_counter()
        rep2.start()
        async with httpx.AsyncClient(timeout=10) as client:
            done = await wait_applied(client, rep2, "bench-catchup", last, 900)
        report(f"catch-up of {rows:,} rows after the replicator was down", rows / (done - t), "rows/s")
        report("replicator peak RSS during catch-up", rep2.peak_rss_mb(), "MB", "(issue 11: <= 150 MB)")
        rep2.stop()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
