"""Agent write speed against its floors: one committed `write_data` vs plain sqlite3 with the same trigger,
and sequential replicated writes vs the guide's dual write (local insert + HTTP POST per row).

.venv/bin/python bench/write_speed.py [--writes 20000] [--rounds 10] [--seconds 5]

Latency (a): `write_data` of one row with the publisher running against a real nats-server (the stream
exists; no replicator, so the box carries only the agent and NATS), interleaved in `--rounds` blocks with
the floor: plain `sqlite3` INSERT + COMMIT (WAL, synchronous=NORMAL) into an `events` table whose capture
trigger agent_client itself installed (AgentStorage(replicate=False) + set_visibility('always')), so both
pay the same trigger; interleaving spreads the noise of a shared box over both alike. Checked: every row
is in the local table and acknowledged by JetStream (flush), the floor's rows are all there.

Sequential (b): one task awaiting `write_data` in a loop, replication on and `replicator serve` applying,
and the guide's dual write (bench/naive_relay.py), each for `--seconds` in all, interleaved in `--rounds`
blocks. Checked: the
central copy equals the local table (count + sha256), the naive relay holds every row it acknowledged.
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
    summary,
    table_digest,
    wait_port,
    wait_watermark,
)
from _floors import plain_connect, sqlite_commit_latencies, trigger_db

from agent_client import AgentStorage


async def write_latencies(st: AgentStorage, n: int, offset: int) -> list[float]:
    lat = []
    for i in range(offset, offset + n):
        t = time.perf_counter()
        await st.write_data("events", {"kind": "lat", "payload": f"row {i}", "score": i * 0.5})
        lat.append(time.perf_counter() - t)
    return lat


async def latency(base: Path, url: str, writes: int, rounds: int) -> None:
    """(a) write_data p50/p99 beside the plain-sqlite3 + trigger floor, interleaved."""
    floor_conn = plain_connect(await trigger_db(base / "floor"))
    st = await open_storage(base / "lat", "bench-lat", url)
    await write_latencies(st, 500, 0)  # warm up: first layouts, the NATS connection, caches
    sqlite_commit_latencies(floor_conn, 500)
    ours: list[float] = []
    floor: list[float] = []
    per = max(1, writes // rounds)
    for _ in range(rounds):
        floor += sqlite_commit_latencies(floor_conn, per)
        ours += await write_latencies(st, per, 500 + len(ours))
    await st.flush(timeout=120)
    local = (await st.query_local("SELECT count(*) AS n FROM events"))[0]["n"]
    await st.close()
    floor_rows = floor_conn.execute("SELECT count(*) FROM events").fetchone()[0]
    floor_conn.close()
    valid = local == 500 + len(ours) and floor_rows == 500 + len(floor)
    print(f"one-row commit, {len(ours):,} writes in {rounds} interleaved rounds (publisher running, data ok: {valid})")
    for name, lat in (("plain sqlite3 + capture trigger (floor)", floor), ("write_data", ours)):
        report(f"{name} p50", pct(lat, 50) * 1e6, "us")
        report(f"{name} p99", pct(lat, 99) * 1e6, "us")
        report(f"{name} p99.9", pct(lat, 99.9) * 1e6, "us")
        report(f"{name} max", max(lat) * 1e6, "us")
    p50, f50 = pct(ours, 50) * 1e6, pct(floor, 50) * 1e6
    summary("write_data 1 row p50", p50, "us", floor=f50, target="<= 2x floor", met=p50 <= 2 * f50, valid=valid)
    p99 = pct(ours, 99) * 1e3
    summary(
        "write_data 1 row p99",
        p99,
        "ms",
        floor=pct(floor, 99) * 1e3,
        target="<= 0.5 ms",
        met=p99 <= 0.5,
        valid=valid,
    )


async def _naive_run(
    client: httpx.AsyncClient, port: int, local: sqlite3.Connection, seconds: float
) -> tuple[int, int]:
    """The guide's approach for `seconds`: local sqlite3 insert + commit, then a POST of the row to a relay
    that inserts it. (writes, writes the relay acknowledged)"""
    n = acked = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        r = await naive_write(client, port, local, n)
        acked += r.status_code == 200
        n += 1
    return n, acked


async def _ours_run(st: AgentStorage, seconds: float, offset: int) -> int:
    n = 0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        await st.write_data("events", {"kind": "seq", "payload": f"s{offset + n}", "score": n / 3})
        n += 1
    return n


async def sequential(base: Path, url: str, seconds: float, rounds: int) -> None:
    """(b) sequential write_data with replication on vs the guide's dual write, interleaved in `rounds`
    blocks (both servers up throughout, each idle while the other side runs) so load swings hit both alike."""
    rep = Replicator(base / "htpc", url)
    port = free_port()
    relay_db = base / "naive-relay.db"
    naive_proc = subprocess.Popen(
        [str(BIN / "python"), str(Path(__file__).parent / "naive_relay.py"), str(port), str(relay_db)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    rep.start()
    try:
        wait_port(port)
        local = plain_connect(base / "naive-agent.db")
        local.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")
        st = await open_storage(base / "seq", "bench-seq", url)
        await write_latencies(st, 200, 0)
        ours_n = naive_n = naive_acked = 0
        ours_s = naive_s = 0.0
        async with httpx.AsyncClient(timeout=5) as client:
            warm, _acked = await _naive_run(client, port, local, 0.2)  # warm up the connection
            local.execute("DELETE FROM events")
            local.commit()
            for _ in range(rounds):
                t = time.perf_counter()
                ours_n += await _ours_run(st, seconds / rounds, ours_n)
                ours_s += time.perf_counter() - t
                t = time.perf_counter()
                n, acked = await _naive_run(client, port, local, seconds / rounds)
                naive_s += time.perf_counter() - t
                naive_n += n
                naive_acked += acked
        await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 120)
        await st.close()
        local.close()
        valid = table_digest(st.db_path) == table_digest(rep.central_db(st.agent_id))
    finally:
        rep.stop()
        naive_proc.terminate()
        naive_proc.wait(10)
    conn = sqlite3.connect(relay_db)
    stored = conn.execute("SELECT count(*) FROM relay").fetchone()[0]
    conn.close()
    ours, naive = ours_n / ours_s, naive_n / naive_s
    naive_ok = naive_acked == naive_n and stored == warm + naive_n
    print(
        f"sequential writes, {seconds:g} s each in {rounds} interleaved rounds (central == local: {valid}; "
        f"naive relay acknowledged and holds every row: {naive_ok})"
    )
    report("guide's dual write (floor), writes/s", naive, "w/s")
    report("write_data, replication on, writes/s", ours, "w/s")
    summary(
        "sequential write_data vs dual write",
        ours,
        "w/s",
        floor=naive,
        target=">= 15x floor",
        met=ours >= 15 * naive,
        valid=valid and naive_ok,
    )


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base, nats_server(base / "js") as (url, _proc):
        await latency(base, url, args.writes, args.rounds)
        await sequential(base, url, args.seconds, args.rounds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=20_000, help="timed one-row writes (and as many floor commits)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved blocks of floor and write_data")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each sequential phase")
    args = parser.parse_args(argv)
    if args.writes < 1 or args.rounds < 1 or args.seconds <= 0:
        parser.error("--writes and --rounds must be at least 1, --seconds positive")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
