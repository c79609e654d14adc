"""Live feed lag at a paced 1,000 writes/s: agent A's commit -> the change delivered by another agent's
`subscribe()` iterator, and -> visible in another agent's follower copy (`follow()`), beside the floors
measured in the same run (A's commit -> the central copy, NATS publish -> subscriber).

.venv/bin/python bench/feed_lag.py [--rate 1000] [--seconds 10] [--warm 100] [--poll-us 100]
                                   [--paths subscribe follow]

Processes (all on loopback, one machine): nats-server, `replicator serve`, and
- this script: agent A, writing one row per `write_data`, paced at `--rate` for `--seconds`; each write is
  stamped right before the call (`called`, also stored in the row's `score`) and right after it returns
  (`returned`), with CLOCK_MONOTONIC, which is system-wide, so every process's stamps compare;
- a subscriber process (`--subscriber`): agent B, `async for event in storage.subscribe(A, "events")`
  from a snapshot; each change is stamped as the iterator yields it;
- a follower process (`--follower`): agent C, `follow(A, ["events"])`; its follower file is
  `<data_dir>/<C>.follow/<A>.db` (`--paths` runs just one of the two, to see what they cost each other on a
  small box);
- a watcher process (`--watch`): read-only connections to A's central copy and to C's follower file,
  polling `PRAGMA data_version` of both every ~100 us (`time.sleep(1e-4)`; the achieved mean poll interval
  is printed: that is the resolution); when a file changes it reads the ids of the new rows (`id > last
  seen`) and stamps them. A row is visible in the follower file exactly when the follower's local
  transaction for it commits (rows, offset and all), so the stamp is the commit time within one poll.

The lag is stamped from `returned` (the commit lies between `called` and `returned`: from `returned`
understates by the return hop, from `called` overstates by the whole write; both are printed, the target is
judged on `returned`, as in bench/lag.py). Floors from the same run: commit -> central commit seen (the feed
cannot deliver before the HTPC has applied the change; bench/lag.py's method) and the NATS publish ->
subscriber round trip (after the run, at the same pace).

Checked before reporting: the follower copy equals A's table (count + sha256 in key order); the rows the
subscriber's iterator delivered (snapshot, then changes applied in order) equal A's table (count + sha256);
no change was delivered twice, none was missed, no must-refetch happened; the watcher saw every row in both
files. Every process stops by itself (a deadline), and the orchestrator kills what it started when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

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
    summary,
    table_digest,
    wait_ready,
    wait_watermark,
    watch_new_rows,
    write_warm,
)
from _floors import nats_round_trips

from agent_client import AgentStorage, Change, FeedEvent, MustRefetch, UpToDate

TABLE = "events"
#: A child process never outlives this many seconds past its phase: it exits by itself.
GRACE_S = 120.0
#: p50 / p99 targets of issue 12 for both paths (ms).
TARGET_P50_MS, TARGET_P99_MS = 5.0, 20.0


def follower_file(data_dir: Path, own_id: str, followed_id: str) -> Path:
    """The follower copy of `followed_id` kept by agent `own_id` (issue 12 contract, section 3)."""
    return data_dir / f"{own_id}.follow" / f"{followed_id}.db"


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# ---------------------------------------------------------------------------------------- subscriber process
async def subscriber(cfg: dict[str, Any]) -> None:
    """Agent B: consume `subscribe(A, "events")` from a snapshot, stamping each change as it is yielded.

    Writes `<out>.ready` after the snapshot's up-to-date; stops once the id written to `stop` has arrived
    (or at its deadline); then writes the stamps and what it received to `out`."""
    deadline = time.monotonic() + cfg["seconds"] + GRACE_S
    st = AgentStorage(cfg["name"], cfg["dir"], htpc_url=cfg["htpc"], nats_url=cfg["nats"])
    await st.open()
    out = Path(cfg["out"])
    arrivals: dict[int, float] = {}
    rows: dict[Any, tuple[Any, ...]] = {}
    counts = {"changes": 0, "duplicates": 0, "schemas": 0, "up_to_date": 0, "must_refetch": 0}
    target: list[int] = []
    done = asyncio.Event()

    async def consume() -> None:
        events = cast(AsyncIterator[FeedEvent], await _maybe_await(st.subscribe(cfg["agent"], TABLE)))
        try:
            async for ev in events:
                now = mono_now()
                if isinstance(ev, Change):
                    counts["changes"] += 1
                    rid = ev.key["id"]
                    if ev.op == "delete":
                        rows.pop(rid, None)
                    else:
                        rows[rid] = event_tuple(ev.row)
                    if isinstance(rid, int):
                        if rid in arrivals:
                            counts["duplicates"] += 1
                        else:
                            arrivals[rid] = now
                    if target and ev.last and target[0] in arrivals:
                        done.set()
                        return
                elif isinstance(ev, UpToDate):
                    counts["up_to_date"] += 1
                    if counts["up_to_date"] == 1:
                        Path(f"{out}.ready").touch()
                elif isinstance(ev, MustRefetch):
                    counts["must_refetch"] += 1
                    rows.clear()
                else:
                    counts["schemas"] += 1
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    task = asyncio.create_task(consume())
    stop = Path(cfg["stop"])
    try:
        while time.monotonic() < deadline and not task.done():
            with contextlib.suppress(OSError, ValueError):
                target.append(int(stop.read_text()))
                break
            await asyncio.sleep(0.05)
        if target and target[0] not in arrivals and not task.done():
            waiter = asyncio.create_task(done.wait())
            await asyncio.wait(
                [task, waiter], timeout=max(1.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"subscribe() failed: {task.exception()!r}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await st.close()
    count, digest = rows_digest(rows)
    out.write_text(json.dumps({"arrivals": list(arrivals.items()), "count": count, "digest": digest, **counts}))


# ------------------------------------------------------------------------------------------ follower process
async def follower(cfg: dict[str, Any]) -> None:
    """Agent C: follow A's `events`; `<out>.ready` once the follower file holds the warm-up rows; runs until
    `stop` exists (or its deadline); writes its health_check's `follows` to `out`."""
    deadline = time.monotonic() + cfg["seconds"] + GRACE_S
    st = AgentStorage(cfg["name"], cfg["dir"], htpc_url=cfg["htpc"], nats_url=cfg["nats"])
    await st.open()
    out, stop = Path(cfg["out"]), Path(cfg["stop"])
    try:
        await _maybe_await(st.follow(cfg["agent"], [TABLE]))
        path = follower_file(Path(cfg["dir"]), cfg["name"], cfg["agent"])
        while time.monotonic() < deadline:
            with contextlib.suppress(sqlite3.Error):
                if path.exists() and table_digest(path, TABLE, "id", EVENT_COLUMNS)[0] >= cfg["warm"]:
                    Path(f"{out}.ready").touch()
                    break
            await asyncio.sleep(0.05)
        while not stop.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        health = await st.health_check()
    finally:
        await st.close()
    out.write_text(json.dumps({"follows": health.get("follows")}, default=str))


# ------------------------------------------------------------------------------------------------ orchestrator
def _spawn(mode: str, cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, f"--{mode}", json.dumps(cfg)], start_new_session=True)


async def _wait_equal(db: Path, expect: tuple[int, str], timeout: float) -> bool:
    """Poll the follower file until its table equals `expect` (count + digest) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(sqlite3.Error):
            if table_digest(db, TABLE, "id", EVENT_COLUMNS) == expect:
                return True
        await asyncio.sleep(0.1)
    return False


def _lags(stamps: dict[int, tuple[float, float]], seen: dict[int, float], which: int) -> list[float]:
    return [seen[rid] - s[which] for rid, s in stamps.items() if rid in seen]


async def run(base: Path, url: str, nats_pid: int, args: argparse.Namespace) -> None:
    load0 = os.getloadavg()[0]
    rep = Replicator(base / "htpc", url)
    rep.start()
    children: list[subprocess.Popen[bytes]] = []
    subscribe, follow = "subscribe" in args.paths, "follow" in args.paths
    try:
        st = await open_storage(base / "a", "bench-feed-a", url)
        await write_warm(st, rep.url, args.warm)  # the snapshot the subscriber and the follower start from
        common = {"htpc": rep.url, "nats": url, "agent": st.agent_id, "seconds": args.seconds, "warm": args.warm}
        cfgs = {
            mode: {
                **common,
                "name": name,
                "dir": str(base / mode),
                "out": str(base / f"{mode}.json"),
                "stop": str(base / f"{mode}.stop"),
            }
            for mode, name, on in (
                ("subscriber", "bench-feed-sub", subscribe),
                ("follower", "bench-feed-follower", follow),
            )
            if on
        }
        procs = {mode: _spawn(mode, cfg) for mode, cfg in cfgs.items()}
        children.extend(procs.values())
        for mode, proc in procs.items():
            await wait_ready(Path(cfgs[mode]["out"]), proc, mode)
        dbs = [rep.central_db(st.agent_id)]
        if follow:
            fol_db = follower_file(Path(cfgs["follower"]["dir"]), cfgs["follower"]["name"], st.agent_id)
            dbs.append(fol_db)
        watch_out, watch_stop = base / "watch.json", base / "watch.stop"
        watch_cfg = {"dbs": [str(p) for p in dbs], "out": str(watch_out), "stop": str(watch_stop)}
        watcher = _spawn("watch", {**watch_cfg, "interval": args.poll_us / 1e6})
        children.append(watcher)
        await wait_ready(watch_out, watcher, "watcher")

        stamps: dict[int, tuple[float, float]] = {}
        n = int(args.rate * args.seconds)
        pids = {"replicator": rep.pid, "nats-server": nats_pid, "writer (A)": os.getpid(), "watcher": watcher.pid}
        pids.update({f"{mode} ({cfgs[mode]['name']})": proc.pid for mode, proc in procs.items()})
        cpu0, wall0 = {k: cpu_seconds(p) for k, p in pids.items()}, time.monotonic()
        start = time.perf_counter()
        for i in range(n):
            delay = start + i / args.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            called = mono_now()
            rid = await st.write_data(TABLE, {"kind": "lag", "payload": str(i), "score": called})
            stamps[int(rid)] = (called, mono_now())
        achieved = n / (time.perf_counter() - start)
        await st.flush(timeout=60)
        await wait_watermark(rep.url, st.agent_id, await st.last_committed_seq(), 60)
        wall = time.monotonic() - wall0
        cpu = {k: (cpu_seconds(p) - cpu0[k]) / wall * 100 for k, p in pids.items()}
        expect = table_digest(st.db_path, TABLE, "id", EVENT_COLUMNS)
        central_digest = table_digest(rep.central_db(st.agent_id), TABLE, "id", EVENT_COLUMNS)
        converged = await _wait_equal(fol_db, expect, 60) if follow else True
        follower_digest = table_digest(fol_db, TABLE, "id", EVENT_COLUMNS) if follow else expect
        if subscribe:
            Path(cfgs["subscriber"]["stop"]).write_text(str(max(stamps)))
        if follow:
            Path(cfgs["follower"]["stop"]).touch()
        for mode, proc in procs.items():
            if proc.wait(GRACE_S) != 0:
                raise RuntimeError(f"the {mode} process failed (exit {proc.returncode}); its output is above")
        await asyncio.sleep(0.2)
        watch_stop.touch()
        watcher.wait(30)
        await st.close()
        results = {mode: json.loads(Path(cfg["out"]).read_text()) for mode, cfg in cfgs.items()}
        watched = json.loads(watch_out.read_text())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
        rep.stop()
    rtt = await nats_round_trips(url, min(5000, n), args.rate)

    seen: dict[str, dict[int, float]] = {"central commit seen (floor)": {int(k): v for k, v in watched["seen"][0]}}
    if subscribe:
        seen["subscribe() delivered"] = {int(k): v for k, v in results["subscriber"]["arrivals"]}
    if follow:
        seen["follower copy commit seen"] = {int(k): v for k, v in watched["seen"][1]}
    unseen = {label: sum(rid not in got for rid in stamps) for label, got in seen.items()}
    checks = {"central == A": central_digest == expect, "every row seen": not any(unseen.values())}
    print(
        f"{n:,} writes paced at {args.rate:,}/s for {args.seconds:g} s (achieved {achieved:,.0f}/s); watcher poll "
        f"every {watched['poll_s'] * 1e6:.0f} us over {len(dbs)} file(s)"
    )
    print("  CPU while writing and until applied, % of a core: " + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items()))
    print(f"  load average (1 min) at the start / end: {load0:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"  A's table: {expect[0]:,} rows, sha256 {expect[1][:16]}...; rows never seen: {unseen}")
    if subscribe:
        sub = results["subscriber"]
        checks["subscriber's rows == A"] = (sub["count"], sub["digest"]) == expect
        checks["no change delivered twice"] = sub["duplicates"] == 0
        checks["no must-refetch"] = sub["must_refetch"] == 0
        print(
            f"  subscriber: {sub['changes']:,} changes ({args.warm} from the snapshot), {sub['duplicates']} twice, "
            f"{sub['must_refetch']} must-refetch, {sub['up_to_date']} up-to-date; "
            f"rows {sub['count']:,} sha256 {sub['digest'][:16]}..."
        )
    if follow:
        checks["follower copy == A"] = follower_digest == expect and converged
        print(f"  follower copy: {follower_digest[0]:,} rows sha256 {follower_digest[1][:16]}...")
        print(f"  follower health_check follows: {results['follower']['follows']}")
    print(f"  checks: {checks}")
    valid = all(checks.values())
    report("NATS publish -> subscriber, same server (floor) p50", pct(rtt, 50) * 1e3, "ms")
    report("NATS publish -> subscriber, same server (floor) p99", pct(rtt, 99) * 1e3, "ms")
    figures: dict[str, tuple[float, float]] = {}
    for label, got in seen.items():
        for which, start_label in ((1, "write_data returned"), (0, "write_data called")):
            lags = _lags(stamps, got, which)
            report(f"{start_label} -> {label}, p50", pct(lags, 50) * 1e3, "ms")
            report(f"{start_label} -> {label}, p99", pct(lags, 99) * 1e3, "ms")
        lags = _lags(stamps, got, 1)
        figures[label] = (pct(lags, 50) * 1e3, pct(lags, 99) * 1e3)
        report(f"write_data returned -> {label}, max", max(lags, default=float("nan")) * 1e3, "ms")
    central = seen["central commit seen (floor)"]
    for label, got in seen.items():
        if got is central:
            continue
        share = [got[rid] - central[rid] for rid in stamps if rid in got and rid in central]
        report(f"central commit seen -> {label} (the feed's own share), p50", pct(share, 50) * 1e3, "ms")
        report(f"central commit seen -> {label} (the feed's own share), p99", pct(share, 99) * 1e3, "ms")
    f50, f99 = figures["central commit seen (floor)"]
    for name, label in (
        ("feed lag commit->subscribe()", "subscribe() delivered"),
        ("feed lag commit->follower copy", "follower copy commit seen"),
    ):
        if label not in figures:
            continue
        p50, p99 = figures[label]
        for q, figure, floor, target_ms in ((50, p50, f50, TARGET_P50_MS), (99, p99, f99, TARGET_P99_MS)):
            summary(
                f"{name} p{q}",
                figure,
                "ms",
                floor=floor,
                target=f"<= {target_ms:g} ms",
                met=figure <= target_ms,
                valid=valid,
            )


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base, nats_server(base / "js") as (url, nats_proc):
        await run(base, url, nats_proc.pid, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=1000, help="writes per second (paced)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the paced phase")
    parser.add_argument("--warm", type=int, default=100, help="rows written before the subscriber and follower start")
    parser.add_argument("--poll-us", type=float, default=100.0, help="the watcher's sleep between polls")
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=["subscribe", "follow"],
        default=["subscribe", "follow"],
        help="which paths to measure (each adds a process; both run at once by default)",
    )
    parser.add_argument("--watch", help=argparse.SUPPRESS)
    parser.add_argument("--subscriber", help=argparse.SUPPRESS)
    parser.add_argument("--follower", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rate < 1 or args.seconds <= 0 or args.warm < 1:
        parser.error("--rate and --warm must be at least 1, --seconds positive")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.watch:
        _w = json.loads(_args.watch)
        watch_new_rows([Path(p) for p in _w["dbs"]], Path(_w["out"]), Path(_w["stop"]), _w["interval"], TABLE)
    elif _args.subscriber:
        asyncio.run(subscriber(json.loads(_args.subscriber)))
    elif _args.follower:
        asyncio.run(follower(json.loads(_args.follower)))
    else:
        asyncio.run(main(_args))
