"""An HTPC of this version started on a stream and a durable consumer made by the previous one.

Before relay writes had their own subject, AGENT_CHANGES captured `agents.*.changes` only, had no bound on
a message, and the durable consumer filtered on that subject. `serve` brings both forward and keeps the
consumer's position: what was applied is not applied again, what was pending is applied, and relay writes
(now on `agents.<id>.relay`) reach the central store.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from agent_client import CHANGES_SUBJECTS, STREAM_NAME, STREAM_SUBJECTS, changes_subject
from tests.support.htpc import HtpcProcess, forged_record, poll
from tests.support.nats_server import NatsServer

LAYOUT = {
    "0": {
        "table": "kv",
        "columns": ["k", "v"],
        "pk": ["k"],
        "types": ["TEXT", "TEXT"],
        "sql": "CREATE TABLE kv (k TEXT PRIMARY KEY, v TEXT)",
    }
}


async def test_serve_brings_an_older_stream_and_consumer_forward(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM_NAME, subjects=[CHANGES_SUBJECTS]))
        await js.add_consumer(
            STREAM_NAME,
            ConsumerConfig(durable_name="replicator", ack_policy=AckPolicy.EXPLICIT, filter_subject=CHANGES_SUBJECTS),
        )
        await js.publish(
            changes_subject("old"), forged_record("old", 1, [(1, "S", 0, []), (2, "U", 0, ["a", "1"])], LAYOUT)
        )
        htpc = htpc_factory(nats_server.url)
        htpc.start()
        info = await js.stream_info(STREAM_NAME)
        assert set(STREAM_SUBJECTS) <= set(info.config.subjects or [])
        assert info.config.max_msg_size == 8 * 1024 * 1024
        consumer = await js.consumer_info(STREAM_NAME, "replicator")
        assert not consumer.config.filter_subject and not consumer.config.filter_subjects
        poll(lambda: htpc.agents().get("old", {}).get("watermark") == 2 or None, 30, "the older record applied")
        with httpx.Client(base_url=htpc.url, timeout=10) as client:
            resp = client.post("/relay/immediate", json={"agent_id": "web", "table": "notes", "data": {"id": 1}})
            assert resp.status_code == 202, resp.text
            rows = poll(
                lambda: (
                    client.post("/relay/query", json={"agent_id": "web", "query": "SELECT id FROM notes"})
                    .json()
                    .get("rows")
                ),
                30,
                "the relay write applied",
            )
        assert rows == [[1]]
        htpc.stop()
        htpc.start()  # and again: nothing is applied twice
        assert htpc.agents()["old"]["records_applied"] == 1
    finally:
        await nc.close()
