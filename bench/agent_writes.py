"""Agent-side figures: write latency, concurrent write throughput, publish throughput, with NATS up and down.

.venv/bin/python bench/agent_writes.py
"""

from __future__ import annotations

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


async def main() -> None:
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with nats_server(base / "js") as (url, _proc):
            st = await open_storage(base / "up", "bench-up", url)
            lat = await single_latency(st)
            print("NATS up (publisher running):")
            report("write_data single row p50", pct(lat, 50) * 1e3, "ms")
            report("write_data single row p99", pct(lat, 99) * 1e3, "ms", "(target <= 1 ms)")
            tps = await concurrent_tps(st)
            report("single-row transactions/s, 8 writer tasks", tps, "tx/s", "(target >= 15,000)")
            await st.flush(timeout=60)
            rps = await batch_rows_per_s(st)
            report("rows/s in 100-row transactions, written + acked by JetStream", rps, "rows/s", "(target >= 100,000)")
            await st.close()

            # publisher alone: a 200,000-row backlog drained to JetStream
            st = AgentStorage("bench-drain", base / "drain", nats_url=f"nats://127.0.0.1:{free_port()}")
            await st.open()
            await st.migrate(SCHEMA)
            await st.set_visibility("events", "always")
            await batch_rows_per_s(st, txs=2000, flush=False)
            await st.close()
            st = AgentStorage("bench-drain", base / "drain", nats_url=url)
            t = time.perf_counter()
            await st.open()
            await st.flush(timeout=300)
            report("publisher drain of a 200,000-row backlog", 200_000 / (time.perf_counter() - t), "rows/s")
            await st.close()

        dead = f"nats://127.0.0.1:{free_port()}"
        st = await open_storage(base / "down", "bench-down", dead)
        lat = await single_latency(st)
        print("NATS down (nothing listening; publisher retrying):")
        report("write_data single row p50", pct(lat, 50) * 1e3, "ms")
        report("write_data single row p99", pct(lat, 99) * 1e3, "ms")
        report("single-row transactions/s, 8 writer tasks", await concurrent_tps(st), "tx/s")
        report("rows/s in 100-row transactions (local commit only)", await batch_rows_per_s(st, flush=False), "rows/s")
        health = await st.health_check()
        report("backlog kept locally", health["backlog"]["changes"], "changes")
        await st.close()


if __name__ == "__main__":
    asyncio.run(main())
