"""What idle live-feed subscribers cost the replicator: 500 open SSE streams of `GET /relay/changes`
(`live=true`, `Accept: text/event-stream`): its RSS and CPU over an idle window with 0 and with 500
subscribers, then one write of the agent and the time until every subscriber got it.

.venv/bin/python bench/feed_idle.py [--subscribers 500] [--idle-seconds 10] [--warm 10] [--floor-writes 20]
                                    [--fanout-writes 1]

Processes (loopback, one machine): nats-server, `replicator serve`, this script (agent A and the
measurements) and a client process (`--clients`) holding the streams: raw HTTP/1.1 over asyncio sockets on
uvloop (no HTTP library: 500 streams cost its loop little), chunked transfer decoded, every SSE event decoded
with `decode_feed_message` (so the wire format is checked too). The bytes a stream brings are stamped with
CLOCK_MONOTONIC, which is system-wide, as soon as the read returns; after a stream's first up-to-date they are
only kept, and decoded at the end, so that the stamps carry as little of this process's own work as possible.

Phases:
1. idle, 0 subscribers: after A wrote `--warm` rows (applied centrally) and 2 s of settling, the
   replicator's CPU (utime + stime from /proc/<pid>/stat, % of one core) over `--idle-seconds`, its RSS
   (VmRSS) at the end, its threads and open fds.
2. floor: one subscriber; A writes `--floor-writes` rows 50 ms apart; commit (`write_data` returned) ->
   the change read by the subscriber, p50 / p99: the single-subscriber delivery time in this run.
3. idle, N subscribers: N streams opened without an offset (each gets the snapshot, then up-to-date, then
   stays open); once all are up to date and 2 s have passed, the same CPU / RSS / threads / fds.
4. fan-out: A writes `--fanout-writes` rows (one by default); for each, the time from `write_data` returned
   to its arrival at each subscriber: p50 / p99 / max across the subscribers. The figure includes the
   client process's own handling of the N streams on one loop (a change reaching the 500th stream is stamped
   after the 499 before it were read). The replicator's CPU from the first write until the client says every
   stream has it, and the client's, are printed to tell the two apart.

Checked before reporting: every stream was answered 200 and stayed open; each one's snapshot equals A's
table at that moment (count + sha256 in key order); after its up-to-date each subscriber received exactly the
fan-out writes, in order, each an `insert` with A's row and `last` true, and nothing else; no must-refetch.
Bounded: the client process exits by itself (a deadline), and the orchestrator kills it when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    EVENT_COLUMNS,
    Replicator,
    bench_dir,
    cpu_seconds,
    event_tuple,
    mono_now,
    nats_server,
    open_storage,
    pct,
    report,
    rows_digest,
    status_mb,
    summary,
    table_digest,
    threads_and_fds,
    wait_ready,
    wait_watermark,
    write_warm,
)

from agent_client import Change, FeedProtocolError, FeedSchema, MustRefetch, UpToDate, decode_feed_message

TABLE = "events"
#: The client process never outlives its phase by more than this (seconds): it exits by itself.
GRACE_S = 120.0
#: How long the opened streams may take to all be up to date (seconds).
OPEN_TIMEOUT_S = 120.0
#: How long the client process waits for the changes it was told to expect (seconds).
DELIVERY_TIMEOUT_S = 30.0
#: Streams being opened at once by default (each one's snapshot is read by the replicator on a thread).
OPEN_CONCURRENCY = 50
#: Targets (this benchmark's own reading of issue 12's "many idle subscribers cost little"): the idle
#: replicator's CPU with the subscribers, its RSS growth per subscriber, and the fan-out's p99 (the feed's
#: p99 target for one subscriber, kept for all of them).
TARGET_CPU_PCT = 5.0
TARGET_KIB_PER_SUBSCRIBER = 100.0
TARGET_FANOUT_P99_MS = 20.0


def _rss_mb(pid: int) -> float:
    return status_mb(pid, "VmRSS")


# --------------------------------------------------------------------------------------------- client process
@dataclass
class _Stream:
    """What one SSE subscriber saw: its snapshot (before the first up-to-date) and the changes after it."""

    status: int = 0
    error: str | None = None
    snapshot: dict[Any, tuple[Any, ...]] = field(default_factory=dict)
    ready: bool = False
    closed: bool = False
    changes: list[tuple[str, Any, Any, bool, float]] = field(default_factory=list)  # op, key id, row, last, stamp
    up_to_date: int = 0
    must_refetch: int = 0
    keepalives: int = 0
    schemas: int = 0
    # after the first up-to-date the bytes are only stamped and kept (decoded by `result`), so that reading
    # 500 streams at once costs this process as little as possible: a change's stamp includes the time this
    # loop spent on the streams read before it
    raw: list[tuple[bytes, float]] = field(default_factory=list)
    live_changes: int = 0

    def take(self, block: bytes, stamp: float) -> None:
        """One SSE event (its lines, without the blank line that ended it)."""
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b":"):
                self.keepalives += 1
            elif line.startswith(b"data:"):
                data.append(line[5:].removeprefix(b" "))
        if not data:
            return
        ev = decode_feed_message(b"\n".join(data))
        if isinstance(ev, Change):
            row = event_tuple(ev.row) if ev.row is not None else None
            if not self.ready:
                if row is None:
                    self.snapshot.pop(ev.key["id"], None)
                else:
                    self.snapshot[ev.key["id"]] = row
            else:
                self.changes.append((ev.op, ev.key.get("id"), row, ev.last, stamp))
        elif isinstance(ev, UpToDate):
            self.up_to_date += 1
            self.ready = True
        elif isinstance(ev, MustRefetch):
            self.must_refetch += 1
        elif isinstance(ev, FeedSchema):
            self.schemas += 1

    def keep(self, data: bytes, stamp: float) -> None:
        """Bytes of the stream after its first up-to-date, read at `stamp`."""
        self.raw.append((data, stamp))
        self.live_changes += data.count(b"event: change\n")

    def result(self) -> dict[str, Any]:
        buf = b""
        for data, stamp in self.raw:
            buf += data
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                self.take(block, stamp)
        self.raw.clear()
        return {
            "status": self.status,
            "error": self.error,
            "snapshot": list(rows_digest(self.snapshot)),
            "ready": self.ready,
            "closed": self.closed,
            "changes": self.changes,
            "up_to_date": self.up_to_date,
            "must_refetch": self.must_refetch,
            "keepalives": self.keepalives,
            "schemas": self.schemas,
        }


async def _read_stream(host: str, port: int, path: str, s: _Stream, gate: asyncio.Semaphore) -> None:
    """Open one SSE stream and feed its events to `s` until the server closes it or the task is cancelled."""
    async with gate:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode("ascii"))
        head = await reader.readuntil(b"\r\n\r\n")
        s.status = int(head.split(b" ", 2)[1])
        if s.status != 200:
            s.error = f"{s.status}: {(await reader.read(300))!r}"
            writer.close()
            return
    chunked = b"transfer-encoding: chunked" in head.lower()
    buf = b""
    try:
        while True:
            if chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            stamp = mono_now()
            data = data.replace(b"\r\n", b"\n")
            if s.ready:
                s.keep(data, stamp)
                continue
            buf += data
            while b"\n\n" in buf and not s.ready:
                block, buf = buf.split(b"\n\n", 1)
                s.take(block, stamp)
            if s.ready and buf:
                s.keep(buf, stamp)
                buf = b""
        s.closed = True
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        s.closed = True
        s.error = f"stream cut: {exc!r}"
    except FeedProtocolError as exc:
        s.error = f"bad feed message: {exc}"
    finally:
        writer.close()


async def clients(cfg: dict[str, Any]) -> None:
    """The client process: open `n` streams, write `<out>.ready` once all are up to date (or failed), then
    wait until `expect` names how many changes each must get and all got them (or the deadline); then write
    every stream's result to `out`."""
    deadline = time.monotonic() + cfg["seconds"] + GRACE_S
    out, expect_file = Path(cfg["out"]), Path(cfg["expect"])
    host, port = cfg["url"].removeprefix("http://").rsplit(":", 1)
    path = "/relay/changes?" + urlencode({"agent": cfg["agent"], "table": TABLE, "live": "true"})
    streams = [_Stream() for _ in range(cfg["n"])]
    gate = asyncio.Semaphore(cfg["open_concurrency"])
    tasks = [asyncio.create_task(_read_stream(host, int(port), path, s, gate)) for s in streams]
    try:
        open_deadline = time.monotonic() + OPEN_TIMEOUT_S
        while time.monotonic() < open_deadline and not all(s.ready or s.error or s.closed for s in streams):
            await asyncio.sleep(0.05)
        failed = [s.error for s in streams if s.error]
        Path(f"{out}.ready").write_text(json.dumps({"ready": sum(s.ready for s in streams), "failed": failed[:5]}))
        expect: int | None = None
        cpu_expect = float("nan")
        while time.monotonic() < deadline:
            if expect is None:
                with contextlib.suppress(OSError, ValueError):
                    expect = int(expect_file.read_text())
                    deadline = min(deadline, time.monotonic() + DELIVERY_TIMEOUT_S)
                    cpu_expect = time.process_time()
            if expect is not None and all(s.live_changes >= expect or s.error or s.closed for s in streams):
                Path(f"{out}.delivered").touch()
                await asyncio.sleep(0.2)  # anything extra (a change twice) would arrive right behind
                break
            await asyncio.sleep(0.02 if expect is not None else 0.2)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    for task, s in zip(tasks, streams, strict=True):
        if not task.cancelled() and task.exception() is not None and s.error is None:
            s.error = repr(task.exception())
    cpu = time.process_time()
    result = {"streams": [s.result() for s in streams], "cpu": cpu, "cpu_delivery": cpu - cpu_expect}
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------- orchestrator
@dataclass
class _Idle:
    cpu_pct: float
    rss_mb: float
    threads: int
    fds: int


async def _idle(pid: int, seconds: float) -> _Idle:
    """The process's CPU (% of one core) over `seconds` of idling, then its RSS, threads and fds."""
    c0, w0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    cpu = (cpu_seconds(pid) - c0) / (time.monotonic() - w0) * 100
    threads, fds = threads_and_fds(pid)
    return _Idle(cpu, _rss_mb(pid), threads, fds)


class _Clients:
    """One client process holding `n` streams (see `clients`)."""

    def __init__(self, base: Path, name: str, url: str, agent: str, n: int, seconds: float, gate: int) -> None:
        self.out, self.expect = base / f"{name}.json", base / f"{name}.expect"
        cfg = {
            "url": url,
            "agent": agent,
            "n": n,
            "seconds": seconds,
            "out": str(self.out),
            "expect": str(self.expect),
            "open_concurrency": gate,
        }
        self.proc = subprocess.Popen([sys.executable, __file__, "--clients", json.dumps(cfg)], start_new_session=True)

    async def ready(self) -> dict[str, Any]:
        await wait_ready(self.out, self.proc, "client", OPEN_TIMEOUT_S + 30, poll=0.05)
        await asyncio.sleep(0.01)
        return dict(json.loads(Path(f"{self.out}.ready").read_text()))

    async def delivered(self, expect: int, timeout: float) -> None:
        """Tell the process how many changes to expect; return once it says every stream has them (or it
        ended, or `timeout` passed)."""
        self.expect.write_text(str(expect))
        deadline = time.monotonic() + timeout
        marker = Path(f"{self.out}.delivered")
        while not marker.exists() and self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.002)

    async def results(self, expect: int, timeout: float) -> list[dict[str, Any]]:
        self.expect.write_text(str(expect))
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.proc.poll() is None:
            self.kill()
            raise RuntimeError(f"the client process did not finish within {timeout:g} s")
        if self.proc.returncode != 0:
            raise RuntimeError(f"the client process failed (exit {self.proc.returncode}); its output is above")
        return list(json.loads(self.out.read_text())["streams"])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _check_streams(
    streams: list[dict[str, Any]], snapshot: tuple[int, str], writes: list[tuple[int, tuple[Any, ...], float]]
) -> tuple[dict[str, int], list[list[float]]]:
    """Problems found (kind -> streams affected) and, per write, its lag (s) at every stream that got it."""
    problems: dict[str, int] = {}

    def bad(kind: str) -> None:
        problems[kind] = problems.get(kind, 0) + 1

    lags: list[list[float]] = [[] for _ in writes]
    for s in streams:
        if s["status"] != 200 or s["error"]:
            bad(f"failed ({s['error'] or s['status']})"[:80])
            continue
        if not s["ready"]:
            bad("closed before its up-to-date" if s["closed"] else "not up to date in time")
        elif s["closed"]:
            bad("closed by the server")
        if tuple(s["snapshot"]) != snapshot:
            bad("snapshot differs from A's table")
        if s["must_refetch"]:
            bad("must-refetch")
        got = s["changes"]
        if len(got) != len(writes):
            bad(f"{len(got)} changes, not {len(writes)}")
        for i, (op, key, row, last, stamp) in enumerate(got[: len(writes)]):
            rid, expect_row, returned = writes[i]
            if op != "insert" or key != rid or tuple(row or ()) != expect_row or not last:
                bad("a change differs from A's write")
            else:
                lags[i].append(stamp - returned)
    return problems, lags


async def _write(st: Any, i: int, kind: str) -> tuple[int, tuple[Any, ...], float]:
    data = {"kind": kind, "payload": f"{kind} {i}", "score": i / 7}
    rid = int(await st.write_data(TABLE, data))
    returned = mono_now()
    return rid, (rid, data["kind"], data["payload"], data["score"]), returned


async def run(base: Path, url: str, args: argparse.Namespace) -> None:
    load0 = os.getloadavg()[0]
    rep = Replicator(base / "htpc", url)
    rep.start()
    client_sets: list[_Clients] = []
    try:
        st = await open_storage(base / "a", "bench-feed-idle", url)
        await write_warm(st, rep.url, args.warm)
        await asyncio.sleep(2.0)
        idle0 = await _idle(rep.pid, args.idle_seconds)

        # floor: one subscriber
        one = _Clients(base, "one", rep.url, st.agent_id, 1, args.idle_seconds + 30, 1)
        client_sets.append(one)
        await one.ready()
        snap_one = table_digest(st.db_path, TABLE, "id", EVENT_COLUMNS)
        floor_writes = []
        for i in range(args.floor_writes):
            floor_writes.append(await _write(st, i, "floor"))
            await asyncio.sleep(0.05)
        floor_problems, floor_lags = _check_streams(
            await one.results(args.floor_writes, DELIVERY_TIMEOUT_S + 30), snap_one, floor_writes
        )
        single = [lag[0] for lag in floor_lags if lag]
        await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 60)

        # N idle subscribers, then the fan-out
        many = _Clients(
            base, "many", rep.url, st.agent_id, args.subscribers, 3 * args.idle_seconds + 60, args.open_concurrency
        )
        client_sets.append(many)
        t_open = time.monotonic()
        opened = await many.ready()
        open_s = time.monotonic() - t_open
        rss_open = _rss_mb(rep.pid)
        snap_many = table_digest(st.db_path, TABLE, "id", EVENT_COLUMNS)
        await asyncio.sleep(2.0)
        idle_n = await _idle(rep.pid, args.idle_seconds)
        fanout_writes = []
        many.expect.write_text(str(args.fanout_writes))  # the client reads it within 0.2 s: its CPU is timed from then
        await asyncio.sleep(0.5)
        cpu_fanout = cpu_seconds(rep.pid)
        for i in range(args.fanout_writes):
            fanout_writes.append(await _write(st, i, "fanout"))
            if i + 1 < args.fanout_writes:
                await asyncio.sleep(0.2)
        await many.delivered(args.fanout_writes, DELIVERY_TIMEOUT_S + 30)
        cpu_fanout = cpu_seconds(rep.pid) - cpu_fanout
        streams = await many.results(args.fanout_writes, DELIVERY_TIMEOUT_S + 30)
        rss_after = _rss_mb(rep.pid)
        client = json.loads(many.out.read_text())
        await asyncio.sleep(2.0)  # the client process has exited: its streams are closed
        rss_closed, peak_rss = _rss_mb(rep.pid), rep.peak_rss_mb()
        await st.close()
    finally:
        for c in client_sets:
            c.kill()
        rep.stop()

    problems, lags = _check_streams(streams, snap_many, fanout_writes)
    valid = not problems and not floor_problems and len(single) == args.floor_writes
    n = args.subscribers
    print(
        f"A's table: {snap_many[0]} rows when the {n} streams opened ({opened['ready']} up to date in {open_s:.1f} s, "
        f"counted from the client process's start); idle windows of {args.idle_seconds:g} s"
    )
    print(f"  load average (1 min) at the start / end: {load0:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"  problems: single subscriber {floor_problems or 'none'}; {n} subscribers {problems or 'none'}")
    print(
        f"  client process CPU: {client['cpu']:.2f} s in all (start-up, {n} snapshots, idling, the fan-out), "
        f"{client['cpu_delivery'] * 1e3:.0f} ms from the fan-out's start to its end"
    )
    print(f"  replicator CPU from the first fan-out write until every subscriber had it: {cpu_fanout * 1e3:.0f} ms")
    for label, m in (("0 subscribers", idle0), (f"{n} subscribers", idle_n)):
        report(f"replicator idle, {label}: CPU", m.cpu_pct, "% core")
        report(f"replicator idle, {label}: RSS", m.rss_mb, "MB")
        print(f"  replicator, {label}: {m.threads} threads, {m.fds} open fds")
    per_sub_kib = (idle_n.rss_mb - idle0.rss_mb) * 1024 / n
    report("replicator RSS growth per subscriber", per_sub_kib, "KiB")
    report(f"replicator RSS just after the {n} streams opened", rss_open, "MB")
    report("replicator RSS after the fan-out", rss_after, "MB")
    report("replicator RSS 2 s after the streams closed", rss_closed, "MB")
    report("replicator peak RSS (VmHWM)", peak_rss, "MB")
    report(f"single subscriber: commit -> change read, p50 ({len(single)} writes)", pct(single, 50) * 1e3, "ms")
    report("single subscriber: commit -> change read, p99", pct(single, 99) * 1e3, "ms")
    everyone = [x for per_write in lags for x in per_write]
    reached = [len(per_write) for per_write in lags]
    print(f"  fan-out: {len(lags)} write(s), each reached {min(reached)}-{max(reached)} of {n} subscribers")
    report(f"fan-out to {n} subscribers: commit -> change read, p50", pct(everyone, 50) * 1e3, "ms")
    report(f"fan-out to {n} subscribers: commit -> change read, p99", pct(everyone, 99) * 1e3, "ms")
    report(f"fan-out to {n} subscribers: commit -> change read, max", max(everyone, default=float("nan")) * 1e3, "ms")
    summary(
        f"feed {n} idle SSE subscribers: replicator CPU",
        idle_n.cpu_pct,
        "% core",
        floor=idle0.cpu_pct,
        target=f"<= {TARGET_CPU_PCT:g}% core",
        met=idle_n.cpu_pct <= TARGET_CPU_PCT,
        valid=valid,
    )
    summary(
        f"feed {n} idle SSE subscribers: replicator RSS",
        idle_n.rss_mb,
        "MB",
        floor=idle0.rss_mb,
        target=f"<= +{TARGET_KIB_PER_SUBSCRIBER:g} KiB/subscriber",
        met=per_sub_kib <= TARGET_KIB_PER_SUBSCRIBER,
        valid=valid,
    )
    p99 = pct(everyone, 99) * 1e3
    summary(
        f"feed fan-out commit->{n} subscribers p99",
        p99,
        "ms",
        floor=pct(single, 99) * 1e3,
        target=f"<= {TARGET_FANOUT_P99_MS:g} ms",
        met=p99 <= TARGET_FANOUT_P99_MS,
        valid=valid,
    )


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base, nats_server(base / "js") as (url, _proc):
        await run(base, url, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=500, help="idle SSE streams held open")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="length of each idle measurement")
    parser.add_argument("--warm", type=int, default=10, help="rows in A's table before the streams open")
    parser.add_argument("--floor-writes", type=int, default=20, help="writes timed with a single subscriber")
    parser.add_argument("--fanout-writes", type=int, default=1, help="writes timed at every subscriber")
    parser.add_argument(
        "--open-concurrency", type=int, default=OPEN_CONCURRENCY, help="streams the client opens at once"
    )
    parser.add_argument("--clients", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (
        min(args.subscribers, args.warm, args.floor_writes, args.fanout_writes, args.open_concurrency) < 1
        or args.idle_seconds <= 0
    ):
        parser.error("counts must be at least 1, --idle-seconds positive")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.clients:
        with contextlib.suppress(ImportError):  # the client's loop: uvloop when installed, as the replicator's
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(clients(json.loads(_args.clients)))
    else:
        asyncio.run(main(_args))
