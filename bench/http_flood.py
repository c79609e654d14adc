"""/health and an agent's replication lag under HTTP connection floods (slowloris, idle) on `replicator serve`.

.venv/bin/python bench/http_flood.py [--seconds 20] [--timeout-s 10] [--nofile 1024] [--idle 600,1100] [--source DIR]

Starts a nats-server and `replicator serve` (its open-files limit set to --nofile, soft and hard, as in the
issue's 1,024; 0 keeps the inherited one), then measures /health over a fresh connection every 50 ms: with no
attack (the floor), while 300 slowloris clients trickle header bytes, and while 600 and 1,100 idle connections
are held open. Attackers run in their own process and reconnect at once when the server drops them (the worst
case for the server). A victim agent writes a row every 100 ms over NATS; its lag is the time until the row
is in the central copy (read from the file, not over HTTP). Printed: /health p50/p99 and failures, p50/p99 as
ratios of the floor, the victim's lag, and the attacker connections the server dropped. `--source DIR` runs
the replicator from another checkout (e.g. `git archive` of the commit before the limits).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, machine, nats_server, open_storage, pct

HOST = "127.0.0.1"
REQUEST = b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n"


# ---------------------------------------------------------------------- the replicator
def start_replicator(data_dir: Path, nats_url: str, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    python = [sys.executable]
    if args.source:  # -S: no .pth files, so the editable install's finder cannot win over the checkout
        site = next(p for p in sys.path if p.endswith("site-packages"))
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.source).resolve()), site])
        python.append("-S")
    nofile: int = args.nofile

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    argv = [*python, "-m", "replicator", "serve", "--data-dir", str(data_dir), "--nats-url", nats_url]
    argv += ["--port", str(port), "--http-request-timeout-s", str(args.timeout_s)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=(data_dir.parent / "replicator.log").open("wb"),
        start_new_session=True,
        env=env,
        cwd=data_dir.parent,  # not the checkout we run from: `-m` puts the working directory first
        preexec_fn=limit if nofile else None,
    )
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("replicator did not start")


# ---------------------------------------------------------------------- probes
@dataclass
class Probes:
    latencies: list[float] = field(default_factory=list)
    failures: int = 0


def probe_once(port: int, timeout: float = 5.0) -> float | None:
    """GET /health on a new connection; seconds until the whole 200 answer, or None."""
    start = time.perf_counter()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(REQUEST)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                body += chunk
            if not head.startswith(b"HTTP/1.1 200"):
                return None
    except (OSError, StopIteration, ValueError):
        return None
    return time.perf_counter() - start


def run_probes(port: int, seconds: float, interval: float = 0.05) -> Probes:
    out = Probes()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        took = probe_once(port)
        if took is None:
            out.failures += 1
        else:
            out.latencies.append(took)
        time.sleep(interval)
    return out


# ---------------------------------------------------------------------- attackers (own process)
async def _attacker(kind: str, port: int, count: int, seconds: float) -> dict[str, int]:
    stats = {"opened": 0, "dropped": 0, "connect_failed": 0, "open_at_end": 0}
    end = time.monotonic() + seconds

    async def one() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
            except (OSError, TimeoutError):
                stats["connect_failed"] += 1
                await asyncio.sleep(0.1)
                continue
            stats["opened"] += 1
            dropped = False
            try:
                if kind == "slowloris":
                    writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n")
                while time.monotonic() < end:
                    try:
                        data = await asyncio.wait_for(reader.read(4096), min(1.0, max(0.01, end - time.monotonic())))
                    except TimeoutError:
                        if kind == "slowloris":
                            writer.write(b"X-a: b\r\n")  # one header line a second, never the blank line
                        continue
                    if not data:  # EOF: the server closed it (after a 408 or not)
                        dropped = True
                        break
            except OSError:
                dropped = True
            finally:
                writer.close()
            if dropped:
                stats["dropped"] += 1
            else:
                stats["open_at_end"] += 1

    await asyncio.gather(*(one() for _ in range(count)))
    return stats


def _attacker_main(kind: str, port: int, count: int, seconds: float, conn: Connection) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    conn.send(asyncio.run(_attacker(kind, port, count, seconds)))


def attack(
    kind: str, port: int, count: int, seconds: float, during: Callable[[], Probes]
) -> tuple[Probes, dict[str, int]]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_attacker_main, args=(kind, port, count, seconds, child), daemon=True
    )
    proc.start()
    time.sleep(min(3.0, seconds / 4))  # let the attack build up
    probes = during()
    stats: dict[str, int] = parent.recv() if parent.poll(seconds + 30) else {}
    proc.join(10)
    return probes, stats


# ---------------------------------------------------------------------- the victim agent
class Victim(threading.Thread):
    """An agent writing one row every 100 ms over NATS (no HTTP); its lag is the time from the local commit
    to the row being in the central copy, read from the replicator's file. Lags are kept per phase."""

    def __init__(self, base: Path, nats_url: str, central: Path) -> None:
        super().__init__(daemon=True)
        self.base, self.nats_url, self.central = base, nats_url, central
        self.phase = "floor"
        self.lags: dict[str, list[float]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    def _applied(self, row_id: object) -> bool:
        try:
            conn = sqlite3.connect(f"file:{self.central}?mode=ro", uri=True, timeout=1)
            try:
                return conn.execute("SELECT 1 FROM events WHERE id = ?", (row_id,)).fetchone() is not None
            finally:
                conn.close()
        except sqlite3.Error:
            return False

    async def _main(self) -> None:
        st = await open_storage(self.base, "victim", self.nats_url)
        try:
            i = 0
            while not self.stop.is_set():
                phase = self.phase
                row_id = await st.write_data("events", {"kind": "lag", "payload": str(i), "score": 0.5})
                committed = time.perf_counter()
                while not self._applied(row_id) and time.perf_counter() - committed < 30:
                    await asyncio.sleep(0.002)
                self.lags.setdefault(phase, []).append(time.perf_counter() - committed)
                i += 1
                await asyncio.sleep(0.1)
        finally:
            await st.close()


# ---------------------------------------------------------------------- report
def line(
    name: str, probes: Probes, floor: Probes | None, stats: dict[str, int] | None, lags: list[float] | None = None
) -> None:
    p50, p99 = pct(probes.latencies, 50) * 1000, pct(probes.latencies, 99) * 1000
    text = (
        f"  {name:<30} p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  ok {len(probes.latencies):4d}  failed {probes.failures:4d}"
    )
    if floor is not None and floor.latencies:
        f50, f99 = pct(floor.latencies, 50) * 1000, pct(floor.latencies, 99) * 1000
        text += f"  ({p50 / f50:5.1f}x / {p99 / f99:5.1f}x the floor)"
    print(text, flush=True)
    if lags:
        print(
            f"  {'':<30} victim agent's replication lag: p50 {pct(lags, 50) * 1000:.1f} ms, "
            f"p99 {pct(lags, 99) * 1000:.1f} ms ({len(lags)} rows)",
            flush=True,
        )
    if stats:
        print(
            f"  {'':<30} attacker: {stats['opened']} connections opened, {stats['dropped']} dropped by the server, "
            f"{stats['open_at_end']} still open at the end, {stats['connect_failed']} connects failed",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each attack")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="replicator --http-request-timeout-s")
    parser.add_argument("--nofile", type=int, default=1024, help="the replicator's RLIMIT_NOFILE (0: inherit)")
    parser.add_argument("--slowloris", type=int, default=300)
    parser.add_argument("--idle", default="600,1100", help="idle floods, comma-separated sizes")
    parser.add_argument("--show-log", type=int, default=0, help="print the replicator log's last N lines")
    parser.add_argument("--source", default="", help="run the replicator from this checkout")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(
        f"replicator: --http-request-timeout-s {args.timeout_s:g}, open files {args.nofile or 'inherited'}"
        f"{', source ' + args.source if args.source else ''}; attacks {args.seconds:g} s each",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with nats_server(base / "js") as (url, _proc):
            port = free_port()
            rep = start_replicator(base / "data", url, port, args)
            victim = Victim(base / "victim", url, base / "data" / "agents" / "victim.db")
            victim.start()
            try:
                time.sleep(2)  # the victim's table exists centrally
                victim.phase = "floor"
                floor = run_probes(port, 10.0)
                line("no attack (floor)", floor, None, None, victim.lags.get("floor"))
                probe = lambda: run_probes(port, args.seconds - min(3.0, args.seconds / 4))  # noqa: E731
                floods = [("slowloris", args.slowloris)] + [("idle", int(n)) for n in args.idle.split(",") if n]
                floods = [(kind, count) for kind, count in floods if count > 0]
                for kind, count in floods:
                    victim.phase = name = f"{count} {kind} connections"
                    probes, stats = attack(kind, port, count, args.seconds, probe)
                    victim.phase = "between"
                    line(name, probes, floor, stats, victim.lags.get(name))
                    time.sleep(args.timeout_s + 1)  # let the server shed what is left
                victim.phase = "after"
                after = run_probes(port, 5.0)
                line("after the attacks", after, floor, None, victim.lags.get("after"))
                log = (base / "replicator.log").read_text(errors="replace").splitlines()
                errors = sum(1 for x in log if "Traceback" in x or "level=error" in x or "ERROR" in x)
                print(f"  replicator still running: {rep.poll() is None}; its log: {len(log)} lines, {errors} errors")
                for x in log[-int(args.show_log) :] if args.show_log else []:
                    print(f"    {x}")
            finally:
                victim.stop.set()
                victim.join(30)
                rep.terminate()
                try:
                    rep.wait(30)
                except subprocess.TimeoutExpired:
                    rep.kill()


if __name__ == "__main__":
    main()
