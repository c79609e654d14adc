"""The HTPC (`replicator serve`) as a real subprocess for integration tests, plus polling and checksum helpers.

`HtpcProcess` runs the installed `replicator` console script against a real nats-server (or its embedded one),
waits for `/health`, and can SIGKILL it, restart it on the same data directory and port, or stop it with
SIGTERM while asserting a clean exit 0. Nothing here mocks NATS, SQLite or HTTP.

Its fixtures (`htpc_factory`, `htpc`, `module_nats`, `module_htpc`) are defined in tests/conftest.py.

`AckDroppingProxy` sits between the replicator and nats-server and can silently drop its JetStream acks: the
fault "applied and committed, but the ack never arrived", made deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from agent_client import AgentStorage, ChangeRecord, Migration, TableLayout, decode_value
from tests.support.nats_server import free_port

__all__ = [
    "FORGED_LAYOUT",
    "AckDroppingProxy",
    "HtpcProcess",
    "HtpcStartError",
    "agent_session",
    "apoll",
    "central_db_path",
    "decode_rows",
    "forged_record",
    "open_agent",
    "poll",
    "rows_digest",
    "run_cli",
    "sqlite_rows",
    "table_digest",
    "typed_value",
    "wait_agent_applied",
]

T = TypeVar("T")

START_TIMEOUT = 40.0
STOP_TIMEOUT = 25.0


class HtpcStartError(RuntimeError):
    """`replicator serve` exited or never became healthy."""


def replicator_command() -> list[str]:
    """The installed `replicator` console script of this venv (falls back to `python -m replicator`)."""
    script = Path(sys.executable).parent / "replicator"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "replicator"]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `replicator <args>` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*replicator_command(), *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


class HtpcProcess:
    """`replicator serve --data-dir DIR [--nats-url URL] --port PORT` as a child process in its own session."""

    def __init__(
        self,
        data_dir: Path,
        nats_url: str | None,
        *,
        port: int | None = None,
        nats_port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.nats_url = nats_url
        self.port = port or free_port()
        self.nats_port = nats_port
        self.extra_args = list(extra_args)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir.parent / f"replicator-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __repr__(self) -> str:
        return f"HtpcProcess({self.url}, nats={self.nats_url or 'embedded'}, data={self.data_dir})"

    # ------------------------------------------------------------------ process control
    def argv(self) -> list[str]:
        argv = [*replicator_command(), "serve", "--data-dir", str(self.data_dir), "--port", str(self.port)]
        if self.nats_url:
            argv += ["--nats-url", self.nats_url]
        if self.nats_port:
            argv += ["--nats-port", str(self.nats_port)]
        return argv + self.extra_args

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start (or restart on the same data dir and port) and wait until /health says ok."""
        assert not self.running, f"{self!r} is already running"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start #{self.starts + 1}: {' '.join(self.argv())}\n".encode())
            log.flush()
            env = {k: v for k, v in os.environ.items() if not k.startswith("REPLICATOR_")}
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=self.data_dir.parent,  # a relative path in a query (ATTACH 'x.db') would land in the tmp dir
            )
        self.starts += 1
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: object = "no answer"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise HtpcStartError(f"{self!r} exited with {self.returncode()} during startup:\n{self.log_tail()}")
                try:
                    resp = client.get(f"{self.url}/health")
                    last = resp.text[:300]
                    if resp.status_code == 200:
                        body: dict[str, Any] = resp.json()
                        # Up: connected and consuming (an agent may be blocked on purpose: that is a test's business).
                        if body.get("nats", {}).get("connected") and body.get("consumer", {}).get("running"):
                            return body
                except httpx.HTTPError as exc:
                    last = repr(exc)
                time.sleep(0.05)
        raise HtpcStartError(f"{self!r} not healthy after {timeout}s (last: {last}):\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash with no shutdown work at all. Waits until the process is gone."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)
        assert self.proc.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {self.proc.returncode}"

    def restart(self, timeout: float = START_TIMEOUT) -> None:
        if self.running:
            self.kill()
        self.start(timeout)

    def stop(self) -> int:
        """SIGTERM, wait, and assert a clean exit 0 (the consumer finished its batch and NATS drained)."""
        assert self.proc is not None, "never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
                raise AssertionError(f"{self!r} ignored SIGTERM for {STOP_TIMEOUT}s:\n{self.log_tail()}") from None
        code = self.proc.returncode
        assert code == 0, f"{self!r} exited with {code} after SIGTERM:\n{self.log_tail()}"
        return code

    def close(self) -> None:
        """Teardown: make sure nothing outlives the test (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # ------------------------------------------------------------------ HTTP conveniences (sync)
    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=10.0, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", timeout=10.0, **kwargs)

    def agents(self) -> dict[str, dict[str, Any]]:
        """`GET /relay/agents` keyed by agent id."""
        resp = self.get("/relay/agents")
        assert resp.status_code == 200, resp.text
        return {a["agent_id"]: a for a in resp.json()["agents"]}

    def agents_with(self, token: str) -> list[dict[str, Any]]:
        """`GET /relay/agents` with a bearer token (authentication on)."""
        resp = self.get("/relay/agents", headers={"Authorization": f"Bearer {token}"})
        assert resp.status_code == 200, resp.text
        return list(resp.json()["agents"])

    def central_db(self, agent_id: str) -> Path:
        return central_db_path(self.data_dir, agent_id)


def central_db_path(data_dir: Path, agent_id: str) -> Path:
    return Path(data_dir) / "agents" / f"{agent_id}.db"


# ---------------------------------------------------------------------- polling
def poll(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `fn` until it returns something truthy; fail with `what` (and the last value) at the deadline."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(interval)


async def apoll(fn: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.05) -> T:
    """Async `poll`: awaits `fn()` until truthy, without blocking the event loop between tries."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await fn()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


async def wait_agent_applied(
    client: httpx.AsyncClient, agent_id: str, seq: int, *, epoch: str | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """Poll `/relay/agents/<id>` until its watermark reaches `seq` (in `epoch`, if given)."""

    async def check() -> dict[str, Any] | None:
        resp = await client.get(f"/relay/agents/{agent_id}")
        if resp.status_code != 200:
            return None
        body: dict[str, Any] = resp.json()
        if epoch is not None and body["epoch"] != epoch:
            return None
        return body if body["watermark"] >= seq else None

    return await apoll(check, timeout, f"agent {agent_id} applied up to {seq}")


# ---------------------------------------------------------------------- agents
async def open_agent(
    agent_id: str,
    data_dir: Path,
    *,
    htpc_url: str | None = None,
    nats_url: str | None = None,
    migrations: Iterable[Migration] = (),
    visibility: Mapping[str, str] | None = None,
    **options: Any,
) -> AgentStorage:
    """Open a real AgentStorage, apply `migrations` and declare `visibility`; the caller closes it."""
    storage = AgentStorage(agent_id, data_dir, htpc_url=htpc_url, nats_url=nats_url, **options)
    await storage.open()
    try:
        await storage.migrate(list(migrations))
        for table, vis in (visibility or {}).items():
            await storage.set_visibility(table, vis)
    except BaseException:
        await storage.close()
        raise
    return storage


# ---------------------------------------------------------------------- lost acks
class AckDroppingProxy:
    """A loopback proxy for one NATS client that understands just enough of the client protocol to drop the
    client's JetStream acknowledgements (`PUB $JS.ACK.…`) while `drop_acks` is set. Everything else passes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.drop_acks = False
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        pending = b""
        try:
            while not self._closed:
                readable, _, _ = select.select([client, upstream], [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is upstream:
                        client.sendall(data)
                    else:
                        pending += data
                        out, pending = self._filter(pending)
                        upstream.sendall(out)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def _filter(self, buf: bytes) -> tuple[bytes, bytes]:
        """Split `buf` into complete protocol frames (forwarded unless they are dropped acks) and the rest."""
        out = bytearray()
        while True:
            end = buf.find(b"\r\n")
            if end < 0:
                return bytes(out), buf
            line = buf[:end]
            op = line.split(b" ", 1)[0].upper()
            frame_end = end + 2
            if op in (b"PUB", b"HPUB"):
                frame_end += int(line.split()[-1]) + 2  # payload (headers included for HPUB) and its CRLF
                if len(buf) < frame_end:
                    return bytes(out), buf
                if self.drop_acks and line.split()[1].startswith(b"$JS.ACK."):
                    self.dropped += 1
                    buf = buf[frame_end:]
                    continue
            out += buf[:frame_end]
            buf = buf[frame_end:]


# ---------------------------------------------------------------------- hand-made change records
#: A layout for forged records: table t(id INTEGER PRIMARY KEY, name TEXT).
FORGED_LAYOUT: dict[str, Any] = {
    "table": "t",
    "columns": ["id", "name"],
    "pk": ["id"],
    "types": ["INTEGER", "TEXT"],
    "sql": "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)",
}


def forged_record(
    agent: str,
    first: int,
    changes: list[tuple[int, str, int, list[Any]]],
    layouts: dict[str, dict[str, Any]],
    epoch: str = "0123456789abcdef",
    final: bool = True,
) -> bytes:
    """A change record built by hand (validated by the wire model), serialised with the stdlib json module so
    that it can carry values orjson refuses to write (integers beyond 64 bits)."""
    rec = ChangeRecord(
        agent_id=agent,
        epoch=epoch,
        first_seq=first,
        last_seq=first + len(changes) - 1,
        final=final,
        committed_at=time.time(),
        layouts={k: TableLayout(**v) for k, v in layouts.items()},
        changes=changes,
    )
    return json.dumps(rec.model_dump(exclude_none=True)).encode()


# ---------------------------------------------------------------------- exact comparison
def typed_value(value: Any) -> tuple[str, str]:
    """A value with its SQLite storage class made explicit: -0.0 != 0.0, 1 != 1.0, b'1' != '1'."""
    if value is None:
        return ("null", "")
    if isinstance(value, bool):
        raise TypeError("booleans are not SQLite values")
    if isinstance(value, int):
        return ("integer", str(value))
    if isinstance(value, float):
        return ("real", value.hex())
    if isinstance(value, str):
        return ("text", value)
    if isinstance(value, bytes | bytearray | memoryview):
        return ("blob", bytes(value).hex())
    raise TypeError(f"not a SQLite value: {value!r}")


def decode_rows(rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """`/relay/query` rows (wire-tagged: {"b": base64}, {"f": "inf"}) -> SQLite values."""
    return [tuple(decode_value(v) for v in row) for row in rows]


def rows_digest(rows: Iterable[Sequence[Any]]) -> tuple[int, str]:
    """(row count, sha256 over the sorted, type-tagged rows): equal iff the row multisets are equal exactly."""
    encoded = sorted(repr([typed_value(v) for v in row]) for row in rows)
    digest = hashlib.sha256("\n".join(encoded).encode()).hexdigest()
    return len(encoded), digest


def sqlite_rows(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Read rows from a SQLite file through its own read-only connection."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        return [tuple(r) for r in conn.execute(sql, params).fetchall()]
    finally:
        conn.close()


def table_digest(path: Path, table: str, columns: Sequence[str]) -> tuple[int, str]:
    cols = ", ".join(f'"{c}"' for c in columns)
    return rows_digest(sqlite_rows(path, f'SELECT {cols} FROM "{table}"'))


@contextlib.asynccontextmanager
async def agent_session(*args: Any, **kwargs: Any) -> AsyncIterator[AgentStorage]:
    """`async with agent_session(...) as storage:` around open_agent."""
    storage = await open_agent(*args, **kwargs)
    try:
        yield storage
    finally:
        await storage.close()


@contextlib.asynccontextmanager
async def client_and_agent(
    htpc: HtpcProcess,
    agent_id: str,
    agent_dir: Path,
    migrations: Iterable[Migration],
    tables: Iterable[str],
    *,
    nats_url: str | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, AgentStorage]]:
    """`async with client_and_agent(...) as (client, storage):` an HTTP client to `htpc`, and an agent whose
    `migrations` create `tables`, all replicated (visibility `always`); through `nats_url`, else the NATS URL
    the HTPC gives it."""
    async with (
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
        agent_session(
            agent_id,
            agent_dir,
            htpc_url=htpc.url,
            nats_url=nats_url,
            migrations=migrations,
            visibility=dict.fromkeys(tables, "always"),
        ) as storage,
    ):
        yield client, storage


async def settle_agent(client: httpx.AsyncClient, storage: AgentStorage, timeout: float = 20.0) -> int:
    """Flush the agent's changes and wait until the HTPC has applied all of them: its last committed seq."""
    last = await storage.last_committed_seq()
    await storage.flush(timeout=15)
    await wait_agent_applied(client, storage.agent_id, last, epoch=storage.epoch, timeout=timeout)
    return last
