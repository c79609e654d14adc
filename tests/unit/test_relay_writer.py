"""The relay writer: what it refuses before publishing, what it encodes, and how it publishes (real nats-server).

Also the HTPC's relay message id secret in the data directory (DataDir.relay_id_secret).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

import nats
import pytest

from agent_client import STREAM_NAME, RelayRecord, RelayRow, decode_record, ensure_stream, relay_msg_id
from replicator.auth import Principal
from replicator.data_dir import DataDir, SecretFileInvalid
from replicator.errors import (
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    PayloadTooLarge,
    TableOwnedByAgent,
)
from replicator.relay_row import MAX_COLUMNS, TooManyColumns
from replicator.relay_writer import (
    BUILT_IN_DEFAULT_AGENT,
    MissingPrimaryKey,
    Planned,
    RecordTooLarge,
    RelayWriter,
    attribute,
)
from replicator.store_view import AgentView, StoreView, TableView
from tests.support.nats_server import NatsServer

SECRET = bytes(range(32))


def _view(tables: dict[str, str], columns: tuple[str, ...] = ("id",)) -> StoreView:
    """An agent `owner` whose tables come from the given sources ("agent" or "relay"); `id` is their key if given."""
    pk = ("id",) if "id" in columns else ()
    metas = {n: TableView(n, src, "always", columns, ("",) * len(columns), pk, None) for n, src in tables.items()}
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
    payload = _offline().encode("a", [RelayRow(table="t", data={"id": 1, "tags": ["x"]})], 12.5)
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
        writer = RelayWriter(lambda: None, lambda: (nc, js), secret=lambda: SECRET)
        payload = writer.encode("a", [RelayRow(table="t", data={"id": 1})])
        first = await writer.publish("a", payload, "k1")
        again = await writer.publish("a", payload, "k1")
        other = await writer.publish("a", payload, "k2")
        assert (first["duplicate"], again["duplicate"], other["duplicate"]) == (False, True, False)
        assert again["stream_seq"] == first["stream_seq"] and other["stream_seq"] == first["stream_seq"] + 1
        assert writer.published == 3
        msg = await js.get_msg(first["stream"], first["stream_seq"])
        assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == relay_msg_id("a", "k1", secret=SECRET)
        assert msg.subject == "agents.a.relay"
    finally:
        await nc.close()


# --------------------------------------------------------------------------- item 10: refused before the 202


def test_check_refuses_more_columns_than_sqlite_allows() -> None:
    row = {f"c{i}": i for i in range(MAX_COLUMNS)}
    _offline().check("a", "wide", row)  # 2,000: accepted
    row["one_more"] = 1
    with pytest.raises(TooManyColumns) as info:
        _offline().check("a", "wide", row)
    assert (info.value.status, info.value.code) == (400, "too_many_columns")


def test_check_counts_the_columns_a_relay_table_already_has() -> None:
    view = _view({"inbox": "relay"}, columns=tuple(f"c{i}" for i in range(MAX_COLUMNS - 1)))
    writer = _offline(view)
    writer.check("owner", "inbox", {"c0": 1, "c1": 2, "new": 3})  # 1,999 + 1 new
    with pytest.raises(InvalidName, match="'C1' of 'inbox' is named 'c1'"):
        writer.check("owner", "inbox", {"C1": 2})
    with pytest.raises(InvalidName, match="table 'INBOX' of owner is named 'inbox'"):
        writer.check("owner", "INBOX", {"c1": 2})
    with pytest.raises(TooManyColumns, match=r"inbox would have 2001 columns \(1999 now, 2 new\)"):
        writer.check("owner", "inbox", {"new": 1, "newer": 2})


def test_check_finds_an_agent_table_under_any_case() -> None:
    """SQLite resolves `NOTES` to `notes`: a relay row may not reach an agent's table through another case."""
    writer = _offline(_view({"notes": "agent"}))
    for name in ("notes", "NOTES", "Notes"):
        with pytest.raises(TableOwnedByAgent):
            writer.check("owner", name, {"id": 1})


def test_check_refuses_columns_differing_only_in_case() -> None:
    with pytest.raises(InvalidName, match="are one column"):
        _offline().check("a", "t", {"id": 1, "Id": 2})


def test_encode_refuses_a_record_larger_than_max_record_bytes() -> None:
    writer = RelayWriter(lambda: None, lambda: (None, None), max_record_bytes=64 * 1024)
    fits = writer.encode("a", [RelayRow(table="t", data={"id": 1, "v": "x" * 60_000})])
    assert len(fits) <= 64 * 1024 - 256
    with pytest.raises(RecordTooLarge, match=r"at most 65280 bytes \(--max-record-bytes 65536, less 256") as info:
        writer.encode("a", [RelayRow(table="t", data={"id": 1, "v": "x" * 70_000})])
    assert isinstance(info.value, PayloadTooLarge)
    assert (info.value.status, info.value.code) == (413, "record_too_large")
    # many small rows add up the same way
    with pytest.raises(RecordTooLarge):
        writer.encode("a", [RelayRow(table="t", data={"id": i, "v": "x" * 100}) for i in range(1000)])


async def test_a_stream_message_size_refusal_is_a_413_not_a_retry(nats_server: NatsServer) -> None:
    """The stream's max_msg_size refuses the publish: retrying cannot help, so no 503."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        config = (await js.stream_info(STREAM_NAME)).config
        config.max_msg_size = 4096
        await js.update_stream(config)
        writer = RelayWriter(lambda: None, lambda: (nc, js), secret=lambda: SECRET)  # no bound of its own
        payload = writer.encode("a", [RelayRow(table="t", data={"id": 1, "v": "x" * 8000})])
        with pytest.raises(RecordTooLarge, match="JetStream refused the record"):
            await writer.publish("a", payload, "k")
        small = writer.encode("a", [RelayRow(table="t", data={"id": 1})])
        assert (await writer.publish("a", small, "k"))["duplicate"] is False  # the refused one took no id
    finally:
        await nc.close()


# --------------------------------------------------------------------------- item 1: keyed relay ids


async def test_relay_ids_cannot_be_squatted_by_the_old_form(nats_server: NatsServer) -> None:
    """An id published first in the old, guessable form (`relay:<agent>:<key>`) does not make the write a duplicate."""
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await ensure_stream(js)
        squat = await js.publish("agents.a.changes", b"{}", headers={"Nats-Msg-Id": "relay:a:k1"})
        assert squat.duplicate is not True
        writer = RelayWriter(lambda: None, lambda: (nc, js), secret=lambda: SECRET)
        payload = writer.encode("a", [RelayRow(table="t", data={"id": 1})])
        first = await writer.publish("a", payload, "k1")
        assert first["duplicate"] is False and first["stream_seq"] == squat.seq + 1
        assert (await writer.publish("a", payload, "k1"))["duplicate"] is True
        # a writer with another secret (another HTPC) makes other ids for the same key
        other = RelayWriter(lambda: None, lambda: (nc, js), secret=lambda: bytes(32))
        assert other.msg_id("a", "k1") != writer.msg_id("a", "k1")
    finally:
        await nc.close()


def test_without_a_secret_source_the_writer_keys_ids_with_its_own() -> None:
    a, b = _offline(), _offline()
    assert a.msg_id("x", "k") == a.msg_id("x", "k") != b.msg_id("x", "k")
    assert a.msg_id("x", "k").startswith("relay:x:")


def test_the_relay_id_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    assert data.relay_id_key == tmp_path / "data" / "relay-id.key"
    assert not data.relay_id_key.exists()
    secret = data.relay_id_secret()
    assert len(secret) == 32 and secret != bytes(32)
    assert stat.S_IMODE(data.relay_id_key.stat().st_mode) == 0o600
    assert DataDir(tmp_path / "data").relay_id_secret() == secret  # a restart reads the same one
    assert data.relay_id_key not in data.central_files()  # a rebuild keeps it
    writer = RelayWriter(lambda: None, lambda: (None, None), secret=data.relay_id_secret)
    assert writer.msg_id("a", "k") == relay_msg_id("a", "k", secret=secret)


def test_processes_making_the_secret_at_once_agree_on_one(tmp_path: Path) -> None:
    data = DataDir(tmp_path / "data")
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def make() -> None:
        barrier.wait()
        results.append(data.relay_id_secret())

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 8 and len(set(results)) == 1
    assert sorted(p.name for p in data.root.iterdir()) == ["relay-id.key"]  # no temporary file left


def test_a_secret_file_that_holds_no_secret_is_a_named_error(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    data.relay_id_key.write_bytes(b"short")
    with pytest.raises(SecretFileInvalid, match="holds 5 bytes"):
        data.relay_id_secret()
    data.relay_id_key.write_bytes(os.urandom(32))
    data.relay_id_key.chmod(0o644)
    data.relay_id_secret()
    assert stat.S_IMODE(data.relay_id_key.stat().st_mode) == 0o600  # made private again


# --------------------------------------------------------------------------- issue 10: primary keys, attribution


def test_a_row_without_its_relay_tables_primary_key_is_refused() -> None:
    writer = _offline(_view({"inbox": "relay"}, columns=("id", "v")))  # the first row had `id`: it is the key
    writer.check("owner", "inbox", {"id": 1, "v": "x"})
    with pytest.raises(MissingPrimaryKey, match=r"owner\.inbox lacks its primary key \['id'\]") as info:
        writer.check("owner", "inbox", {"v": "no key"})
    assert (info.value.status, info.value.code) == (400, "missing_primary_key")
    writer.check("owner", "fresh", {"v": "no key"})  # a new table: whatever its first row has decides


def test_the_first_row_of_a_request_decides_the_key_for_the_rows_after_it() -> None:
    writer = _offline()
    planned: Planned = {}
    writer.check("a", "t", {"id": 1, "v": "x"}, planned)
    writer.check("a", "t", {"id": 2, "w": "new column"}, planned)
    assert planned["t"].columns == ("id", "v", "w") and planned["t"].pk == ("id",)
    with pytest.raises(MissingPrimaryKey):
        writer.check("a", "t", {"v": "y"}, planned)
    with pytest.raises(InvalidName, match="table 'T' of a is named 't'"):
        writer.check("a", "T", {"id": 3}, planned)
    keyless: Planned = {}
    writer.check("a", "log", {"event": "x"}, keyless)
    writer.check("a", "log", {"event": "y", "id": 7}, keyless)  # no key: an `id` later is just a column


def test_tables_a_published_write_creates_are_known_until_the_view_has_them() -> None:
    view: list[StoreView | None] = [None]
    writer = RelayWriter(lambda: view[0], lambda: (None, None))
    planned: Planned = {}
    writer.check("owner", "inbox", {"id": 1}, planned)
    writer.check("owner", "inbox", {"v": "unkeyed"})  # nothing published yet: nothing known
    writer.expect("owner", planned)
    with pytest.raises(MissingPrimaryKey):
        writer.check("owner", "inbox", {"v": "unkeyed"})  # published, not applied yet: still refused
    writer.check("other", "inbox", {"v": "unkeyed"})  # another agent's table of the same name
    view[0] = _view({"inbox": "relay"}, columns=("id",))
    with pytest.raises(MissingPrimaryKey):
        writer.check("owner", "inbox", {"v": "unkeyed"})  # now from the view
    assert writer._pending == {}


@pytest.mark.parametrize(
    ("header", "who", "configured", "expected"),
    [
        ("from-header", Principal("agent", "tok-agent"), "conf", ("from-header", "X-Agent-Id header")),
        (None, Principal("agent", "tok-agent"), "conf", ("tok-agent", "token")),
        (None, Principal("operator", "ops"), "conf", ("conf", "--default-agent-id")),
        (None, None, "conf", ("conf", "--default-agent-id")),
        (None, None, None, (BUILT_IN_DEFAULT_AGENT, "built-in default")),
    ],
)
def test_rows_that_name_no_agent_are_attributed_never_dropped(
    header: str | None, who: Principal | None, configured: str | None, expected: tuple[str, str]
) -> None:
    found = attribute(header, who, configured)
    assert (found.agent_id, found.by) == expected


def test_an_invalid_x_agent_id_is_a_named_error() -> None:
    with pytest.raises(InvalidAgent, match="X-Agent-Id"):
        attribute("Not Valid", None, None)
