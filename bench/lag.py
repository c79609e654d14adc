"""Replication lag at a paced 1,000 writes/s: agent commit -> central commit, and commit -> answered by
`POST /relay/query` with `min_seq`, beside the NATS publish -> subscriber round trip on the same server.

.venv/bin/python bench/lag.py [--rate 1000] [--seconds 5] [--probe-every 10]

How the central commit is seen: a watcher process (this script with `--watch`) keeps a read-only
connection to the agent's central file and polls `PRAGMA data_version` every ~100 us (`time.sleep(1e-4)`;
the achieved mean poll interval is printed: that is the resolution); when it changes, it reads the new
rows' ids and stamps them with CLOCK_MONOTONIC, which is system-wide, so the stamps compare with the
writer's. The writer stamps each row right after `write_data` returns (`returned`) and right before the
call (`called`). The true commit lies between: lag from `returned` understates by the return hop, lag
from `called` overstates by the whole write; both are printed, the target is judged on `returned`, the
write's own latency being judged by write_speed.py. The watcher also adds up to one poll interval. A cross-
check, the replicator's own apply-delay histogram from /metrics (bucket upper bounds), is printed too.

Every `--probe-every`-th write is followed by `/relay/query` with `min_seq` = the agent's newest committed
sequence (`last_committed_seq`), timed from the write's return to the answer; the queries are sent by a
prober process (the writer hands it `seq returned` over a pipe), so their HTTP work does not load the
writer's event loop, which the publisher shares. Checked: the central copy
equals the local table (count + sha256), the watcher saw every row.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Replicator,
    bench_dir,
    metric_total,
    nats_server,
    open_storage,
    pct,
    report,
    summary,
    table_digest,
    wait_watermark,
)
from _floors import nats_round_trips


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def watch(db: Path, out: Path, stop: Path, interval: float) -> None:
    """The watcher process: stamp every new row of the central `events` table as soon as it is visible.

    Writes `<out>.ready` once it watches; the writer starts only then, so no row predates the watch."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    last_id = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    version = conn.execute("PRAGMA data_version").fetchone()[0]
    Path(f"{out}.ready").write_text(str(last_id))
    seen: list[tuple[int, float]] = []
    polls = 0
    parent = os.getppid()
    started = _now()
    while True:
        polls += 1
        v = conn.execute("PRAGMA data_version").fetchone()[0]
        if v != version:
            version = v
            now = _now()
            rows = conn.execute("SELECT id FROM events WHERE id > ? ORDER BY id", (last_id,)).fetchall()
            for (rid,) in rows:
                seen.append((rid, now))
            if rows:
                last_id = rows[-1][0]
        if polls % 100 == 0 and (stop.exists() or os.getppid() != parent):
            break  # asked to stop, or orphaned
        time.sleep(interval)
    elapsed = _now() - started
    out.write_text(json.dumps({"seen": seen, "poll_s": elapsed / polls}))


def _histogram(text: str, name: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f'{name}_bucket{{le="'):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def _bucket_pct(before: dict[float, float], after: dict[float, float], p: float) -> float:
    """The upper bound of the bucket holding the p-th percentile of the observations between two scrapes."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    if not counts or counts[-1][1] <= 0:
        return float("nan")
    need = p / 100 * counts[-1][1]
    return next(le for le, c in counts if c >= need)


async def run(base: Path, url: str, args: argparse.Namespace) -> None:
    # Probes wait for min_seq, so at a high lag several overlap: the per-client query limit (default 2) is raised
    # so that the figure is the lag, not the admission policy.
    rep = Replicator(base / "htpc", url, ["--query-max-concurrent", "64"])
    rep.start()
    watcher: subprocess.Popen[bytes] | None = None
    prober: subprocess.Popen[bytes] | None = None
    try:
        st = await open_storage(base / "agent", "bench-lag", url)
        for i in range(100):  # warm up; the central file and its table exist after this
            await st.write_data("events", {"kind": "warm", "payload": str(i), "score": 0.0})
        await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 60)
        out, stop = base / "watch.json", base / "watch.stop"
        watcher = subprocess.Popen(
            [sys.executable, __file__, "--watch", str(rep.central_db(st.agent_id)), str(out), str(stop)],
            start_new_session=True,
        )
        while not Path(f"{out}.ready").exists():
            if watcher.poll() is not None:
                raise RuntimeError("the watcher process failed")
            await asyncio.sleep(0.01)
        stamps: dict[int, tuple[float, float]] = {}
        probe_out = base / "probes.json"
        prober = subprocess.Popen(
            [sys.executable, __file__, "--probe", rep.url, st.agent_id, str(probe_out)],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        assert prober.stdin is not None
        while not Path(f"{probe_out}.ready").exists():
            if prober.poll() is not None:
                raise RuntimeError("the prober process failed")
            await asyncio.sleep(0.01)
        sent = 0
        async with httpx.AsyncClient(timeout=10) as client:
            before = _histogram((await client.get(f"{rep.url}/metrics")).text, "replicator_apply_delay_seconds")
            n = int(args.rate * args.seconds)
            start = time.perf_counter()
            for i in range(n):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                called = _now()
                rid = await st.write_data("events", {"kind": "lag", "payload": str(i), "score": i / 3})
                returned = _now()
                stamps[rid] = (called, returned)
                if i % args.probe_every == 0:
                    seq = await st.last_committed_seq()
                    prober.stdin.write(f"{seq} {returned!r}\n".encode())  # a pipe write: no hop, no wait
                    prober.stdin.flush()
                    sent += 1
            achieved = n / (time.perf_counter() - start)
            prober.stdin.close()
            prober.wait(60)
            probe_result = json.loads(probe_out.read_text())
            probes, failures, timeouts = probe_result["lat"], probe_result["failures"], probe_result["timeouts"]
            handoff = probe_result["read"]
            await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 60)
            after = _histogram((await client.get(f"{rep.url}/metrics")).text, "replicator_apply_delay_seconds")
            applied = metric_total((await client.get(f"{rep.url}/metrics")).text, "replicator_records_applied_total")
        await asyncio.sleep(0.2)
        stop.touch()
        watcher.wait(30)
        result = json.loads(out.read_text())
        seen = {rid: t for rid, t in result["seen"]}
        await st.close()
        exact = table_digest(st.db_path) == table_digest(rep.central_db(st.agent_id))
        unseen = sum(rid not in seen for rid in stamps)
        valid = exact and unseen == 0
        from_return = [seen[rid] - r for rid, (_c, r) in stamps.items() if rid in seen]
        from_call = [seen[rid] - c for rid, (c, _r) in stamps.items() if rid in seen]
    finally:
        for child in (watcher, prober):
            if child is not None and child.poll() is None:
                child.kill()
        rep.stop()
    rtt = await nats_round_trips(url, min(5000, n), args.rate)

    print(
        f"{n:,} writes paced at {args.rate:,}/s for {args.seconds:g} s (achieved {achieved:,.0f}/s; "
        f"{applied:,.0f} records applied in all; watcher poll every {result['poll_s'] * 1e6:.0f} us; "
        f"central == local: {exact}; rows the watcher never saw: {unseen})"
    )
    report("NATS publish -> subscriber, same server (floor) p50", pct(rtt, 50) * 1e3, "ms")
    report("NATS publish -> subscriber, same server (floor) p99", pct(rtt, 99) * 1e3, "ms")
    for label, lags in (("write_data returned", from_return), ("write_data called", from_call)):
        report(f"{label} -> central commit seen, p50", pct(lags, 50) * 1e3, "ms")
        report(f"{label} -> central commit seen, p99", pct(lags, 99) * 1e3, "ms")
    report("replicator apply-delay histogram p50 (bucket bound)", _bucket_pct(before, after, 50) * 1e3, "ms")
    report("replicator apply-delay histogram p99 (bucket bound)", _bucket_pct(before, after, 99) * 1e3, "ms")
    report(f"commit -> /relay/query min_seq answered, p50 ({len(probes)} probes)", pct(probes, 50) * 1e3, "ms")
    report("commit -> /relay/query min_seq answered, p99", pct(probes, 99) * 1e3, "ms")
    report("  of which writer -> prober hand-off, p50", pct(handoff, 50) * 1e3, "ms")
    report("  of which writer -> prober hand-off, p99", pct(handoff, 99) * 1e3, "ms")
    if timeouts:
        print(f"  {len(timeouts)} probes timed out (counted with the lag they waited), e.g. {timeouts[0]!r}")
    if failures:
        print(f"  {len(failures)} probes failed (the figure misses them: reported as wrong), e.g. {failures[0]!r}")
    f50, f99 = pct(rtt, 50) * 1e3, pct(rtt, 99) * 1e3
    valid_probes = valid and len(probes) == sent
    for name, lags, p, floor, limit, ok in (
        ("lag commit->central p50", from_return, 50, f50, 1.0, valid),
        ("lag commit->central p99", from_return, 99, f99, 5.0, valid),
        ("lag commit->/relay/query p50", probes, 50, f50, 3.0, valid_probes),
        ("lag commit->/relay/query p99", probes, 99, f99, 15.0, valid_probes),
    ):
        figure = pct(lags, p) * 1e3
        summary(name, figure, "ms", floor=floor, target=f"<= {limit:g} ms", met=figure <= limit, valid=ok)


class _Http:
    """A bare HTTP/1.1 keep-alive client (a pool of loopback connections) for the prober.

    httpx costs about a millisecond of CPU per request; at 100 probes/s on a 2-core box that queueing would
    be measured as lag. This costs tens of microseconds: the figure is the server's, not the client's."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.host, self.port = host, int(port)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection(self.host, self.port)
        reader, writer = conn
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), self.host.encode(), len(body), body)
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
        data = await reader.readexactly(length)
        if any(line.lower() == b"connection: close" for line in lines):
            writer.close()
        else:
            self.idle.append(conn)
        return status, data

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()


async def probe(url: str, agent_id: str, out: Path) -> None:
    """The prober process: for each `seq returned` line on stdin, POST /relay/query with min_seq=seq and
    time the answer from `returned` (CLOCK_MONOTONIC); at end of input, write the figures to `out`.

    It runs apart from the writer so that its HTTP work never delays the writer's loop, where the
    publisher runs too; `read` is how long each probe took to reach it (the writer's `last_committed_seq`
    plus the pipe), which is part of the figure."""
    lat: list[float] = []
    failures: list[str] = []
    timeouts: list[str] = []
    read_lag: list[float] = []
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    client = _Http(url)
    await asyncio.gather(*(client.post("/relay/query", b"{}") for _ in range(8)))  # a few connections ready
    Path(f"{out}.ready").touch()

    async def one(seq: int, returned: float) -> None:
        read_lag.append(_now() - returned)
        body = {"agent_id": agent_id, "query": "SELECT count(*) AS n FROM events", "min_seq": seq, "timeout_ms": 5000}
        status, data = await client.post("/relay/query", json.dumps(body).encode())
        if status == 200:
            lat.append(_now() - returned)
        elif status == 504:  # not applied within timeout_ms: counted, its lag at least that
            lat.append(_now() - returned)
            timeouts.append(f"{status} {data[:120]!r}")
        else:
            failures.append(f"{status} {data[:120]!r}")

    while line := await reader.readline():
        seq, returned = line.split()
        tasks.append(asyncio.create_task(one(int(seq), float(returned))))
    await asyncio.gather(*tasks)
    client.close()
    out.write_text(json.dumps({"lat": lat, "failures": failures, "timeouts": timeouts, "read": read_lag}))


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base, nats_server(base / "js") as (url, _proc):
        await run(base, url, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="writes per second (paced)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the paced phase")
    parser.add_argument("--probe-every", type=int, default=10, help="a /relay/query probe after every N-th write")
    parser.add_argument("--poll-us", type=float, default=100.0, help="the watcher's sleep between polls")
    parser.add_argument("--watch", nargs=3, metavar=("DB", "OUT", "STOP"), help=argparse.SUPPRESS)
    parser.add_argument("--probe", nargs=3, metavar=("URL", "AGENT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate < 1 or args.seconds <= 0 or args.probe_every < 1:
        parser.error("--rate and --probe-every must be at least 1, --seconds positive")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.watch:
        watch(Path(_args.watch[0]), Path(_args.watch[1]), Path(_args.watch[2]), _args.poll_us / 1e6)
    elif _args.probe:
        asyncio.run(probe(_args.probe[0], _args.probe[1], Path(_args.probe[2])))
    else:
        asyncio.run(main(_args))
