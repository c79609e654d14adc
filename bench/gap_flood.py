"""A victim agent's replication delay while another agent floods the stream, against the same flood in order.

.venv/bin/python bench/gap_flood.py [--records 25000] [--probes 40]

The floor is the same number of records published by one agent in sequence
(legitimate traffic the consumer must apply anyway); the attack is that many
records all ahead of their turn (change 1 never comes), which before the
"records ahead" design filled the consumer's ack-pending window and stopped
every agent. Printed: the victim's write-to-applied delay p50/p99 with no
flood, during the in-order flood and during the gap flood, the ratios, and
how long the consumer took to get through each flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Replicator, machine, nats_server, open_storage, pct, report

from agent_client import AgentStorage, changes_subject

LAYOUT = {
    "0": {
        "table": "loot",
        "columns": ["id", "v"],
        "pk": ["id"],
        "types": ["INTEGER", "TEXT"],
        "sql": "CREATE TABLE loot (id INTEGER PRIMARY KEY, v TEXT)",
    }
}


def record(agent: str, epoch: str, seq: int, schema: bool = False) -> bytes:
    changes: list[list[object]] = [[seq, "S", 0, []]] if schema else [[seq, "U", 0, [seq, "x"]]]
    body = {
        "v": 1,
        "kind": "changes",
        "agent_id": agent,
        "epoch": epoch,
        "first_seq": seq,
        "last_seq": seq,
        "committed_at": time.time(),
        "layouts": LAYOUT,
        "changes": changes,
    }
    return json.dumps(body).encode()


async def probe_delays(
    victim: AgentStorage, client: httpx.AsyncClient, url: str, until: asyncio.Event | int, interval: float = 0.05
) -> list[float]:
    """Write one row every `interval` and time each until the HTPC has applied it (its queueing delay)."""
    pending: list[tuple[int, float]] = []
    delays: list[float] = []
    writing = True

    async def watch() -> None:
        while writing or pending:
            r = await client.get(f"{url}/relay/agents/{victim.agent_id}")
            if r.status_code == 200:
                watermark, now = r.json()["watermark"], time.perf_counter()
                delays.extend(now - t for seq, t in pending if seq <= watermark)
                pending[:] = [(seq, t) for seq, t in pending if seq > watermark]
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    i = 0
    while (isinstance(until, int) and i < until) or (isinstance(until, asyncio.Event) and not until.is_set()):
        i += 1
        started = time.perf_counter()
        await victim.write_data("events", {"id": int(started * 1e6), "kind": "probe", "payload": "p", "score": 1.0})
        pending.append((await victim.last_committed_seq(), started))
        await asyncio.sleep(interval)
    writing = False
    await asyncio.wait_for(watcher, 300)
    return delays


async def health_latencies(url: str, stop: asyncio.Event) -> list[float]:
    """GET /health every 20 ms on its own connection until `stop`; each answer's latency."""
    out: list[float] = []
    async with httpx.AsyncClient(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            r = await client.get(f"{url}/health")
            if r.status_code in (200, 503):
                out.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    return out


async def flood(nats_url: str, agent: str, records: list[bytes]) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for start in range(0, len(records), 500):
            await asyncio.gather(
                *(js.publish(changes_subject(agent), r, timeout=30) for r in records[start : start + 500])
            )
    finally:
        await nc.close()


async def wait_seen(client: httpx.AsyncClient, url: str, agent: str, done: callable, timeout: float = 300) -> float:  # type: ignore[valid-type]
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        r = await client.get(f"{url}/relay/agents/{agent}")
        if r.status_code == 200 and done(r.json()):
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(agent)


async def main(records: int, probes: int) -> None:
    print(f"gap flood vs in-order flood: {records} records; {machine()}")
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "js") as (nats_url, _proc):
        rep = Replicator(Path(tmp) / "htpc", nats_url)
        rep.start()
        try:
            victim = await open_storage(Path(tmp) / "victim", "victim", nats_url)
            async with httpx.AsyncClient(timeout=10) as client:
                stop_quiet = asyncio.Event()
                health_task = asyncio.create_task(health_latencies(rep.url, stop_quiet))
                quiet = await probe_delays(victim, client, rep.url, probes)
                stop_quiet.set()
                phases: dict[str, list[float]] = {"no flood": quiet}
                health: dict[str, list[float]] = {"no flood": await health_task}
                for name, agent, payloads in (
                    (
                        "in-order flood (floor)",
                        "orderly",
                        [record("orderly", "00000000000000aa", s, schema=s == 1) for s in range(1, records + 1)],
                    ),
                    (
                        "gap flood (attack)",
                        "flooder",
                        [record("flooder", "00000000000000bb", s) for s in range(2, records + 2)],
                    ),
                ):
                    stop = asyncio.Event()
                    probing = asyncio.create_task(probe_delays(victim, client, rep.url, stop))
                    health_task = asyncio.create_task(health_latencies(rep.url, stop))
                    started = time.perf_counter()
                    await flood(nats_url, agent, payloads)
                    if agent == "orderly":
                        await wait_seen(client, rep.url, agent, lambda a: a["watermark"] >= records)
                    else:
                        await wait_seen(
                            client, rep.url, agent, lambda a: bool(a["blocked"]) or a["waiting_records"] >= records
                        )
                    elapsed = time.perf_counter() - started
                    stop.set()
                    phases[name] = await probing
                    health[name] = await health_task
                    report(f"{name}: consumer through the flood", elapsed, "s")
                for name, delays in phases.items():
                    report(f"victim delay p50, {name} (n={len(delays)})", pct(delays, 50) * 1000, "ms")
                    report(f"victim delay p99, {name}", pct(delays, 99) * 1000, "ms")
                for name, latencies in health.items():
                    report(f"/health p99, {name} (n={len(latencies)})", pct(latencies, 99) * 1000, "ms")
                floor = phases["in-order flood (floor)"]
                attack = phases["gap flood (attack)"]
                report("p50 ratio gap flood / in-order flood", pct(attack, 50) / pct(floor, 50), "x")
                report("p99 ratio gap flood / in-order flood", pct(attack, 99) / pct(floor, 99), "x")
                flooder = (await client.get(f"{rep.url}/relay/agents/flooder")).json()
                report("flooder records waiting (its cap: --max-held-per-agent)", flooder["waiting_records"], "records")
            await victim.close()
        finally:
            rep.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=25_000)
    parser.add_argument("--probes", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(main(args.records, args.probes))
