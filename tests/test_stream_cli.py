"""`replicator stream info|create|set-replicas`: the runbook's stream operations without the `nats` tool.

The real `replicator` command runs as a subprocess against real nats-servers: a single server for info,
create and the errors (no stream, NATS unreachable, replicas a single server cannot have), the 3-node
cluster of deploy/nats/cluster/ for set-replicas 1 -> 3 -> 1. What the command says is checked against
what JetStream itself reports through nats-py (replicas, peers, message counts), and against each node's
own replica (/jsz) after the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from agent_client import STREAM_NAME, STREAM_SUBJECTS, changes_subject, ensure_stream
from tests.support.htpc import HtpcProcess, run_cli
from tests.support.nats_cluster import NatsCluster
from tests.support.nats_server import NatsServer, free_port

NODE_NAMES = {"nats-1", "nats-2", "nats-3"}


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(servers=url.split(","), connect_timeout=2, name="test-stream-cli")
    try:
        yield nc.jetstream(timeout=10)
    finally:
        await nc.close()


async def info_of(url: str) -> StreamInfo:
    async with jetstream(url) as js:
        return await js.stream_info(STREAM_NAME)


async def publish(url: str, count: int, agent: str = "a1") -> None:
    async with jetstream(url) as js:
        for i in range(count):
            await js.publish(changes_subject(agent), f"message {i}".encode())


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.to_thread(run_cli, "stream", *args, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_named_error(rc: int, stderr: str, *words: str) -> None:
    assert rc == 1, stderr
    assert stderr.startswith("replicator: "), stderr
    assert "Traceback" not in stderr, stderr
    for word in words:
        assert word in stderr, stderr


def as_json(stdout: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(stdout)
    return body


# ------------------------------------------------------------------------------------------ one server
async def test_info_without_stream_is_a_named_error(nats_server: NatsServer) -> None:
    rc, out, err = await cli("info", "--nats-url", nats_server.url)
    assert_named_error(rc, err, "no stream AGENT_CHANGES", "replicator stream create")
    assert out == ""


async def test_unreachable_nats_is_a_named_error(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()},nats://127.0.0.1:{free_port()}"
    for command in (["info"], ["create"], ["set-replicas", "3"]):
        rc, out, err = await cli(*command, "--nats-url", url, "--timeout", "1", "--data-dir", str(tmp_path))
        assert_named_error(rc, err, "cannot connect to NATS", url)
        assert out == ""


async def test_no_url_and_no_embedded_server_is_a_named_error(tmp_path: Path) -> None:
    rc, _out, err = await cli("info", "--data-dir", str(tmp_path / "empty"))
    assert_named_error(rc, err, "--nats-url")


async def test_bad_replica_counts_are_usage_errors(nats_server: NatsServer) -> None:
    for bad in ("0", "6", "three"):
        rc, _out, err = await cli("set-replicas", bad, "--nats-url", nats_server.url)
        assert rc == 2, err
        assert "replicas" in err and "Traceback" not in err, err


async def test_create_as_serve_would_then_info(nats_server: NatsServer) -> None:
    rc, out, err = await cli("create", "--nats-url", nats_server.url)
    assert rc == 0, err
    assert out.startswith("created stream AGENT_CHANGES with 1 replica(s)"), out
    info = await info_of(nats_server.url)
    assert info.config.subjects == STREAM_SUBJECTS
    assert info.config.num_replicas == 1
    assert info.config.max_age == 7 * 86_400  # serve's default retention (--stream-max-age 7d)
    assert info.config.max_msg_size == 8 * 1024 * 1024  # serve's --max-record-bytes

    await publish(nats_server.url, 25)
    rc, out, err = await cli("info", "--nats-url", nats_server.url, "--json")
    assert rc == 0, err
    report = as_json(out)
    assert report["name"] == STREAM_NAME
    assert report["subjects"] == STREAM_SUBJECTS
    assert (report["replicas"], report["storage"], report["retention"], report["discard"]) == (
        1,
        "file",
        "limits",
        "old",
    )
    assert (report["messages"], report["first_seq"], report["last_seq"]) == (25, 1, 25)
    assert report["bytes"] == (await info_of(nats_server.url)).state.bytes > 0
    assert report["duplicate_window_s"] == 120.0
    assert (report["max_bytes"], report["max_msgs"], report["max_age_s"]) == (-1, -1, 7 * 86_400.0)
    assert report["cluster"] is None and report["leader"]

    rc, out, err = await cli("info", "--nats-url", nats_server.url)
    assert rc == 0, err
    table = dict(line.split(None, 1) for line in out.splitlines() if line.startswith(("replicas", "messages")))
    assert table == {"replicas": "1", "messages": "25"}
    assert "agents.*.changes, agents.*.relay" in out

    # Again: nothing to do, nothing lost.
    rc, out, err = await cli("create", "--nats-url", nats_server.url, "--json")
    assert rc == 0, err
    again = as_json(out)
    assert (again["created"], again["changes"], again["stream"]["messages"]) == (False, [], 25)


async def test_create_fixes_a_stream_an_agent_made(nats_server: NatsServer) -> None:
    """An agent's stream (no retention bound, no message size bound) gets serve's settings, data kept."""
    async with jetstream(nats_server.url) as js:
        await ensure_stream(js)
    await publish(nats_server.url, 10)
    rc, out, err = await cli("create", "--nats-url", nats_server.url, "--json", "--stream-max-age", "2d")
    assert rc == 0, err
    body = as_json(out)
    assert body["created"] is False
    assert any(c.startswith("max age 0s -> 172800s") for c in body["changes"]), body["changes"]
    info = await info_of(nats_server.url)
    assert (info.config.max_age, info.state.messages) == (2 * 86_400, 10)


async def test_set_replicas_3_on_one_server_is_refused_and_changes_nothing(nats_server: NatsServer) -> None:
    rc, _out, err = await cli("create", "--nats-url", nats_server.url)
    assert rc == 0, err
    await publish(nats_server.url, 7)
    before = await info_of(nats_server.url)
    rc, out, err = await cli("set-replicas", "3", "--nats-url", nats_server.url)
    assert_named_error(rc, err, "keeps 1 replica", "not clustered")
    assert out == ""
    after = await info_of(nats_server.url)
    assert after.config.num_replicas == 1
    assert (after.state.messages, after.state.last_seq) == (before.state.messages, before.state.last_seq) == (7, 7)


async def test_create_with_3_replicas_on_one_server_is_refused(nats_server: NatsServer) -> None:
    rc, _out, err = await cli("create", "--replicas", "3", "--nats-url", nats_server.url)
    assert_named_error(rc, err, "could not be created")
    async with jetstream(nats_server.url) as js:
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(STREAM_NAME)


async def test_embedded_server_of_a_data_dir_with_its_credentials(
    htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    """Without --nats-url: the embedded server of a running `serve --auth on`, with the data dir's own key."""
    port = free_port()
    htpc = htpc_factory(None, nats_port=port, extra_args=["--auth", "on"])
    await asyncio.to_thread(htpc.start)
    rc, out, err = await cli("info", "--data-dir", str(htpc.data_dir), "--json")
    assert rc == 0, err
    report = as_json(out)
    assert (report["replicas"], report["subjects"], report["consumers"]) == (1, STREAM_SUBJECTS, 1)

    # The same server without the replicator's key: refused, a named error.
    url = f"nats://127.0.0.1:{port}"
    rc, out, err = await cli("info", "--nats-url", url, "--data-dir", str(tmp_path / "other"), "--timeout", "2")
    assert_named_error(rc, err, "cannot connect to NATS", "credentials")


# ------------------------------------------------------------------------------------------ cluster


async def node_states(
    cluster: NatsCluster, want: tuple[int, int], wait_s: float = 20.0
) -> list[tuple[int, int] | None]:
    """(messages, last_seq) of each node's own replica (/jsz), once all are `want` or wait_s has passed."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        states: list[tuple[int, int] | None] = []
        for i in range(len(cluster.nodes)):
            state = await asyncio.to_thread(cluster.stream_state, i, STREAM_NAME)
            states.append(None if state is None else (int(state["messages"]), int(state["last_seq"])))
        if all(s == want for s in states) or asyncio.get_running_loop().time() > deadline:
            return states
        await asyncio.sleep(0.1)


def peers(info: StreamInfo) -> set[str]:
    assert info.cluster is not None
    return {n for n in (info.cluster.leader, *(r.name for r in info.cluster.replicas or [])) if n}


async def test_set_replicas_1_to_3_and_back_keeps_the_data(cluster: NatsCluster) -> None:
    rc, out, err = await cli("create", "--nats-url", cluster.url)
    assert rc == 0, err
    info = await info_of(cluster.url)
    assert info.config.num_replicas == 1 and len(peers(info)) == 1
    await publish(cluster.url, 60)
    await publish(cluster.url, 40, agent="a2")

    rc, out, err = await cli("set-replicas", "3", "--nats-url", cluster.url, "--json")
    assert rc == 0, err
    body = as_json(out)
    assert (body["replicas_before"], body["replicas_current"]) == (1, True), body
    assert body["stream"]["replicas"] == 3 and body["stream"]["messages"] == 100
    assert {p["name"] for p in body["stream"]["peers"]} == NODE_NAMES
    assert all(p["current"] for p in body["stream"]["peers"])

    info = await info_of(cluster.url)  # JetStream's own word, not the command's
    assert info.config.num_replicas == 3
    assert peers(info) == NODE_NAMES
    assert (info.state.messages, info.state.first_seq, info.state.last_seq) == (100, 1, 100)
    # Every node holds the whole stream (a follower reported current may still be applying the last entries).
    states = await node_states(cluster, want=(100, 100))
    assert states == [(100, 100)] * 3, states

    # More replicas than servers: refused, the stream stays at 3 with its data.
    rc, out, err = await cli("set-replicas", "5", "--nats-url", cluster.url)
    assert_named_error(rc, err, "keeps 3 replica", "fewer than 5")
    info = await info_of(cluster.url)
    assert (info.config.num_replicas, info.state.messages) == (3, 100)

    # The table a human reads.
    rc, out, err = await cli("info", "--nats-url", cluster.url)
    assert rc == 0, err
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in NODE_NAMES]
    assert {r[0] for r in rows} == NODE_NAMES
    assert sorted(r[1] for r in rows) == ["leader", "replica", "replica"]
    assert "cluster           commander" in out

    # And down again: one replica, same data.
    rc, out, err = await cli("set-replicas", "1", "--nats-url", cluster.url, "--json")
    assert rc == 0, err
    body = as_json(out)
    assert (body["replicas_before"], body["replicas_current"], len(body["stream"]["peers"])) == (3, True, 1)
    info = await info_of(cluster.url)
    assert (info.config.num_replicas, len(peers(info)), info.state.messages) == (1, 1, 100)


async def test_create_with_3_replicas_on_the_cluster(cluster: NatsCluster) -> None:
    rc, out, err = await cli("create", "--replicas", "3", "--nats-url", cluster.url)
    assert rc == 0, err
    assert out.startswith("created stream AGENT_CHANGES with 3 replica(s)"), out
    info = await info_of(cluster.url)
    assert info.config.num_replicas == 3 and peers(info) == NODE_NAMES
    # set-replicas to what it has: nothing to do.
    rc, out, err = await cli("set-replicas", "3", "--nats-url", cluster.url)
    assert rc == 0, err
    assert out.startswith("stream AGENT_CHANGES already has 3 replica(s)"), out


async def test_serve_connect_gives_up_at_its_deadline_on_an_unreachable_server() -> None:
    """nats-py's first connect retries for ever with unlimited reconnects: connect_nats must still end at its
    deadline with NatsUnavailable (so `serve --nats-url <dead>` exits with a named error instead of hanging)."""
    from replicator.errors import NatsUnavailable
    from replicator.service import connect_nats

    url = f"nats://127.0.0.1:{free_port()}"
    with pytest.raises(NatsUnavailable, match="cannot connect to NATS"):
        await asyncio.wait_for(connect_nats(url, name="test-deadline", connect_timeout_s=1.0), timeout=60)


async def test_serve_asking_3_replicas_of_a_single_server_is_a_named_error(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """JetStream refuses R3 on a server that is not clustered: serve exits 1 naming it, no traceback, no stream."""
    proc = await asyncio.to_thread(
        run_cli,
        "serve",
        "--data-dir",
        str(tmp_path / "htpc"),
        "--port",
        str(free_port()),
        "--nats-url",
        nats_server.url,
        "--stream-replicas",
        "3",
        timeout=120,
    )
    assert_named_error(proc.returncode, proc.stderr, "could not be created with 3 replica")
    async with jetstream(nats_server.url) as js:
        with pytest.raises(nats.js.errors.NotFoundError):
            await js.stream_info(STREAM_NAME)
