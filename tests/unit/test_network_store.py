"""The network store (replicator/network_store.py) driven by real central copies (CentralStore, feed logs), and
the rewrite of agents past SQLite's attach limit (query_engine.rewrite_overflow)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from agent_client import ChangeRecord, RelayRecord, TableLayout
from replicator.central_store import AgentReplica, CentralStore
from replicator.data_dir import DataDir
from replicator.errors import ReplicatorError
from replicator.network_store import NetworkStore
from replicator.query_engine import rewrite_overflow
from tests.unit._central import change_record, relay_record, store_fixture

Op = Literal["U", "D", "S", "X", "V", "R"]
ITEMS = TableLayout(
    table="items",
    columns=["id", "name", "qty"],
    pk=["id"],
    types=["INTEGER", "TEXT", "INTEGER"],
    sql="CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)",
)


store = store_fixture


@pytest.fixture
def net(tmp_path: Path) -> Iterator[NetworkStore]:
    n = NetworkStore(DataDir(tmp_path).network_db)
    try:
        yield n
    finally:
        n.close()


def _commit(rep: AgentReplica, rec: ChangeRecord | RelayRecord) -> None:
    rep.begin()
    with rep.record_savepoint():
        if isinstance(rec, RelayRecord):
            rep.apply_relay(rec)
        else:
            rep.apply_changes(rec)
    rep.commit()


def relay(store: CentralStore, agent: str, table: str, *rows: dict[str, Any]) -> None:
    _commit(store.replica(agent), relay_record(agent, *((table, r) for r in rows)))
    store.publish_view()


def changes(store: CentralStore, agent: str, epoch: str, first: int, items: list[tuple[Op, list[Any]]]) -> None:
    rec = change_record(agent, first, [(op, 0, values) for op, values in items], {"0": ITEMS}, epoch=epoch)
    _commit(store.replica(agent), rec)
    store.publish_view()


def network_rows(net: NetworkStore, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{net.path}?mode=ro", uri=True)
    try:
        return sorted(tuple(r) for r in conn.execute(sql).fetchall())
    finally:
        conn.close()


async def test_union_of_relay_tables_with_missing_columns(store: CentralStore, net: NetworkStore) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"}, {"id": 2, "body": "a2"})
    relay(store, "b", "notes", {"id": 1, "body": "b1", "tag": "x"})
    relay(store, "c", "other", {"id": 1})
    await net.ensure(store.view, {"notes"}, 5)
    assert network_rows(net, "SELECT agent_id, id, body, tag FROM notes") == [
        ("a", 1, "a1", None),
        ("a", 2, "a2", None),
        ("b", 1, "b1", "x"),
    ]
    assert net.satisfied(store.view, "notes")
    # Updates (relay upserts), new rows and a new column, caught up from the feed (no refill).
    refills = net.refills
    relay(store, "a", "notes", {"id": 2, "body": "a2'"}, {"id": 3, "body": "a3", "extra": 7})
    assert not net.satisfied(store.view, "notes")
    await net.ensure(store.view, {"notes"}, 5)
    assert network_rows(net, "SELECT agent_id, id, body, tag, extra FROM notes") == [
        ("a", 1, "a1", None, None),
        ("a", 2, "a2'", None, None),
        ("a", 3, "a3", None, 7),
        ("b", 1, "b1", "x", None),
    ]
    assert net.refills == refills + 1  # a new column is a schema change: that agent's part is refilled
    relay(store, "a", "notes", {"id": 1, "body": "a1'"})
    await net.ensure(store.view, {"notes"}, 5)
    assert net.refills == refills + 1 and net.units_applied >= 1  # a plain update: from the feed
    assert network_rows(net, "SELECT body FROM notes WHERE agent_id = 'a' AND id = 1") == [("a1'",)]
    # A write to another table moves the agent's head: caught up without touching notes.
    relay(store, "b", "other", {"id": 5})
    await net.ensure(store.view, {"notes"}, 5)
    assert net.satisfied(store.view, "notes")
    assert await net.ensure(store.view, {"nothing", "notes"}, 5) == {"nothing"}  # no agent has it


async def test_agent_changes_deletes_and_new_epoch(store: CentralStore, net: NetworkStore) -> None:
    changes(store, "x", "e0000001", 1, [("S", []), ("U", [1, "one", 1]), ("U", [2, "two", 2]), ("U", [3, "three", 3])])
    relay(store, "y", "items", {"id": 9, "name": "relay nine"})
    await net.ensure(store.view, {"items"}, 5)
    assert network_rows(net, "SELECT agent_id, id, name, qty FROM items") == [
        ("x", 1, "one", 1),
        ("x", 2, "two", 2),
        ("x", 3, "three", 3),
        ("y", 9, "relay nine", None),
    ]
    changes(store, "x", "e0000001", 5, [("D", [2]), ("U", [1, "uno", 10])])
    await net.ensure(store.view, {"items"}, 5)
    assert network_rows(net, "SELECT agent_id, id, name, qty FROM items WHERE agent_id = 'x'") == [
        ("x", 1, "uno", 10),
        ("x", 3, "three", 3),
    ]
    # A new agent database (new epoch): a new feed, the agent's part is refilled.
    refills = net.refills
    changes(store, "x", "e0000002", 1, [("S", []), ("U", [7, "seven", 7])])
    await net.ensure(store.view, {"items"}, 5)
    assert network_rows(net, "SELECT agent_id, id, name FROM items") == [("x", 7, "seven"), ("y", 9, "relay nine")]
    assert net.refills == refills + 1
    # The table announced on_demand: its rows leave the network store.
    changes(store, "x", "e0000002", 3, [("V", [])])
    await net.ensure(store.view, {"items"}, 5)
    assert network_rows(net, "SELECT agent_id, id FROM items") == [("y", 9)]


async def test_offsets_survive_reopen(store: CentralStore, tmp_path: Path) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    first = NetworkStore(DataDir(tmp_path).network_db)
    try:
        await first.ensure(store.view, {"notes"}, 5)
    finally:
        first.close()
    again = NetworkStore(DataDir(tmp_path).network_db)
    try:
        assert again.satisfied(store.view, "notes")
        relay(store, "a", "notes", {"id": 2, "body": "a2"})
        await again.ensure(store.view, {"notes"}, 5)
        assert again.refills == 0
        assert network_rows(again, "SELECT agent_id, id, body FROM notes") == [("a", 1, "a1"), ("a", 2, "a2")]
    finally:
        again.close()


async def test_unreadable_file_is_started_over(store: CentralStore, tmp_path: Path) -> None:
    path = DataDir(tmp_path).network_db
    path.write_bytes(b"not a database" * 100)
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    n = NetworkStore(path)
    try:
        await n.ensure(store.view, {"notes"}, 5)
        assert network_rows(n, "SELECT agent_id, id FROM notes") == [("a", 1)]
    finally:
        n.close()


async def test_idle_tables_are_dropped(store: CentralStore, tmp_path: Path) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    relay(store, "a", "other", {"id": 1})
    n = NetworkStore(DataDir(tmp_path).network_db, idle_drop_s=0.0)
    try:
        await n.ensure(store.view, {"notes"}, 5)
        assert n.tables() == ["notes"]
        await n.ensure(store.view, {"other"}, 5)  # notes was idle longer than 0 s
        assert n.tables() == ["other"]
        await n.ensure(store.view, {"notes"}, 5)  # made again on its next query
        assert network_rows(n, "SELECT agent_id, id FROM notes") == [("a", 1)]
    finally:
        n.close()


def test_rewrite_overflow(store: CentralStore) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    relay(store, "b", "notes", {"id": 1, "body": "b1"})
    view = store.view
    sql, tables = rewrite_overflow('SELECT n.body FROM "a".notes n JOIN "me".t ON 1', "me", frozenset({"a"}), view)
    assert sql == (
        'SELECT n.body FROM (SELECT "id", "body" FROM "*"."notes" WHERE agent_id = \'a\') n JOIN main.t ON 1'
    )
    assert tables == {"notes"}
    sql, _ = rewrite_overflow(
        'SELECT "a".notes.body, b.notes.id FROM "a".notes, b.notes', "me", frozenset({"a", "b"}), view
    )
    assert sql == (
        'SELECT "a.notes".body, "b.notes".id FROM '
        '(SELECT "id", "body" FROM "*"."notes" WHERE agent_id = \'a\') AS "a.notes", '
        '(SELECT "id", "body" FROM "*"."notes" WHERE agent_id = \'b\') AS "b.notes"'
    )
    # Strings and names an agent has no table of are left alone.
    text = "SELECT 'a.notes', x FROM \"a\".missing"
    assert rewrite_overflow(text, "me", frozenset({"a"}), view) == (text, set())
    with pytest.raises(ReplicatorError) as err:
        rewrite_overflow('SELECT * FROM "a".sqlite_master', "me", frozenset({"a"}), view)
    assert err.value.code == "query_not_allowed" and err.value.status == 403


async def test_only_queried_tables_are_kept(store: CentralStore, net: NetworkStore) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    relay(store, "a", "other", {"id": 1})
    await net.ensure(store.view, {"notes"}, 5)
    relay(store, "a", "other", {"id": 2})  # written, never queried as "*".other: nothing of it here
    await net.ensure(store.view, {"notes"}, 5)
    tables = network_rows(
        net, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_cr\\_%' ESCAPE '\\'"
    )
    assert tables == [("notes",)] and net.tables() == ["notes"]


async def test_catch_up_past_the_time_bound_is_408_and_goes_on(store: CentralStore, net: NetworkStore) -> None:
    relay(store, "a", "notes", {"id": 1, "body": "a1"})
    gate = threading.Event()
    net._executor.submit(gate.wait, 10)  # the writer is busy
    with pytest.raises(ReplicatorError) as err:
        await net.ensure(store.view, {"notes"}, 0.05)
    assert err.value.status == 408 and err.value.code == "query_timeout"
    gate.set()
    await net.ensure(store.view, {"notes"}, 5)
    assert net.satisfied(store.view, "notes")
    assert network_rows(net, "SELECT agent_id, id FROM notes") == [("a", 1)]


async def test_tagged_values_kept_exactly(store: CentralStore, net: NetworkStore) -> None:
    """BLOB, TEXT that is not UTF-8 and non-finite REAL: the same storage class and bytes as the central copy,
    from a snapshot and from the feed."""
    bad_text, blob = {"t": "//4="}, {"b": "AAEC"}
    changes(store, "x", "e0000001", 1, [("S", []), ("U", [1, bad_text, {"f": "inf"}])])
    await net.ensure(store.view, {"items"}, 5)  # snapshot
    changes(store, "x", "e0000001", 3, [("U", [2, bad_text, {"f": "-inf"}]), ("U", [3, "plain", blob])])
    await net.ensure(store.view, {"items"}, 5)  # feed
    probe = "SELECT id, typeof(name), hex(name), typeof(qty), quote(qty) FROM items"
    central = sqlite3.connect(f"file:{store.path_for('x')}?mode=ro", uri=True)
    try:
        want = sorted(central.execute(probe).fetchall())
    finally:
        central.close()
    assert [r[1] for r in want] == ["text", "text", "text"] and want[2][3] == "blob"
    assert network_rows(net, probe) == want
