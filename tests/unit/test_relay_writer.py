"""The relay writer: what it refuses before publishing, what it encodes, and how it publishes (real nats-server)."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

import nats
import pytest

from agent_client import RelayRecord, RelayRow, decode_record, ensure_stream, relay_msg_id
from replicator.errors import InvalidAgent, InvalidName, InvalidValue, NatsUnavailable, TableOwnedByAgent
from replicator.relay_writer import RelayWriter
from replicator.store_view import AgentView, StoreView, TableView
from tests.support.nats_server import NatsServer


def _view(tables: dict[str, str]) -> StoreView:
    """An agent `owner` whose tables come from the given sources ("agent" or "relay")."""
    metas = {n: TableView(n, src, "always", ("id",), ("",), ("id",), None) for n, src in tables.items()}
    agent = AgentView(
        agent_id="owner",
        path=Path("/nonexistent/owner.db"),
        epoch="e1",
        watermark=1,
        head_seq=1,
        committed_at=None,
        applied_at=None,
        last_seen=None,
        records_applied=1,
        changes_applied=1,
        blocked=None,
        tables=MappingProxyType(metas),
    )
    return StoreView(MappingProxyType({"owner": agent}))


def _offline(view: StoreView | None = None) -> RelayWriter:
    return RelayWriter(lambda: view, lambda: (None, None))


@pytest.mark.parametrize(
    ("agent", "table", "data", "error"),
    [
        ("Bad Agent", "t", {"id": 1}, InvalidAgent),
        ("a", "1table", {"id": 1}, InvalidName),
        ("a", "_cr_state", {"id": 1}, InvalidName),
        ("a", "t", {"bad col": 1}, InvalidName),
        ("a", "t", {}, InvalidValue),
        ("a", "t", {"x": float("nan")}, InvalidValue),
        ("a", "t", {"x": 2**63}, InvalidValue),
        ("a", "t", {"x": "\ud800"}, InvalidValue),
    ],
)
def test_check_refuses_bad_rows_with_named_errors(agent: str, table: str, data: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        _offline().check(agent, table, data)


def test_check_refuses_tables_the_agent_replicates_but_not_relay_tables() -> None:
    writer = _offline(_view({"notes": "agent", "inbox": "relay"}))
    with pytest.raises(TableOwnedByAgent, match=r"owner\.notes"):
        writer.check("owner", "notes", {"id": 1})
    writer.check("owner", "inbox", {"id": 1})  # written over HTTP before: the relay may keep writing it
    writer.check("other", "notes", {"id": 1})  # another agent's table of the same name is not owned by it
    _offline(None).check("owner", "notes", {"id": 1})  # before the store is open nothing is known to be owned


def test_encode_is_a_relay_record_the_consumer_decodes() -> None:
    payload = RelayWriter.encode("a", [RelayRow(table="t", data={"id": 1, "tags": ["x"]})], 12.5)
    record = decode_record(payload)
    assert isinstance(record, RelayRecord)
    assert (record.agent_id, record.timestamp, record.rows[0].table, record.rows[0].data) == (
        "a",
        12.5,
        "t",
        {"id": 1, "tags": ["x"]},
    )


async def test_publish_without_nats_is_a_503_error() -> None:
    with pytest.raises(NatsUnavailable):
        await _offline().publish("a", b"{}", "key")


async def test_publish_stores_once_per_idempotency_key(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        writer = RelayWriter(lambda: None, lambda: (nc, js))
        payload = RelayWriter.encode("a", [RelayRow(table="t", data={"id": 1})])
        first = await writer.publish("a", payload, "k1")
        again = await writer.publish("a", payload, "k1")
        other = await writer.publish("a", payload, "k2")
        assert (first["duplicate"], again["duplicate"], other["duplicate"]) == (False, True, False)
        assert again["stream_seq"] == first["stream_seq"] and other["stream_seq"] == first["stream_seq"] + 1
        assert writer.published == 3
        msg = await js.get_msg(first["stream"], first["stream_seq"])
        assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == relay_msg_id("a", "k1")
        assert msg.subject == "agents.a.relay"
    finally:
        await nc.close()
