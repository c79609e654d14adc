"""Shared pieces of the benchmarks: a nats-server on a free loopback port, a replicator process, stats."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent_client import AgentStorage, Migration

BIN = Path(sys.executable).parent
SCHEMA = [Migration(1, "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")]


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
    def __init__(self, data_dir: Path, nats_url: str) -> None:
        self.data_dir = data_dir
        self.nats_url = nats_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
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
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError("replicator did not start")

    def peak_rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

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


def report(name: str, value: float, unit: str, target: str = "") -> None:
    fmt = f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    print(f"  {name:<58} {fmt:>14} {unit:<8} {target}", flush=True)
