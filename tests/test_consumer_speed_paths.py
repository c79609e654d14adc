"""The consumer's fast paths keep every guarantee: pipelined pull requests, big batches, one commit per agent.

An in-process replicator (the real service wiring) against a real nats-server: records of many agents, one
row each, pre-loaded in the stream, then drained; the central copies hold each row once, the watermarks are
right, and every message is acked only after its commit (the ack floor is the stream's end). The durable pull
consumer of an older deployment keeps its position, a pull request that expired is renewed, and a consumer
deleted under the replicator is made again without applying anything twice.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_client import STREAM_NAME, changes_subject, consumer_config, ensure_stream
from replicator import consumer as consumer_module
from replicator.service import ReplicatorService
from replicator.settings import Settings
from tests.support.htpc import forged_record
from tests.support.nats_server import NatsServer

LAYOUT = {
    "1": {
        "table": "events",
        "columns": ["id", "body"],
        "pk": ["id"],
        "types": ["INTEGER", "TEXT"],
        "sql": "CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT)",
    }
}
EPOCH = "0123456789abcdef"


def record(agent: str, seq: int) -> bytes:
    """Change `seq` of `agent`: the table's schema first, then one row per record (id = seq)."""
    change = (1, "S", 1, []) if seq == 1 else (seq, "U", 1, [seq, f"{agent}-{seq}"])
    return forged_record(agent, seq, [change], LAYOUT, epoch=EPOCH)


async def publish(js: JetStreamContext, agent: str, seqs: range) -> None:
    for seq in seqs:
        await js.publish(changes_subject(agent), record(agent, seq), headers={"Nats-Msg-Id": f"{agent}:{EPOCH}:{seq}"})


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def rows(data_dir: Path, agent: str) -> list[tuple[int, str]]:
    with sqlite3.connect(data_dir / "agents" / f"{agent}.db") as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute("SELECT id, body FROM events ORDER BY id")]


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc: NATS = await nats.connect(nats_server.url)
    context = nc.jetstream()
    await ensure_stream(context)
    yield context
    await nc.close()


def service(tmp_path: Path, nats_server: NatsServer) -> ReplicatorService:
    return ReplicatorService(Settings(data_dir=tmp_path / "htpc", nats_url=nats_server.url, snapshot_interval_s=0))


async def test_a_preloaded_stream_of_many_agents_is_applied_once_and_acked_after_commit(
    tmp_path: Path, nats_server: NatsServer, js: JetStreamContext
) -> None:
    agents = [f"agent-{i}" for i in range(40)]
    per_agent = 60
    for seq_block in range(0, per_agent, 20):  # interleaved, as many agents publish at once
        for agent in agents:
            await publish(js, agent, range(seq_block + 1, seq_block + 21))
    total = len(agents) * per_agent
    svc = service(tmp_path, nats_server)
    await svc.start()
    try:
        consumer = svc.consumer
        assert consumer is not None
        await wait_for(lambda: consumer.stats.messages >= total, "every record handled")
        await wait_for(
            lambda: all(consumer.applied(a) == (EPOCH, per_agent) for a in agents), "every agent at its watermark"
        )
        stream_last = (await js.stream_info(STREAM_NAME)).state.last_seq
        floor = await consumer.ack_floor()
        for _ in range(200):
            if floor == stream_last:
                break
            await asyncio.sleep(0.05)
            floor = await consumer.ack_floor()
        assert floor == stream_last
        assert consumer.stats.applied == total
        assert consumer.stats.duplicates == 0 and consumer.stats.dead_letters == 0
        assert consumer.stats.batches < total  # applied in batches, not one by one
    finally:
        await svc.stop()
    for agent in agents:
        assert rows(tmp_path / "htpc", agent) == [(s, f"{agent}-{s}") for s in range(2, per_agent + 1)]


async def test_an_older_durable_pull_consumer_keeps_its_position(
    tmp_path: Path, nats_server: NatsServer, js: JetStreamContext
) -> None:
    # A deployment before this version: the same durable pull consumer, part of the stream acked by it.
    await publish(js, "old-agent", range(1, 31))
    first = service(tmp_path, nats_server)
    await first.start()
    assert first.consumer is not None
    await wait_for(lambda: first.consumer is not None and first.consumer.applied("old-agent")[1] == 30, "first part")
    await first.stop()
    info = await js.consumer_info(STREAM_NAME, "replicator")
    assert info.config.deliver_subject is None  # still a pull consumer
    assert info.config.max_ack_pending == consumer_config("replicator").max_ack_pending

    await publish(js, "old-agent", range(31, 61))
    second = service(tmp_path, nats_server)
    await second.start()
    try:
        consumer = second.consumer
        assert consumer is not None
        await wait_for(lambda: consumer.applied("old-agent") == (EPOCH, 60), "the rest applied")
        await wait_for(lambda: consumer.stats.messages >= 30, "the rest handled")
        assert consumer.stats.applied == 30  # only what was pending: nothing acked before came again
        assert consumer.stats.duplicates == 0
    finally:
        await second.stop()
    assert rows(tmp_path / "htpc", "old-agent") == [(s, f"old-agent-{s}") for s in range(2, 61)]


async def test_expired_pull_requests_are_renewed(
    tmp_path: Path, nats_server: NatsServer, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer_module, "PULL_EXPIRES_S", 0.2)  # several expire while it waits below
    svc = service(tmp_path, nats_server)
    await svc.start()
    try:
        consumer = svc.consumer
        assert consumer is not None
        await publish(js, "late-agent", range(1, 3))
        await wait_for(lambda: consumer.applied("late-agent")[1] == 2, "the first records")
        await asyncio.sleep(1.5)  # idle: every request outstanding expires (and must be renewed)
        await publish(js, "late-agent", range(3, 6))
        await wait_for(lambda: consumer.applied("late-agent")[1] == 5, "records after the requests expired", 20)
        assert consumer.stats.fetch_stalls == 0
    finally:
        await svc.stop()


async def test_a_consumer_deleted_under_the_replicator_is_made_again_and_nothing_doubles(
    tmp_path: Path, nats_server: NatsServer, js: JetStreamContext
) -> None:
    svc = service(tmp_path, nats_server)
    await svc.start()
    try:
        consumer = svc.consumer
        assert consumer is not None
        await publish(js, "kept-agent", range(1, 11))
        await wait_for(lambda: consumer.applied("kept-agent")[1] == 10, "the first records")
        await js.delete_consumer(STREAM_NAME, "replicator")
        await publish(js, "kept-agent", range(11, 21))
        await wait_for(lambda: consumer.applied("kept-agent")[1] == 20, "records after the consumer was deleted")
        await wait_for(lambda: consumer.stats.duplicates >= 10, "the replayed stream recognised as applied")
        info: Any = await js.consumer_info(STREAM_NAME, "replicator")
        assert info.config.durable_name == "replicator"
    finally:
        await svc.stop()
    assert rows(tmp_path / "htpc", "kept-agent") == [(s, f"kept-agent-{s}") for s in range(2, 21)]
