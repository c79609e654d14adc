"""Tests of the NATS harness itself: the replicator's crash tests rely on kill() really losing the process
and start() really finding the JetStream store again."""

from __future__ import annotations

import socket
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from tests.support.nats_server import (
    HOST,
    NatsServer,
    NatsServerError,
    free_port,
    nats_server_binary,
    resolve_backend,
    start_nats_server,
)

STREAM = "HARNESS"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _listen_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port``, from /proc (covers host-network containers too)."""
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, port_hex = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


async def _publish(url: str, subject: str, payload: bytes) -> int:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=["harness.>"]))
        ack = await js.publish(subject, payload, timeout=5)
        return int(ack.seq)
    finally:
        await nc.close()


async def _read(url: str, seq: int) -> tuple[bytes, int]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        msg = await js.get_msg(STREAM, seq)
        return bytes(msg.data or b""), int(info.state.messages)
    finally:
        await nc.close()


@pytest.mark.asyncio
async def test_kill_restart_keeps_jetstream_data(nats_server: NatsServer) -> None:
    server = nats_server
    assert server.is_running()
    assert server.url == f"nats://127.0.0.1:{server.port}"
    assert _listen_addresses(server.port) == {"0100007F"}, "must listen on 127.0.0.1 only"

    seq = await _publish(server.url, "harness.a", b"survives SIGKILL")

    server.kill()
    assert not server.is_running()
    assert not _accepts(server.port)

    server.start()
    assert server.is_running()
    assert await _read(server.url, seq) == (b"survives SIGKILL", 1)
    assert any(server.store_dir.rglob("*.blk")), "JetStream blocks must be in the host store dir"

    server.stop()
    assert not server.is_running()
    assert not _accepts(server.port)
    server.start()
    assert await _read(server.url, seq) == (b"survives SIGKILL", 1)

    server.close()
    assert not server.is_running()
    assert not _accepts(server.port)


@pytest.mark.asyncio
async def test_new_server_on_same_store_and_port(tmp_path: Path) -> None:
    store = tmp_path / "js"
    first = start_nats_server(store)
    try:
        seq = await _publish(first.url, "harness.b", b"handover")
    finally:
        first.close()
    second = start_nats_server(store, port=first.port)
    try:
        assert second.url == first.url
        assert await _read(second.url, seq) == (b"handover", 1)
    finally:
        second.close()


def test_docker_container_is_reused_and_removed(tmp_path: Path) -> None:
    server = start_nats_server(tmp_path / "js")
    try:
        if server.backend != "docker":
            pytest.skip("docker backend not in use")
        import docker
        import docker.errors

        client = docker.from_env()
        container_id = server._impl._container.get_wrapped_container().id  # type: ignore[attr-defined]
        server.kill()
        assert client.containers.get(container_id).status == "exited"
        server.start()
        assert client.containers.get(container_id).status == "running"
        server.close()
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(container_id)
    finally:
        server.close()


def test_start_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        server = NatsServer(tmp_path / "js", port=blocker.getsockname()[1])
        try:
            with pytest.raises(NatsServerError, match="already in use"):
                server.start()
        finally:
            server.close()


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATOR_TEST_NATS", "binary")
    assert resolve_backend() == "binary"
    monkeypatch.setenv("REPLICATOR_TEST_NATS", "auto")
    monkeypatch.setattr("tests.support.nats_server.docker_available", lambda: False)
    assert resolve_backend() == "binary"
    monkeypatch.setenv("REPLICATOR_TEST_NATS", "docker")
    with pytest.raises(NatsServerError, match="no Docker engine"):
        resolve_backend()
    monkeypatch.setenv("REPLICATOR_TEST_NATS", "podman")
    with pytest.raises(NatsServerError, match="must be auto, docker or binary"):
        resolve_backend()


def test_helpers() -> None:
    assert Path(nats_server_binary()).is_file()
    port = free_port()
    assert port != 4222
    assert not _accepts(port)
