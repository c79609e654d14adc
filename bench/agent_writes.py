"""Agent-side figures: write latency, concurrent write throughput, publish throughput, with NATS up and down.

.venv/bin/python bench/agent_writes.py [--writes 5000] [--seconds 5] [--txs 1000] [--rows 100] [--drain-rows 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import SCHEMA, free_port, machine, nats_server, open_storage, pct, report

from agent_client import AgentStorage


async def single_latency(st: AgentStorage, n: int = 5000) -> list[float]:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        await st.write_data("events", {"kind": "click", "payload": f"row {i}", "score": i * 0.5})
        lat.append(time.perf_counter() - t)
    return lat


async def concurrent_tps(st: AgentStorage, seconds: float = 5.0, writers: int = 8) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * writers

    async def writer(k: int) -> None:
        while time.perf_counter() < stop:
            await st.write_data("events", {"kind": f"w{k}", "payload": "x" * 40, "score": 1.5})
            counts[k] += 1

    t = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(writers)))
    return sum(counts) / (time.perf_counter() - t)


async def batch_rows_per_s(st: AgentStorage, txs: int = 1000, rows: int = 100, flush: bool = True) -> float:
    t = time.perf_counter()
    for i in range(txs):
        await st.batch_write(
            [{"table": "events", "data": {"kind": "bulk", "payload": f"{i}-{j}", "score": j / 3}} for j in range(rows)]
        )
    if flush:
        await st.flush(timeout=120)
    return txs * rows / (time.perf_counter() - t)


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    rows = args.rows
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with nats_server(base / "js") as (url, _proc):
            st = await open_storage(base / "up", "bench-up", url)
            lat = await single_latency(st, args.writes)
            print("NATS up (publisher running):")
            report("write_data single row p50", pct(lat, 50) * 1e3, "ms")
            report(
                "write_data single row p99", pct(lat, 99) * 1e3, "ms", "(issue 11: <= 0.5 ms, judged by write_speed.py)"
            )
            tps = await concurrent_tps(st, args.seconds)
            report("single-row transactions/s, 8 writer tasks", tps, "tx/s", "(an earlier target: >= 15,000)")
            await st.flush(timeout=60)
            rps = await batch_rows_per_s(st, txs=args.txs, rows=rows)
            report(
                f"rows/s in {rows}-row transactions, written + acked by JetStream",
                rps,
                "rows/s",
                "(an earlier target: >= 100,000)",
            )
            await st.close()

            # publisher alone: a backlog of --drain-rows drained to JetStream
            st = AgentStorage("bench-drain", base / "drain", nats_url=f"nats://127.0.0.1:{free_port()}")
            await st.open()
            await st.migrate(SCHEMA)
            await st.set_visibility("events", "always")
            drain_txs = max(1, args.drain_rows // rows)
            await batch_rows_per_s(st, txs=drain_txs, rows=rows, flush=False)
            await st.close()
            st = AgentStorage("bench-drain", base / "drain", nats_url=url)
            t = time.perf_counter()
            await st.open()
            await st.flush(timeout=300)
            drained = drain_txs * rows
            report(f"publisher drain of a {drained:,}-row backlog", drained / (time.perf_counter() - t), "rows/s")
            await st.close()

        dead = f"nats://127.0.0.1:{free_port()}"
        st = await open_storage(base / "down", "bench-down", dead)
        lat = await single_latency(st, args.writes)
        print("NATS down (nothing listening; publisher retrying):")
        report("write_data single row p50", pct(lat, 50) * 1e3, "ms")
        report("write_data single row p99", pct(lat, 99) * 1e3, "ms")
        report("single-row transactions/s, 8 writer tasks", await concurrent_tps(st, args.seconds), "tx/s")
        report(
            f"rows/s in {rows}-row transactions (local commit only)",
            await batch_rows_per_s(st, txs=args.txs, rows=rows, flush=False),
            "rows/s",
        )
        health = await st.health_check()
        report("backlog kept locally", health["backlog"]["changes"], "changes")
        await st.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=5000, help="single-row writes timed for the latency figures")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the concurrent-writers phase")
    parser.add_argument("--txs", type=int, default=1000, help="transactions of the batch throughput phase")
    parser.add_argument("--rows", type=int, default=100, help="rows per transaction in the batch phases")
    parser.add_argument("--drain-rows", type=int, default=200_000, help="rows of the backlog the publisher drains")
    args = parser.parse_args(argv)
    for name in ("writes", "txs", "rows", "drain_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
