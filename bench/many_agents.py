"""Many agents on one box: 100 agents (10 processes x 10 AgentStorage) sustaining 1,000 writes/s in total
against one `replicator serve`, and 300 idle agents (10 x 30) connected: what they cost.

.venv/bin/python bench/many_agents.py [--processes 10] [--agents 10] [--rate 1000] [--seconds 20]
                                      [--idle-agents 30] [--idle-seconds 20] [--only load idle]

load: every agent writes one row at a time, paced at rate / (processes x agents) per second with a random
phase, for `--seconds`. Each write is stamped (CLOCK_MONOTONIC, system-wide) right after `write_data`
returns. A watcher thread in this (otherwise idle) orchestrating process holds a read-only connection to
every central file and sweeps them every `--poll-ms` checking `PRAGMA data_version`; new rows are stamped
when seen. Lag = seen - returned (resolution: one sweep, printed). At the end every agent flushes and the
orchestrator waits until every central watermark reaches the agent's last change, then compares every
agent's central table with its local one (count + sha256): `N/N equal`. The CPU of the agent processes,
the replicator and nats-server over the paced phase is printed too.

idle: `--processes` x `--idle-agents` agents open, each writes one row (so the replicator has met them all),
then stay connected and idle for `--idle-seconds`: the CPU of the agent processes + replicator + nats-server
(utime + stime deltas from /proc/<pid>/stat) over the wall time, as a share of the whole box (all cores),
and the threads and open fds of each process.

Bounded: every worker stops by itself after its phase (plus a grace period); the orchestrator kills the
process group of every process it started when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Replicator,
    bench_dir,
    cpu_seconds,
    nats_server,
    open_storage,
    pct,
    report,
    summary,
    table_digest,
    threads_and_fds,
)

#: A worker never outlives its phase by more than this (seconds): it exits by itself.
GRACE_S = 120.0


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _agent_name(proc: int, agent: int) -> str:
    return f"ma-{proc:02d}-{agent:02d}"


# ---------------------------------------------------------------------------------------------- worker side
async def _wait_file(path: Path, deadline: float, poll: float = 0.01) -> bool:
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll)
    return True


async def worker(cfg: dict[str, Any]) -> None:
    """One agent process: open its agents, write one row each, report ready, then its phase, then results."""
    base, url, proc = Path(cfg["base"]), cfg["url"], cfg["proc"]
    deadline = time.monotonic() + cfg["seconds"] + GRACE_S + 60
    agents = [await open_storage(base / f"p{proc:02d}", _agent_name(proc, a), url) for a in range(cfg["agents"])]
    for st in agents:
        await st.write_data("events", {"kind": "hello", "payload": st.agent_id, "score": 0.0})
        await st.flush(timeout=60)
    ready = {st.agent_id: await st.last_committed_seq() for st in agents}
    Path(cfg["ready"]).write_text(json.dumps(ready))
    if not await _wait_file(Path(cfg["go"]), deadline):
        return
    results: dict[str, Any] = {}
    if cfg["mode"] == "load":
        per_agent = cfg["rate"] / (cfg["agents"] * cfg["processes"])
        stop = time.perf_counter() + cfg["seconds"]

        async def write(st: Any) -> None:
            stamps: list[tuple[int, float]] = []
            interval = 1.0 / per_agent
            start = time.perf_counter() + random.random() * interval
            i = 0
            while True:
                target = start + i * interval
                if target >= stop:
                    break
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rid = await st.write_data("events", {"kind": "load", "payload": f"{st.agent_id}-{i}", "score": i})
                stamps.append((rid, _now()))
                i += 1
            results[st.agent_id] = {"stamps": stamps, "db": str(st.db_path)}

        t0, c0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(write(st) for st in agents))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        for st in agents:
            await st.flush(timeout=60)
            results[st.agent_id]["last"] = await st.last_committed_seq()
        results = {"elapsed": elapsed, "cpu": cpu, "agents": results}
    else:
        # a slow look for the stop file: the idle phase measures the agents, not this loop's own polling
        await _wait_file(Path(cfg["stop"]), deadline, poll=1.0)
    for st in agents:
        await st.close()
    Path(cfg["out"]).write_text(json.dumps(results))


# ---------------------------------------------------------------------------------------- orchestrator side
class _Watcher(threading.Thread):
    """Stamps every new row of every central `events` table when a `PRAGMA data_version` sweep sees it."""

    def __init__(self, files: dict[str, Path], poll: float) -> None:
        super().__init__(daemon=True)
        self.conns = {}
        self.last_id: dict[str, int] = {}
        self.version: dict[str, int] = {}
        for agent, path in files.items():
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
            self.conns[agent] = conn
            self.last_id[agent] = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
            self.version[agent] = conn.execute("PRAGMA data_version").fetchone()[0]
        self.poll = poll
        self.seen: dict[tuple[str, int], float] = {}
        self.sweeps = 0
        self.sweep_time = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        started = _now()
        while not self.stopping.is_set():
            for agent, conn in self.conns.items():
                v = conn.execute("PRAGMA data_version").fetchone()[0]
                if v == self.version[agent]:
                    continue
                self.version[agent] = v
                now = _now()
                rows = conn.execute("SELECT id FROM events WHERE id > ? ORDER BY id", (self.last_id[agent],)).fetchall()
                for (rid,) in rows:
                    self.seen[(agent, rid)] = now
                if rows:
                    self.last_id[agent] = rows[-1][0]
            self.sweeps += 1
            time.sleep(self.poll)
        self.sweep_time = (_now() - started) / max(1, self.sweeps)
        for conn in self.conns.values():
            conn.close()


def _spawn(cfg: dict[str, Any]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", json.dumps(cfg)], start_new_session=True, stdout=subprocess.DEVNULL
    )


def _kill(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


async def _wait_applied(rep: Replicator, want: dict[str, int], timeout: float) -> dict[str, int]:
    """Poll GET /relay/agents until every agent's watermark reaches `want`; the watermarks last seen."""
    deadline = time.monotonic() + timeout
    marks: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            r = await client.get(f"{rep.url}/relay/agents")
            marks = {a["agent_id"]: a["watermark"] for a in r.json()["agents"]}
            if all(marks.get(agent, 0) >= seq for agent, seq in want.items()):
                break
            await asyncio.sleep(0.05)
    return marks


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


async def _start_workers(
    base: Path, url: str, mode: str, args: argparse.Namespace, agents: int
) -> tuple[list[subprocess.Popen[bytes]], list[dict[str, Any]], dict[str, int]]:
    procs, cfgs = [], []
    for p in range(args.processes):
        cfg = {
            "mode": mode,
            "base": str(base / mode),
            "url": url,
            "proc": p,
            "processes": args.processes,
            "agents": agents,
            "rate": args.rate,
            "seconds": args.seconds if mode == "load" else args.idle_seconds,
            "ready": str(base / f"{mode}-ready-{p}.json"),
            "go": str(base / f"{mode}.go"),
            "stop": str(base / f"{mode}.stop"),
            "out": str(base / f"{mode}-out-{p}.json"),
        }
        cfgs.append(cfg)
        procs.append(_spawn(cfg))
    ready: dict[str, int] = {}
    deadline = time.monotonic() + 300
    for cfg, proc in zip(cfgs, procs, strict=True):
        path = Path(cfg["ready"])
        while not path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {cfg['proc']} did not get ready")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.01)
        ready.update(json.loads(path.read_text()))
    return procs, cfgs, ready


_Workers = tuple[Replicator, list[subprocess.Popen[bytes]], list[dict[str, Any]], dict[str, int], dict[str, int]]


@contextlib.asynccontextmanager
async def _phase(base: Path, url: str, mode: str, args: argparse.Namespace, agents: int) -> AsyncIterator[_Workers]:
    """A phase's replicator and worker processes, every agent's first rows awaited at the HTPC; both stopped
    (the workers killed) when the phase ends, however it ends. (replicator, worker processes, their configs,
    agent -> seq of its first rows, agent -> central watermark seen)"""
    rep = Replicator(base / f"htpc-{mode}", url)
    rep.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        t = time.perf_counter()
        procs, cfgs, ready = await _start_workers(base, url, mode, args, agents)
        marks = await _wait_applied(rep, ready, 120)
        print(f"{mode}: {len(ready)} agents in {args.processes} processes open in {time.perf_counter() - t:.1f} s")
        yield rep, procs, cfgs, ready, marks
    finally:
        _kill(procs)
        rep.stop()


async def load(base: Path, url: str, nats_pid: int, args: argparse.Namespace) -> None:
    async with _phase(base, url, "load", args, args.agents) as (rep, procs, cfgs, ready, marks):
        if any(marks.get(a, 0) < s for a, s in ready.items()):
            raise RuntimeError("the agents' first rows did not reach the HTPC")
        n_agents = len(ready)
        watcher = _Watcher({a: rep.central_db(a) for a in ready}, args.poll_ms / 1e3)
        watcher.start()
        cpu0, wall0 = _cpu([rep.pid, nats_pid]), time.monotonic()
        go = _now()
        Path(cfgs[0]["go"]).touch()
        for proc in procs:
            proc.wait(args.seconds + GRACE_S)
        cpu_used, wall = _cpu([rep.pid, nats_pid]) - cpu0, time.monotonic() - wall0
        results: dict[str, Any] = {}
        elapsed = 0.0
        agents_cpu = 0.0
        for cfg in cfgs:
            out = json.loads(Path(cfg["out"]).read_text())
            results.update(out["agents"])
            elapsed = max(elapsed, out["elapsed"])
            agents_cpu += out["cpu"]
        last = {agent: r["last"] for agent, r in results.items()}
        marks = await _wait_applied(rep, last, 120)
        await asyncio.sleep(10 * args.poll_ms / 1e3)
        watcher.stopping.set()
        watcher.join(10)
        equal = sum(
            table_digest(Path(r["db"])) == table_digest(rep.central_db(agent)) and marks.get(agent) == r["last"]
            for agent, r in results.items()
        )
    writes = sum(len(r["stamps"]) for r in results.values())
    lags = [
        watcher.seen[(agent, rid)] - t
        for agent, r in results.items()
        for rid, t in r["stamps"]
        if (agent, rid) in watcher.seen
    ]
    unseen = writes - len(lags)
    rate = writes / elapsed
    # Sustained = replicated: every write of the paced phase applied centrally, over the time that took.
    applied_by = max(
        (watcher.seen.get((a, rid), go) for a, r in results.items() for rid, _t in r["stamps"]), default=go
    )
    sustained = writes / (applied_by - go) if applied_by > go else float("nan")
    print(
        f"  {writes:,} writes in {elapsed:.1f} s (paced at {args.rate:,}/s); watcher sweep every "
        f"{watcher.sweep_time * 1e3:.2f} ms over {n_agents} files; rows never seen by the watcher: {unseen}"
    )
    report("writes/s committed at the agents", rate, "w/s")
    report("writes/s replicated (all applied centrally / time from start)", sustained, "w/s")
    report("lag, write_data returned -> central commit seen, p50", pct(lags, 50) * 1e3, "ms")
    report("lag p99", pct(lags, 99) * 1e3, "ms")
    report("lag max", max(lags, default=float("nan")) * 1e3, "ms")
    report("CPU during the paced phase, agent processes", agents_cpu / elapsed * 100, "% core")
    report("CPU until every write applied, replicator + nats-server", cpu_used / wall * 100, "% core")
    print(f"  central copy equal to local (count + sha256): {equal}/{n_agents} equal")
    valid = equal == n_agents and unseen == 0
    summary(
        f"{n_agents} agents writes/s replicated",
        sustained,
        "w/s",
        floor=None,
        target=f">= {0.95 * args.rate:,.0f}/s (95% of pace)",
        met=sustained >= 0.95 * args.rate,
        valid=valid,
    )
    p99 = pct(lags, 99) * 1e3
    summary(f"{n_agents} agents lag p99", p99, "ms", floor=None, target="<= 50 ms", met=p99 <= 50, valid=valid)


async def idle(base: Path, url: str, nats_pid: int, args: argparse.Namespace) -> None:
    async with _phase(base, url, "idle", args, args.idle_agents) as (rep, procs, cfgs, ready, marks):
        applied = sum(marks.get(a, 0) >= s for a, s in ready.items())
        n_agents = len(ready)
        Path(cfgs[0]["go"]).touch()
        await asyncio.sleep(2.0)  # let start-up work settle
        agent_pids = [p.pid for p in procs]
        cpu_a0, cpu_r0, cpu_n0 = _cpu(agent_pids), _cpu([rep.pid]), _cpu([nats_pid])
        w0 = time.monotonic()
        await asyncio.sleep(args.idle_seconds)
        wall = time.monotonic() - w0
        cpu_a, cpu_r, cpu_n = _cpu(agent_pids) - cpu_a0, _cpu([rep.pid]) - cpu_r0, _cpu([nats_pid]) - cpu_n0
        shapes = {f"agent process {i}": threads_and_fds(pid) for i, pid in enumerate(agent_pids)}
        shapes["replicator"] = threads_and_fds(rep.pid)
        shapes["nats-server"] = threads_and_fds(nats_pid)
        alive = all(p.poll() is None for p in procs)
        Path(cfgs[0]["stop"]).touch()
        for proc in procs:
            proc.wait(GRACE_S)
    cores = os.cpu_count() or 1
    share = (cpu_a + cpu_r + cpu_n) / wall / cores * 100
    print(f"  idle for {wall:.1f} s on {cores} cores; every agent met by the HTPC: {applied}/{n_agents}")
    report(f"CPU, {args.processes} agent processes", cpu_a / wall * 100, "% core")
    report("CPU, replicator", cpu_r / wall * 100, "% core")
    report("CPU, nats-server", cpu_n / wall * 100, "% core")
    report("CPU, all of them, share of the box", share, "%")
    agent_threads = [v[0] for k, v in shapes.items() if k.startswith("agent")]
    agent_fds = [v[1] for k, v in shapes.items() if k.startswith("agent")]
    print(
        f"  threads / fds per agent process: {min(agent_threads)}-{max(agent_threads)} / "
        f"{min(agent_fds)}-{max(agent_fds)}"
        f" (all agent processes: {sum(agent_threads)} threads, {sum(agent_fds)} fds)"
    )
    print(
        f"  replicator: {shapes['replicator'][0]} threads, {shapes['replicator'][1]} fds;"
        f" nats-server: {shapes['nats-server'][0]} threads, {shapes['nats-server'][1]} fds"
    )
    summary(
        f"{n_agents} idle agents CPU",
        share,
        "% box",
        floor=None,
        target="<= 5%",
        met=share <= 5,
        valid=applied == n_agents and alive,
    )


async def main(args: argparse.Namespace) -> None:
    with bench_dir() as base, nats_server(base / "js") as (url, nats_proc):
        if "load" in args.only:
            await load(base, url, nats_proc.pid, args)
        if "idle" in args.only:
            await idle(base, url, nats_proc.pid, args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=10, help="agent processes")
    parser.add_argument("--agents", type=int, default=10, help="agents per process in the load phase")
    parser.add_argument("--rate", type=int, default=1000, help="writes/s of all agents together (paced)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the paced phase")
    parser.add_argument(
        "--poll-ms",
        type=float,
        default=5.0,
        help="the watcher's sleep between sweeps (a sweep reads PRAGMA data_version of every central file: at 1 ms "
        "the watcher itself takes a large share of the 2 cores and inflates the lag it measures)",
    )
    parser.add_argument("--idle-agents", type=int, default=30, help="agents per process in the idle phase")
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="length of the idle measurement")
    parser.add_argument("--only", nargs="+", choices=["load", "idle"], default=["load", "idle"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.processes, args.agents, args.rate, args.idle_agents) < 1 or min(args.seconds, args.idle_seconds) <= 0:
        parser.error("counts must be at least 1, durations positive")
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.worker:
        asyncio.run(worker(json.loads(_args.worker)))
    else:
        asyncio.run(main(_args))
