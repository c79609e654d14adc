"""The stream watch against a real nats-server: what it reads of the stream, the durable consumer and each
agent's newest message, and that its work per cycle stays bounded with many agents."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import orjson
import pytest
from nats.js import JetStreamContext

from agent_client import STREAM_NAME, changes_subject, consumer_config, ensure_stream
from replicator.store_view import StoreView
from replicator.stream_watch import AgentReport, PublishedPosition, StreamWatch
from tests.support.nats_server import NatsServer

AGENTS = [f"sw-{i:03d}" for i in range(100)]


def _change(agent: str, first: int, last: int, epoch: str = "00aa11bb") -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "kind": "changes",
            "agent_id": agent,
            "epoch": epoch,
            "first_seq": first,
            "last_seq": last,
            "final": True,
            "committed_at": time.time(),
            "layouts": {},
            "changes": [[s, "D", 0, [s]] for s in range(first, last + 1)],
        }
    )


def _status(agent: str, last: int, acked: int, blocked: str | None) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "kind": "status",
            "agent_id": agent,
            "epoch": "00aa11bb",
            "last_seq": last,
            "acked_seq": acked,
            "blocked": blocked,
            "log_bytes": 4096,
            "at": time.time(),
        }
    )


@pytest.fixture
async def js(nats_server: NatsServer) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(nats_server.url)
    try:
        context = nc.jetstream()
        await ensure_stream(context)
        yield context
    finally:
        await nc.close()


def _watch(js: JetStreamContext, **kw: Any) -> StreamWatch:
    return StreamWatch(lambda: js, "replicator", lambda: [], view=StoreView, **kw)


async def test_reads_stream_consumer_and_agents_in_bounded_cycles(js: JetStreamContext) -> None:
    for n, agent in enumerate(AGENTS):
        await js.publish(changes_subject(agent), _change(agent, 1, n + 1))
    watch = _watch(js, max_reads=32)

    facts = await watch.refresh()
    assert facts.error is None and facts.updated_at is not None
    assert (facts.messages, facts.first_seq, facts.last_seq) == (100, 1, 100) and facts.bytes > 0
    assert facts.consumer_exists is False and facts.consumer_pending is None  # no durable consumer yet
    assert len(facts.published) == 32  # at most max_reads agents per cycle
    for _cycle in range(3):
        facts = await watch.refresh()
    assert len(facts.published) == 100
    assert facts.published["sw-041"] == PublishedPosition("00aa11bb", 42, 42, facts.published["sw-041"].at, first_seq=1)
    # Everyone read: behind each of them (the view is empty: nothing applied centrally), lag = all they published.
    assert facts.progress["sw-041"].lag == 42 and facts.progress["sw-041"].behind_since is not None

    # The durable consumer: pending and ack floor, as JetStream counts them.
    await js.add_consumer(STREAM_NAME, config=consumer_config("replicator"))
    facts = await watch.refresh()
    assert facts.consumer_exists is True and facts.consumer_pending == 100 and facts.consumer_ack_pending == 0
    assert facts.ack_floor == 0 and facts.ack_floor_since is not None and facts.consumer_unfinished == 100

    # What changed since it was read goes first: a new record, a status record, junk on the subject.
    await js.publish(changes_subject("sw-007"), _change("sw-007", 9, 12))
    await js.publish(changes_subject("sw-008"), _status("sw-008", 20, 9, "row 10: cannot encode"))
    await js.publish(changes_subject("sw-009"), b'{"stream": "AGENT_CHANGES", "seq": 1}')
    facts = await watch.refresh()
    assert facts.published["sw-007"].last_seq == 12 and facts.published["sw-007"].stream_seq == 101
    assert facts.published["sw-008"].last_seq == 9  # the change record before the status is kept
    report = facts.reports["sw-008"]
    assert isinstance(report, AgentReport)
    assert (report.last_seq, report.acked_seq, report.blocked) == (20, 9, "row 10: cannot encode")
    assert facts.published["sw-009"].last_seq == 10  # junk skipped, the previous position kept
    assert facts.progress["sw-008"].lag == 20  # what the agent says it committed counts


async def test_bytes_read_per_cycle_are_bounded(js: JetStreamContext) -> None:
    for agent in AGENTS[:40]:
        await js.publish(changes_subject(agent), _change(agent, 1, 1))
    watch = _watch(js, max_reads=32, max_read_bytes=1)
    facts = await watch.refresh()
    assert len(facts.published) == 8  # one concurrent chunk, then the byte budget is spent
    for _cycle in range(4):
        facts = await watch.refresh()
    assert len(facts.published) == 40  # ... and everyone is read over a few cycles
