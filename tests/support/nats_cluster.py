"""A real 3-node NATS JetStream cluster for tests, run from the production files in deploy/nats/cluster/.

Each `deploy/nats/cluster/nats-N.conf` starts with a settings block (`NAME: "value"` lines: node name,
listen addresses, routes, store dir). `render_node_config` rewrites exactly those lines, so the cluster the
tests run is the deployed configuration with only addresses and paths changed: clients, routes and
monitoring on free 127.0.0.1 ports, JetStream stores under the test's tmp dir. Routes are resolved by node
name (`nats-route://nats-2:6222` -> node nats-2's cluster port), so a wrong route in a file breaks the test.

`NatsCluster` runs one `nats-server` subprocess per node (the venv's binary, never Docker):

    cluster = NatsCluster(tmp_path / "cluster")
    cluster.start()        # all nodes; blocks until every node's /healthz is ok (JetStream meta leader known)
    cluster.kill(1)        # SIGKILL node index 1 (nats-2); its store stays
    cluster.start(1)       # restart it on the same ports and store; blocks until it has caught up
    cluster.close()        # everything down (also done at interpreter exit)

The methods block (they poll HTTP and sockets): from async tests call them with `asyncio.to_thread` so the
agent's publisher keeps running on the event loop meanwhile.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from tests.support.nats_server import HOST, RESERVED_PORTS, free_port, nats_server_binary

__all__ = [
    "CLUSTER_CONFIGS",
    "CLUSTER_DIR",
    "SETTINGS_KEYS",
    "ClusterNode",
    "NatsCluster",
    "NatsClusterError",
    "read_settings",
    "render_node_config",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO_ROOT / "deploy" / "nats" / "cluster"
CLUSTER_CONFIGS = tuple(CLUSTER_DIR / f"nats-{i}.conf" for i in (1, 2, 3))
#: the lines of a node file's settings block; everything else is the same in tests and production
SETTINGS_KEYS = (
    "NODE_NAME",
    "CLIENT_LISTEN",
    "MONITOR_LISTEN",
    "CLUSTER_LISTEN",
    "ROUTE_A",
    "ROUTE_B",
    "JETSTREAM_DIR",
)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_SETTING_LINE = r'^(?P<key>{key}):[ \t]*"(?P<value>[^"\n]*)"[ \t]*$'

_live: set[NatsCluster] = set()
_live_lock = threading.Lock()


class NatsClusterError(RuntimeError):
    """A cluster node could not be configured, started, stopped or reached."""


def read_settings(text: str) -> dict[str, str]:
    """The settings block of a node file: each of SETTINGS_KEYS must appear exactly once as `KEY: "value"`."""
    out: dict[str, str] = {}
    for key in SETTINGS_KEYS:
        found = list(re.finditer(_SETTING_LINE.format(key=re.escape(key)), text, flags=re.MULTILINE))
        if len(found) != 1:
            raise NatsClusterError(f'expected exactly one line `{key}: "..."`, found {len(found)}')
        out[key] = found[0].group("value")
    return out


def render_node_config(text: str, values: dict[str, str]) -> str:
    """`text` with the value of each settings line in `values` replaced (each must exist exactly once)."""
    for key, value in values.items():
        if key not in SETTINGS_KEYS:
            raise NatsClusterError(f"{key} is not a settings key of the node files")
        if '"' in value or "\n" in value:
            raise NatsClusterError(f"unsafe value for {key}: {value!r}")
        pattern = _SETTING_LINE.format(key=re.escape(key))
        text, count = re.subn(pattern, f'{key}: "{value}"'.replace("\\", "\\\\"), text, flags=re.MULTILINE)
        if count != 1:
            raise NatsClusterError(f'expected exactly one line `{key}: "..."`, found {count}')
    return text


def _route_target(route: str) -> str:
    """`nats-route://nats-2:6222` -> `nats-2` (the node a route points at)."""
    parsed = urlparse(route)
    if parsed.scheme not in ("nats-route", "nats") or not parsed.hostname:
        raise NatsClusterError(f"unexpected route URL {route!r}")
    return parsed.hostname


def _port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ClusterNode:
    """One node: its rendered config, ports, store and (when running) process."""

    index: int
    name: str
    source: Path
    client_port: int
    cluster_port: int
    http_port: int
    store_dir: Path
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.client_port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


class NatsCluster:
    """Three nats-server processes from deploy/nats/cluster/*.conf, on free loopback ports (see module doc)."""

    def __init__(self, work_dir: Path, config_files: Sequence[Path] = CLUSTER_CONFIGS) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        sources = [(Path(p), Path(p).read_text()) for p in config_files]
        settings = [read_settings(text) for _p, text in sources]
        names = [s["NODE_NAME"] for s in settings]
        if len(set(names)) != len(names):
            raise NatsClusterError(f"node names are not unique: {names}")
        ports: set[int] = set()

        def new_port() -> int:
            while True:
                port = free_port()
                if port not in ports and port not in RESERVED_PORTS and port != 8000:
                    ports.add(port)
                    return port

        self.nodes: list[ClusterNode] = []
        for index, ((path, _text), s) in enumerate(zip(sources, settings, strict=True)):
            node_dir = self.work_dir / s["NODE_NAME"]
            node_dir.mkdir(exist_ok=True)
            self.nodes.append(
                ClusterNode(
                    index=index,
                    name=s["NODE_NAME"],
                    source=path,
                    client_port=new_port(),
                    cluster_port=new_port(),
                    http_port=new_port(),
                    store_dir=node_dir / "store",
                    config_path=node_dir / path.name,
                    log_path=node_dir / "nats-server.log",
                )
            )
        by_name = {n.name: n for n in self.nodes}
        for node, (_path, text), s in zip(self.nodes, sources, settings, strict=True):
            routes = {}
            for key in ("ROUTE_A", "ROUTE_B"):
                target = _route_target(s[key])
                if target not in by_name or target == node.name:
                    raise NatsClusterError(f"{node.source.name}: {key} points at {target!r}, not another node")
                routes[key] = f"nats-route://{HOST}:{by_name[target].cluster_port}"
            if len(set(routes.values())) != 2:
                raise NatsClusterError(f"{node.source.name}: ROUTE_A and ROUTE_B point at the same node")
            rendered = render_node_config(
                text,
                {
                    "NODE_NAME": node.name,
                    "CLIENT_LISTEN": f"{HOST}:{node.client_port}",
                    "MONITOR_LISTEN": f"{HOST}:{node.http_port}",
                    "CLUSTER_LISTEN": f"{HOST}:{node.cluster_port}",
                    "JETSTREAM_DIR": str(node.store_dir),
                    **routes,
                },
            )
            node.config_path.write_text(rendered)

    # ------------------------------------------------------------------ addresses
    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (what agents and `replicator serve --nats-url` take)."""
        return ",".join(self.urls)

    def index_of(self, url_or_port: str | int) -> int:
        """The node index serving a client URL (or port)."""
        port = url_or_port if isinstance(url_or_port, int) else urlparse(str(url_or_port)).port
        for node in self.nodes:
            if node.client_port == port:
                return node.index
        raise NatsClusterError(f"no node listens on {url_or_port!r}")

    def index_by_name(self, name: str) -> int:
        for node in self.nodes:
            if node.name == name:
                return node.index
        raise NatsClusterError(f"no node named {name!r}")

    def running(self) -> list[int]:
        return [n.index for n in self.nodes if n.running]

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, i: int | None = None, timeout: float = START_TIMEOUT) -> None:
        """Start node `i` (or every stopped node) and block until each started node reports /healthz ok.

        /healthz answers 200 only once the node has contact with a JetStream meta leader and its stream and
        consumer replicas are current, so after start() returns the node takes part in quorum.
        """
        indexes = [i] if i is not None else [n.index for n in self.nodes]
        started = [self.nodes[k] for k in indexes if not self.nodes[k].running]
        for node in started:
            self._launch(node)
        deadline = time.monotonic() + timeout
        for node in started:
            self._wait_healthy(node, deadline)

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (a crash: no flush, no leadership handover); waits until its ports are closed."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGKILL)
        self._reap(node)

    def stop(self, i: int) -> None:
        """SIGTERM node `i` (clean shutdown, hands over leadership) and wait until it is gone."""
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
        self._reap(node)

    def close(self) -> None:
        """Every node down (SIGKILL: nothing of the store is needed after a test). Safe to call twice."""
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self.kill(node.index)
        finally:
            with _live_lock:
                _live.discard(self)

    # ------------------------------------------------------------------ monitoring
    def healthz(self, i: int) -> tuple[int, str]:
        """(status code, body) of node i's /healthz; (0, error) when it does not answer."""
        try:
            resp = httpx.get(f"{self.nodes[i].monitor_url}/healthz", timeout=1.0)
        except httpx.HTTPError as exc:
            return 0, repr(exc)
        return resp.status_code, resp.text.strip()

    def jsz(self, i: int, **params: Any) -> dict[str, Any]:
        """Node i's /jsz (JetStream state, meta cluster) as a dict."""
        resp = httpx.get(f"{self.nodes[i].monitor_url}/jsz", params=params, timeout=2.0)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        return body

    def meta_leader(self) -> str | None:
        """Name of the JetStream meta leader, as seen by the first running node that knows one."""
        for i in self.running():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                leader = (self.jsz(i).get("meta_cluster") or {}).get("leader")
                if leader:
                    return str(leader)
        return None

    def stream_state(self, i: int, stream: str) -> dict[str, Any] | None:
        """Node i's own replica of `stream` (/jsz `state`: messages, first_seq, last_seq...), None if absent."""
        for account in self.jsz(i, accounts="true", streams="true").get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail.get("name") == stream:
                    state: dict[str, Any] = detail.get("state") or {}
                    return state
        return None

    def client_node(self, client_name: str) -> int | None:
        """Index of the running node a client named `client_name` is connected to (from /connz), else None."""
        for i in self.running():
            with contextlib.suppress(httpx.HTTPError, ValueError):
                resp = httpx.get(f"{self.nodes[i].monitor_url}/connz", params={"limit": 1024}, timeout=2.0)
                if any(c.get("name") == client_name for c in resp.json().get("connections") or []):
                    return i
        return None

    def routes(self, i: int) -> int:
        """Number of route connections node i has (2 per peer pool in 2.10+; > 0 means it is clustered)."""
        resp = httpx.get(f"{self.nodes[i].monitor_url}/routez", timeout=2.0)
        resp.raise_for_status()
        return int(resp.json().get("num_routes", 0))

    # ------------------------------------------------------------------ internals
    def _launch(self, node: ClusterNode) -> None:
        for port in (node.client_port, node.cluster_port, node.http_port):
            if _port_accepts(port):
                raise NatsClusterError(f"port {port} of {node.name} is already in use")
        with _live_lock:
            _live.add(self)
        argv = [nats_server_binary(), "-c", str(node.config_path)]
        with node.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} start #{node.starts + 1}: {' '.join(argv)}\n".encode())
            log.flush()
            node.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        node.starts += 1

    def _wait_healthy(self, node: ClusterNode, deadline: float) -> None:
        last = "no answer"
        while time.monotonic() < deadline:
            if not node.running:
                raise NatsClusterError(f"{node.name} exited during startup:\n{node.log_tail()}")
            code, body = self.healthz(node.index)
            if code == 200:
                return
            last = f"{code} {body[:200]}"
            time.sleep(0.1)
        raise NatsClusterError(f"{node.name} not healthy in time (last /healthz: {last}):\n{node.log_tail()}")

    def _reap(self, node: ClusterNode) -> None:
        if node.proc is not None:
            try:
                node.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait(timeout=5)
        deadline = time.monotonic() + 5.0
        while _port_accepts(node.client_port) or _port_accepts(node.http_port):
            if time.monotonic() > deadline:
                raise NatsClusterError(f"{node.name}: ports still open after the process exited")
            time.sleep(0.05)


@atexit.register
def _close_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for cluster in leftovers:
        with contextlib.suppress(Exception):
            cluster.close()
