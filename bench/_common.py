"""Shared pieces of the benchmarks: a nats-server on a free loopback port, a replicator process, stats."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent_client import AgentStorage, Migration

BIN = Path(sys.executable).parent


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM (run_all stopping an overrunning benchmark) unwinds like an exception, so every `finally` and
    context manager runs and the processes a benchmark started in their own sessions (nats-server,
    replicator, workers) are stopped rather than orphaned."""
    raise SystemExit(128 + signum)


if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminated)

SCHEMA = [Migration(1, "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")]
#: The columns of `events`, in the order `event_tuple` and `table_digest(db, columns=EVENT_COLUMNS)` take them.
EVENT_COLUMNS = "id, kind, payload, score"


def event_tuple(row: Any) -> tuple[Any, ...]:
    """A row of `events` (a mapping, as the feed delivers it) as the tuple a SELECT of EVENT_COLUMNS gives."""
    return (row["id"], row["kind"], row["payload"], row["score"])


def mono_now() -> float:
    """CLOCK_MONOTONIC now: it is system-wide, so stamps taken in different processes compare."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


async def open_storage(base: Path, name: str, nats_url: str) -> AgentStorage:
    """An agent with one replicated table, `events`, as every benchmark uses."""
    st = AgentStorage(name, base, nats_url=nats_url)
    await st.open()
    await st.migrate(SCHEMA)
    await st.set_visibility("events", "always")
    return st


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextlib.contextmanager
def nats_server(store: Path, port: int | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = port or free_port()
    store.mkdir(parents=True, exist_ok=True)
    binary = BIN / "nats-server" if (BIN / "nats-server").exists() else shutil.which("nats-server")
    proc = subprocess.Popen(
        [str(binary), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port)
        yield f"nats://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        proc.wait(10)


class Replicator:
    def __init__(self, data_dir: Path, nats_url: str, extra: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.extra = list(extra)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start `replicator serve` and wait until /health answers."""
        self.start_nowait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("replicator did not start")

    def start_nowait(self) -> None:
        """Start `replicator serve` (its own process group) without waiting for it."""
        self.proc = subprocess.Popen(
            [
                str(BIN / "replicator"),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--nats-url",
                self.nats_url,
                "--port",
                str(self.port),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def central_db(self, agent_id: str) -> Path:
        """The agent's central copy (replicator/data_dir.py: `<data_dir>/agents/<agent_id>.db`)."""
        return self.data_dir / "agents" / f"{agent_id}.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        return status_mb(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)


def pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


def machine() -> str:
    cpu = "unknown cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}, {platform.system()}"


@contextlib.contextmanager
def bench_dir() -> Iterator[Path]:
    """The opening of every benchmark's run: print the machine line, then a scratch folder removed after."""
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def report(name: str, value: float, unit: str, target: str = "") -> None:
    fmt = f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    print(f"  {name:<58} {fmt:>14} {unit:<8} {target}", flush=True)


#: run_all.py names a file here; every `summary` line is appended to it as JSON as well as printed.
SUMMARY_ENV = "BENCH_SUMMARY_FILE"


def summary(
    name: str,
    figure: float,
    unit: str,
    *,
    floor: float | None,
    target: str,
    met: bool,
    valid: bool = True,
) -> None:
    """One figure of the summary table: the figure, the floor measured in the same run, their ratio, the target.

    `valid` is False when the run's data check failed (counts or checksums differ): a fast but wrong run is
    reported as wrong, never as met. Printed as a `SUMMARY` line and, under run_all, appended to its file.
    """
    ratio = figure / floor if floor else None
    row = {
        "name": name,
        "figure": figure,
        "unit": unit,
        "floor": floor,
        "ratio": ratio,
        "target": target,
        "met": bool(met and valid),
        "valid": valid,
    }
    verdict = "WRONG DATA" if not valid else ("met" if met else "not met")
    print(
        f"SUMMARY\t{name}\t{fmt(figure)}\t{unit}\t{fmt(floor)}\t{fmt(ratio, 'x')}\t{target}\t{verdict}",
        flush=True,
    )
    path = os.environ.get(SUMMARY_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def fmt(value: float | None, suffix: str = "") -> str:
    """A figure for a table: 3 significant decimals when small, thousands separators when large, '-' for none."""
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}{suffix}"
    if abs(value) >= 1:
        return f"{value:,.2f}{suffix}"
    return f"{value:.3f}{suffix}"


def table_digest(
    db: Path, table: str = "events", order: str = "id", columns: str = "*", timeout: float = 30
) -> tuple[int, str]:
    """(row count, sha256 of every row in key order) of one table, read through a read-only connection.

    The same digest on the agent's file and on its central copy says the copy is exact (values and storage
    classes: `repr` tells 1 from 1.0 and '1')."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
    try:
        h = hashlib.sha256()
        n = 0
        for row in conn.execute(f"SELECT {columns} FROM {table} ORDER BY {order}"):
            h.update(repr(row).encode())
            n += 1
        return n, h.hexdigest()
    finally:
        conn.close()


def rows_digest(rows: Mapping[Any, tuple[Any, ...]]) -> tuple[int, str]:
    """(count, sha256) of rows (key -> row tuple) in key order: the digest `table_digest` gives of the same rows."""
    h = hashlib.sha256()
    for key in sorted(rows):
        h.update(repr(rows[key]).encode())
    return len(rows), h.hexdigest()


def watch_new_rows(dbs: Sequence[Path], out: Path, stop: Path, interval: float, table: str = "events") -> None:
    """A watcher process's loop: stamp (mono_now) every new row of `table` in each file as soon as it is visible.

    Polls `PRAGMA data_version` of read-only connections, sleeping `interval` s between polls; when a file
    changes it reads the ids above the last one seen. Writes `<out>.ready` once it watches (start writing only
    then, so no row predates the watch); stops when `stop` exists or its parent is gone, then writes
    {"seen": [[[id, stamp], ...] per file], "poll_s": mean poll interval} to `out`."""
    conns = [sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None) for db in dbs]
    last = [c.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()[0] for c in conns]
    versions = [c.execute("PRAGMA data_version").fetchone()[0] for c in conns]
    seen: list[dict[int, float]] = [{} for _ in conns]
    Path(f"{out}.ready").touch()
    polls = 0
    parent = os.getppid()
    started = mono_now()
    while True:
        polls += 1
        for i, conn in enumerate(conns):
            v = conn.execute("PRAGMA data_version").fetchone()[0]
            if v == versions[i]:
                continue
            versions[i] = v
            now = mono_now()
            rows = conn.execute(f"SELECT id FROM {table} WHERE id > ? ORDER BY id", (last[i],)).fetchall()
            for (rid,) in rows:
                seen[i][rid] = now
            if rows:
                last[i] = rows[-1][0]
        if polls % 100 == 0 and (stop.exists() or os.getppid() != parent):
            break  # asked to stop, or orphaned
        time.sleep(interval)
    elapsed = mono_now() - started
    out.write_text(json.dumps({"seen": [list(s.items()) for s in seen], "poll_s": elapsed / polls}))


async def wait_ready(
    out: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 90, poll: float = 0.02
) -> None:
    """Wait until the child process `proc` writes `<out>.ready`; a clear error if it ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not Path(f"{out}.ready").exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} process failed (exit {proc.returncode}); its output is above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {what} process was not ready within {timeout:g} s")
        await asyncio.sleep(poll)


async def write_warm(st: AgentStorage, url: str, n: int) -> None:
    """`n` warm-up rows into `events`, then wait until the replicator at `url` has applied them."""
    for i in range(n):
        await st.write_data("events", {"kind": "warm", "payload": str(i), "score": 0.0})
    await wait_watermark(url, st.agent_id, await st.last_committed_seq(), 60)


def metric_total(text: str, name: str) -> float:
    """The sum of every sample of metric `name` in a Prometheus text exposition (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_mb(pid: int, field: str) -> float:
    """A memory figure of a process from /proc/<pid>/status (VmRSS, VmHWM, ...) in MB; NaN if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def threads_and_fds(pid: int) -> tuple[int, int]:
    """(threads, open file descriptors) of a process now."""
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


async def wait_watermark(url: str, agent_id: str, seq: int, timeout: float, poll: float = 0.01) -> float:
    """Poll `GET /relay/agents/<id>` until the agent's central watermark reaches `seq`; the perf_counter then."""
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=10) as client:
        while time.perf_counter() - start < timeout:
            r = await client.get(f"{url}/relay/agents/{agent_id}")
            if r.status_code == 200 and r.json()["watermark"] >= seq:
                return time.perf_counter()
            await asyncio.sleep(poll)
    raise TimeoutError(f"{agent_id} not applied up to {seq} within {timeout:g} s")


async def serve_and_sample(
    rep: Replicator,
    path: str,
    value: Callable[[httpx.Response], float],
    target: float,
    timeout: float = 900,
    poll: float = 0.02,
) -> tuple[float, list[tuple[float, float]]]:
    """Start `rep` (not waiting for it) over a stream already loaded, then poll `GET <rep.url><path>` every
    `poll` s until `value(response)` reaches `target` (or `timeout` s pass). (the perf_counter at the start,
    the (perf_counter, value) samples), for `drain_rate`. A refused connection (the server still starting) is
    retried, not sampled."""
    started = time.perf_counter()
    rep.start_nowait()
    samples: list[tuple[float, float]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            try:
                r = await client.get(f"{rep.url}{path}")
            except httpx.HTTPError:
                await asyncio.sleep(poll)
                continue
            done = value(r)
            samples.append((time.perf_counter(), done))
            if done >= target:
                break
            await asyncio.sleep(poll)
    return started, samples


async def naive_write(client: httpx.AsyncClient, port: int, local: sqlite3.Connection, n: int) -> httpx.Response:
    """One write the guide's way (bench/naive_relay.py): local sqlite3 insert + commit of row `n`, then a POST
    of the row to the naive relay on `port`, which inserts it. The relay's answer."""
    cur = local.execute("INSERT INTO events (kind, payload, score) VALUES (?, ?, ?)", ("n", str(n), 0.5))
    local.commit()
    return await client.post(
        f"http://127.0.0.1:{port}/relay/immediate",
        json={
            "agent_id": "naive",
            "table": "events",
            "data": {"id": cur.lastrowid, "kind": "n", "payload": str(n), "score": 0.5},
            "timestamp": time.time(),
        },
    )


def drain_rate(samples: Sequence[tuple[float, float]], total: float, started: float) -> tuple[float, str]:
    """Rate of a drain from progress samples (perf_counter, amount done so far) polled while it ran.

    Timed from the first sample showing progress to the first showing it all, so process start-up is not
    counted. When the first progress seen is already past half the total (a drain too short for the polling
    to time), the rate is taken from `started` instead (the process start: start-up counted, an
    underestimate) and the note says so."""
    moving = [(t, a) for t, a in samples if a > 0]
    if not moving:
        return float("nan"), "nothing applied"
    done = next(((t, a) for t, a in moving if a >= total), moving[-1])
    t1, a1 = moving[0]
    if a1 <= total / 2 and done[0] > t1:
        return (done[1] - a1) / (done[0] - t1), f"timed over {done[0] - t1:.2f} s of progress samples"
    return done[1] / (done[0] - started), "too short to time from samples: from process start (an underestimate)"
