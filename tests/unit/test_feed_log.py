"""The feed log on a real central SQLite file, without NATS: labels, whole transactions, new feeds, trims, snapshots."""

from __future__ import annotations

import hashlib
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent_client import ChangeRecord, FeedOffset, RelayRecord, TableLayout
from replicator import central_store, feed_log
from replicator.central_store import AgentReplica, CentralStore
from replicator.data_dir import DataDir
from replicator.errors import RecordRejected
from replicator.feed_log import FeedGone, FeedRead, FeedRowChange, read_after, snapshot
from replicator.snapshots import stage, write_snapshot
from tests.unit._central import ITEMS, change_record, relay_record, store_fixture

AGENT = "feed-agent"
EPOCH, EPOCH2 = "aaaaaaaa", "bbbbbbbb"
REQUEST = "0123456789abcdef0123456789abcdef"
PAIRS = TableLayout(
    table="pairs", columns=["a", "b", "v"], pk=["a", "b"], sql="CREATE TABLE pairs (a, b, v, PRIMARY KEY (a, b))"
)
GHOST = TableLayout(table="ghost", columns=["k"], pk=["k"], sql="CREATE TABLE ghost (k PRIMARY KEY)")  # never created

store = store_fixture


@pytest.fixture
def reader(store: CentralStore) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the agent's file, as the HTTP layer holds one."""
    rep = store.replica(AGENT)
    conn = sqlite3.connect(f"file:{rep.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    try:
        yield conn
    finally:
        conn.close()


def record(
    first: int, changes: list[tuple[str, int, list[Any]]], *, epoch: str = EPOCH, final: bool = True
) -> ChangeRecord:
    return change_record(AGENT, first, changes, {"0": ITEMS, "1": PAIRS, "2": GHOST}, epoch=epoch, final=final)


def relay(*rows: tuple[str, dict[str, Any]]) -> RelayRecord:
    return relay_record(AGENT, *rows)


def apply(rep: AgentReplica, rec: ChangeRecord | RelayRecord, *, resync: bool = False) -> None:
    """One record as the consumer applies it (group savepoint for a first part, record savepoint, commit)."""
    rep.begin()
    if isinstance(rec, ChangeRecord) and not rec.final and not rep.state.open_group:
        rep.begin_group()
    with rep.record_savepoint():
        if isinstance(rec, RelayRecord):
            rep.apply_relay(rec)
        elif resync:
            rep.reset_for_resync(rec)
            rep.apply_changes(rec)
        else:
            rep.apply_changes(rec)
    if not rep.state.open_group:
        rep.end_group()
        rep.commit()


class Seq:
    """The agent's change sequence (what the next record starts at)."""

    def __init__(self, start: int = 1) -> None:
        self.next = start

    def rec(self, changes: list[tuple[str, int, list[Any]]], **kw: Any) -> ChangeRecord:
        r = record(self.next, changes, **kw)
        self.next += len(changes)
        return r


def created(store: CentralStore, seq: Seq) -> AgentReplica:
    rep = store.replica(AGENT)
    apply(rep, seq.rec([("S", 0, []), ("S", 1, [])]))
    return rep


def start(reader: sqlite3.Connection) -> FeedOffset:
    return feed_log.head(reader)


def changes_of(read: FeedRead) -> list[tuple[str, str, dict[str, Any], dict[str, Any] | None]]:
    return [(c.table, c.op, c.key, c.row) for u in read.units for c in u.changes]


# ---------------------------------------------------------------- labels
def test_upserts_are_labelled_insert_or_update_and_deletes_delete(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    apply(rep, seq.rec([("U", 0, [1, "one", None]), ("U", 0, [2, "two", None])]))  # a new run: all inserts
    apply(rep, seq.rec([("U", 0, [2, "deux", None]), ("U", 0, [3, "three", None]), ("U", 0, [3, "trois", None])]))
    apply(rep, seq.rec([("U", 0, [1, "uno", None])]))  # one row, there already
    apply(rep, seq.rec([("D", 0, [3]), ("D", 0, [99])]))  # a delete of an absent key is still reported
    apply(rep, seq.rec([("U", 0, [4, "four", None]), ("U", 0, [5, "five", None])]))  # inserts again, same table
    read = read_after(reader, at, table="items")
    assert read.caught_up and read.head == start(reader)
    assert [(c[1], c[2]) for c in changes_of(read)] == [
        ("insert", {"id": 1}),
        ("insert", {"id": 2}),
        ("update", {"id": 2}),
        ("insert", {"id": 3}),
        ("update", {"id": 3}),
        ("update", {"id": 1}),
        ("delete", {"id": 3}),
        ("delete", {"id": 99}),
        ("insert", {"id": 4}),
        ("insert", {"id": 5}),
    ]
    assert changes_of(read)[4][3] == {"id": 3, "name": "trois", "data": None}
    assert changes_of(read)[6][3] is None
    assert [len(u.changes) for u in read.units] == [2, 3, 1, 2, 2]  # one unit per agent transaction
    assert [u.n for u in read.units] == sorted({u.n for u in read.units})
    assert read.units[-1].n == read.head.n
    central = reader.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    assert central == [(1, "uno"), (2, "deux"), (4, "four"), (5, "five")]


def test_tagged_values_travel_in_wire_form(store: CentralStore, reader: sqlite3.Connection) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    bad = {"t": "w/8o"}  # TEXT that is not UTF-8
    apply(rep, seq.rec([("U", 0, [1, bad, {"b": "AAE="}]), ("U", 0, [2, "x", {"f": "inf"}]), ("U", 0, [1, "y", None])]))
    got = changes_of(read_after(reader, at, table="items"))
    assert got == [
        ("items", "insert", {"id": 1}, {"id": 1, "name": bad, "data": {"b": "AAE="}}),
        ("items", "insert", {"id": 2}, {"id": 2, "name": "x", "data": {"f": "inf"}}),
        ("items", "update", {"id": 1}, {"id": 1, "name": "y", "data": None}),
    ]
    apply(rep, seq.rec([("U", 0, [3, bad, {"b": "AAE="}])]))
    snap = snapshot(reader, "items")
    assert dict((k["id"], r) for k, r in snap.rows)[3] == {"id": 3, "name": bad, "data": {"b": "AAE="}}
    assert reader.text_factory is str  # the caller's connection is left as it was


# ---------------------------------------------------------------- whole transactions
def test_a_multi_part_transaction_is_one_unit_and_invisible_until_its_final_part(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    apply(rep, seq.rec([("U", 0, [1, "a", None]), ("U", 1, ["x", "y", 1])], final=False))
    apply(rep, relay(("notes", {"id": 1, "text": "between"})))  # a relay record inside the open transaction
    assert rep.state.open_group
    read = read_after(reader, at, table=None)
    assert read.units == [] and read.caught_up and read.head == at  # nothing of it is committed
    store.publish_view()
    view = store.view.agent(AGENT)
    assert view is not None and (view.feed_id, view.feed_n) == (at.feed_id, at.n)
    apply(rep, seq.rec([("U", 0, [2, "b", None])], final=False))
    apply(rep, seq.rec([("D", 1, ["x", "y"])]))  # the final part
    assert not rep.state.open_group
    read = read_after(reader, at, table=None)
    (unit,) = read.units
    assert unit.n == read.head.n and read.caught_up
    assert [(c.table, c.op, c.key) for c in unit.changes] == [
        ("items", "insert", {"id": 1}),
        ("pairs", "insert", {"a": "x", "b": "y"}),
        ("notes", "insert", {"id": 1}),
        ("items", "insert", {"id": 2}),
        ("pairs", "delete", {"a": "x", "b": "y"}),
    ]
    assert unit.schema_changed == frozenset({"notes"})  # the relay table was created in it
    (only,) = read_after(reader, at, table="pairs").units  # one table: only its changes, the same unit
    assert only.n == unit.n and [c.op for c in only.changes] == ["insert", "delete"]
    store.publish_view()
    view = store.view.agent(AGENT)
    assert view is not None and (view.feed_id, view.feed_n) == (at.feed_id, unit.n)


def test_a_final_part_that_changes_nothing_still_closes_its_unit(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    apply(rep, seq.rec([("U", 0, [1, "a", None])], final=False))
    apply(rep, seq.rec([("U", 0, [1, "b", None])]))
    apply(rep, seq.rec([("U", 0, [5, "e", None])], final=False))
    apply(rep, seq.rec([("X", 2, [])]))  # a final part that changes nothing (a drop of a table never created)
    read = read_after(reader, at, table="items")
    assert [[(c.op, c.key) for c in u.changes] for u in read.units] == [
        [("insert", {"id": 1}), ("update", {"id": 1})],
        [("insert", {"id": 5})],
    ]
    assert read.caught_up and read.head == start(reader)
    finals = reader.execute("SELECT count(*) FROM _cr_feed WHERE final = 1").fetchone()[0]
    assert finals == 3  # the S record, and one closing row per multi-part transaction


def test_an_abandoned_group_leaves_nothing_in_the_log(store: CentralStore, reader: sqlite3.Connection) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    rows_before = reader.execute("SELECT count(*) FROM _cr_feed").fetchone()[0]
    rep.begin()
    rep.begin_group()
    with rep.record_savepoint():
        rep.apply_changes(record(2, [("U", 0, [1, "a", None])], final=False))
    with pytest.raises(RecordRejected), rep.record_savepoint():
        rep.apply_changes(record(3, [("U", 0, [2, True, None])]))  # a bad value: the whole group is off
    rep.abandon_group()
    assert not rep.state.feed_open and rep.state.feed_n == at.n
    rep.commit()
    assert reader.execute("SELECT count(*) FROM _cr_feed").fetchone()[0] == rows_before
    assert read_after(reader, at, table=None).units == []


# ---------------------------------------------------------------- new feeds
def test_a_new_epoch_starts_a_new_feed(store: CentralStore, reader: sqlite3.Connection) -> None:
    seq = Seq()
    rep = created(store, seq)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    old = start(reader)
    apply(rep, record(1, [("S", 0, []), ("U", 0, [7, "new", None])], epoch=EPOCH2))
    with pytest.raises(FeedGone, match="another history"):
        read_after(reader, old, table="items")
    now = start(reader)
    assert now.feed_id != old.feed_id and now.n > old.n
    # The new feed holds the new database's first transaction only, from its floor.
    floor = FeedOffset(
        now.feed_id, int(reader.execute("SELECT value FROM _cr_feed_meta WHERE key='floor'").fetchone()[0])
    )
    (unit,) = read_after(reader, floor, table="items").units
    assert unit.schema_changed == frozenset({"items"}) and [c.key for c in unit.changes] == [{"id": 7}]


def test_a_resync_starts_a_new_empty_feed_and_its_refill_is_not_logged(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    seq = Seq()
    rep = created(store, seq)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    old = start(reader)
    first = seq.next
    apply(rep, record(first, [("R", 0, [REQUEST]), ("S", 0, []), ("U", 0, [5, "e", None])], final=False), resync=True)
    apply(rep, record(first + 3, [("U", 0, [6, "f", None])]))  # the resync's final part
    assert reader.execute("SELECT count(*) FROM _cr_feed").fetchone()[0] == 0
    now = start(reader)
    assert now.feed_id != old.feed_id
    with pytest.raises(FeedGone):
        read_after(reader, old, table="items")
    snap = snapshot(reader, "items")
    assert snap.schema.offset == str(now) and sorted(k["id"] for k, _r in snap.rows) == [5, 6]
    apply(rep, record(first + 4, [("U", 0, [5, "E", None])]))  # logged again after the resync
    assert changes_of(read_after(reader, now, table="items")) == [
        ("items", "update", {"id": 5}, {"id": 5, "name": "E", "data": None})
    ]


def test_offsets_ahead_of_the_head_or_of_another_feed_must_refetch(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    seq = Seq()
    rep = created(store, seq)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    now = start(reader)
    with pytest.raises(FeedGone, match="ahead"):
        read_after(reader, FeedOffset(now.feed_id, now.n + 1), table="items")
    with pytest.raises(FeedGone, match="another history"):
        read_after(reader, FeedOffset("0" * 16, now.n), table="items")
    apply(rep, seq.rec([("U", 0, [2, "b", None])], final=False))
    apply(rep, seq.rec([("U", 0, [3, "c", None])]))
    (inside,) = reader.execute("SELECT n FROM _cr_feed WHERE final = 0").fetchall()
    with pytest.raises(FeedGone, match="not the end of a transaction"):
        read_after(reader, FeedOffset(now.feed_id, inside[0]), table="items")
    now = start(reader)
    for bad in ("_cr_feed", "_cr_state", "sqlite_master", "_CR_tables"):
        with pytest.raises(LookupError):
            read_after(reader, now, table=bad)
        with pytest.raises(LookupError):
            snapshot(reader, bad)
    with pytest.raises(LookupError):
        snapshot(reader, "nope")
    assert read_after(reader, now, table="nope") == FeedRead([], now, True)


def test_the_feed_continues_across_a_reopen(store: CentralStore, tmp_path: Path) -> None:
    seq = Seq()
    rep = created(store, seq)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    store.publish_view()
    before = store.view.agent(AGENT)
    assert before is not None and before.feed_id is not None
    store.close()
    again = CentralStore(DataDir(tmp_path))
    try:
        view = again.view.agent(AGENT)
        assert view is not None and (view.feed_id, view.feed_n) == (before.feed_id, before.feed_n)
        rep2 = again.replica(AGENT)
        apply(rep2, seq.rec([("U", 0, [2, "b", None])]))
        conn = sqlite3.connect(f"file:{rep2.path}?mode=ro", uri=True, isolation_level=None)
        try:
            read = read_after(conn, FeedOffset(before.feed_id, before.feed_n), table="items")
        finally:
            conn.close()
        (unit,) = read.units
        assert unit.n > before.feed_n and [c.key for c in unit.changes] == [{"id": 2}]
    finally:
        again.close()


def test_a_restored_copy_starts_a_new_feed(store: CentralStore, tmp_path: Path) -> None:
    seq = Seq()
    rep = created(store, seq)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    store.publish_view()
    old = store.view.agent(AGENT)
    assert old is not None
    data = DataDir(tmp_path)
    manifest = write_snapshot(data, tmp_path / "snap", 1)
    assert [f.agent_id for f in manifest.agents] == [AGENT]
    staging, _manifest = stage(tmp_path / "snap", data)
    conn = sqlite3.connect(staging / "agents" / f"{AGENT}.db", isolation_level=None)
    try:
        with pytest.raises(FeedGone, match="another history"):
            read_after(conn, FeedOffset(str(old.feed_id), old.feed_n), table="items")
        now = feed_log.head(conn)
        assert now.n == old.feed_n  # the floor: the last n issued
        assert conn.execute("SELECT count(*) FROM _cr_feed").fetchone()[0] == 0
        assert sorted(k["id"] for k, _r in snapshot(conn, "items").rows) == [1]
    finally:
        conn.close()


def test_an_old_file_without_feed_tables_gets_a_feed(tmp_path: Path) -> None:
    path = tmp_path / "agents" / f"{AGENT}.db"
    path.parent.mkdir(parents=True)
    sqlite3.connect(path).close()  # an empty database: no _cr_ tables at all
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None) as conn, pytest.raises(LookupError):
        feed_log.head(conn)
    s = CentralStore(DataDir(tmp_path))
    try:
        view = s.view.agent(AGENT)
        assert view is not None and view.feed_id is not None and len(view.feed_id) == 16 and view.feed_n == 0
    finally:
        s.close()


# ---------------------------------------------------------------- retention
def test_trimming_by_rows_keeps_whole_units_and_old_offsets_must_refetch(
    store: CentralStore, reader: sqlite3.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(central_store, "FEED_KEEP_UNITS", 40)
    monkeypatch.setattr(central_store, "FEED_TRIM_SLACK", 10)
    monkeypatch.setattr(feed_log, "FEED_KEEP_MIN_UNITS", 4)
    seq = Seq()
    rep = created(store, seq)
    oldest = start(reader)
    offsets = [oldest]
    for i in range(60):
        if i % 3 == 0:  # some two-part transactions
            apply(rep, seq.rec([("U", 0, [i, "part", None])], final=False))
        apply(rep, seq.rec([("U", 0, [i, "row", None])]))
        offsets.append(start(reader))
        count = reader.execute("SELECT count(*) FROM _cr_feed").fetchone()[0]
        assert count <= 40
    floor = rep.state.feed_floor
    assert floor > oldest.n
    assert reader.execute("SELECT min(n) FROM _cr_feed").fetchone()[0] > floor
    with pytest.raises(FeedGone, match="too old"):
        read_after(reader, oldest, table="items")
    kept = [o for o in offsets if o.n >= floor]
    assert kept and kept[0].n == floor  # the floor is a unit boundary
    read = read_after(reader, kept[0], table="items")
    assert read.caught_up and len(read.units) == len(kept) - 1
    assert all(u.changes[-1].row is not None and u.changes[-1].row["name"] == "row" for u in read.units)
    assert (rep.state.feed_rows, rep.state.feed_bytes) == tuple(
        reader.execute("SELECT count(*), total(length(body)) FROM _cr_feed").fetchone()
    )


def test_trimming_by_bytes_under_a_quota(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feed_log, "FEED_KEEP_MIN_UNITS", 4)
    s = CentralStore(DataDir(tmp_path), max_agent_bytes=400_000, max_record_bytes=64 * 1024)
    try:
        rep = s.replica(AGENT)
        assert rep.feed_keep_bytes == 100_000
        seq = Seq()
        apply(rep, seq.rec([("S", 0, [])]))
        for i in range(60):
            apply(rep, seq.rec([("U", 0, [i % 5, "x" * 5_000, None])]))
            assert rep.state.feed_bytes <= 100_000
        conn = sqlite3.connect(f"file:{rep.path}?mode=ro", uri=True, isolation_level=None)
        try:
            total = conn.execute("SELECT total(length(body)) FROM _cr_feed").fetchone()[0]
            assert 50_000 < total <= 100_000 and total == rep.state.feed_bytes
            floor = FeedOffset(str(rep.state.feed_id), rep.state.feed_floor)
            read = read_after(conn, floor, table="items")
            assert read.caught_up and all(c.op == "update" for u in read.units for c in u.changes)
        finally:
            conn.close()
    finally:
        s.close()


def test_one_transaction_larger_than_the_byte_bound_never_trims_the_newest_units(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk transaction bigger than the whole byte bound must not send caught-up subscribers to refetch."""
    monkeypatch.setattr(feed_log, "FEED_KEEP_MIN_UNITS", 3)
    s = CentralStore(DataDir(tmp_path), max_agent_bytes=400_000, max_record_bytes=256 * 1024)
    try:
        rep = s.replica(AGENT)
        seq = Seq()
        apply(rep, seq.rec([("S", 0, [])]))
        conn = sqlite3.connect(f"file:{rep.path}?mode=ro", uri=True, isolation_level=None)
        try:
            for i in range(6):
                apply(rep, seq.rec([("U", 0, [i, "small", None])]))
            before_big = start(conn)
            apply(rep, seq.rec([("U", 0, [100 + j, "y" * 1_000, None]) for j in range(150)]))  # > 100 kB alone
            read = read_after(conn, before_big, table="items")  # the subscriber just before it continues
            assert read.caught_up and len(read.units) == 1 and len(read.units[0].changes) == 150
            assert rep.state.feed_bytes > rep.feed_keep_bytes  # the bound gave way to the newest units
            kept = conn.execute("SELECT count(*) FROM _cr_feed").fetchone()[0]
            assert kept == 3  # the newest 3 units (the big one and 2 before it); older small ones trimmed
            with pytest.raises(FeedGone, match="too old"):
                read_after(conn, FeedOffset(before_big.feed_id, before_big.n - 4), table="items")
        finally:
            conn.close()
    finally:
        s.close()


# ---------------------------------------------------------------- snapshot + changes == the table
def _digest(rows: dict[Any, dict[str, Any]]) -> str:
    return hashlib.sha256(orjson.dumps(sorted(rows.items()), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _central(reader: sqlite3.Connection) -> dict[Any, dict[str, Any]]:
    return {(a, b): {"a": a, "b": b, "v": v} for a, b, v in reader.execute("SELECT a, b, v FROM pairs")}


def _replay(copy: dict[Any, dict[str, Any]], read: FeedRead) -> None:
    for unit in read.units:
        for c in unit.changes:
            k = (c.key["a"], c.key["b"])
            if c.op == "delete":
                copy.pop(k, None)
            else:
                assert (c.op == "insert") == (k not in copy), (c, k in copy)  # labels agree with the copy
                assert c.row is not None
                copy[k] = c.row


def test_a_snapshot_and_the_changes_after_it_equal_the_table(store: CentralStore, reader: sqlite3.Connection) -> None:
    rnd = random.Random(12)
    seq = Seq()
    rep = created(store, seq)

    def random_tx() -> None:
        ops: list[tuple[str, int, list[Any]]] = []
        for _ in range(rnd.randint(1, 30)):
            a, b = rnd.randint(0, 20), rnd.choice(["p", "q"])
            if rnd.random() < 0.25:
                ops.append(("D", 1, [a, b]))
            else:
                ops.append(("U", 1, [a, b, rnd.random()]))
            if rnd.random() < 0.1:
                ops.append(("U", 0, [a, "other table", None]))
        apply(rep, seq.rec(ops, final=rnd.random() > 0.2))

    for _ in range(40):
        random_tx()
    while rep.state.open_group:
        random_tx()
    snap = snapshot(reader, "pairs")
    assert snap.schema.columns == ("a", "b", "v") and snap.schema.pk == ("a", "b")
    copy = {(k["a"], k["b"]): r for k, r in snap.rows}
    assert _digest(copy) == _digest(_central(reader))
    offset = FeedOffset.parse(snap.schema.offset)
    for _ in range(200):
        random_tx()
        if rnd.random() < 0.3 and not rep.state.open_group:
            while True:  # read in small bounded steps, as a slow subscriber
                read = read_after(reader, offset, table="pairs", max_units=3, max_bytes=2_000)
                _replay(copy, read)
                offset = read.head
                if read.caught_up:
                    break
    while rep.state.open_group:
        random_tx()
    read = read_after(reader, offset, table="pairs")
    _replay(copy, read)
    assert read.caught_up
    assert len(copy) > 10 and _digest(copy) == _digest(_central(reader))


def test_a_bounded_read_stops_at_whole_units(store: CentralStore, reader: sqlite3.Connection) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    for i in range(10):
        apply(rep, seq.rec([("U", 0, [i, "a", None]), ("U", 0, [i + 100, "b", None])]))
        apply(rep, seq.rec([("U", 1, [i, "x", 1])]))  # another table in between
    read = read_after(reader, at, table="items", max_units=4)
    assert len(read.units) == 4 and not read.caught_up and read.head.n == read.units[-1].n
    assert all(len(u.changes) == 2 for u in read.units)
    rest = read_after(reader, read.head, table="items")
    assert len(rest.units) == 6 and rest.caught_up
    assert rest.head == start(reader) and rest.head.n > rest.units[-1].n  # past the other table's last unit
    big = read_after(reader, at, table=None, max_bytes=1)
    assert len(big.units) == 1 and not big.caught_up  # at least one unit, however large


# ---------------------------------------------------------------- relay rows and schema markers
def test_relay_rows_are_labelled_whole_and_keyed_by_rowid_without_a_key(
    store: CentralStore, reader: sqlite3.Connection
) -> None:
    rep = store.replica(AGENT)
    at = start(reader)
    apply(rep, relay(("notes", {"id": 1, "text": "one"}), ("notes", {"id": 2, "text": "two"})))
    apply(rep, relay(("notes", {"id": 1, "extra": [1, 2]})))  # an update of one column, adding a column
    apply(rep, relay(("log", {"msg": "a"}), ("log", {"msg": "b"})))  # no key
    read = read_after(reader, at, table=None)
    assert [sorted(u.schema_changed) for u in read.units] == [["notes"], ["notes"], ["log"]]
    assert changes_of(read) == [
        ("notes", "insert", {"id": 1}, {"id": 1, "text": "one"}),
        ("notes", "insert", {"id": 2}, {"id": 2, "text": "two"}),
        ("notes", "update", {"id": 1}, {"id": 1, "text": "one", "extra": "[1,2]"}),
        ("log", "insert", {"rowid": 1}, {"msg": "a"}),
        ("log", "insert", {"rowid": 2}, {"msg": "b"}),
    ]
    snap = snapshot(reader, "log")
    assert snap.schema.pk == () and snap.rows == [({"rowid": 1}, {"msg": "a"}), ({"rowid": 2}, {"msg": "b"})]
    snap = snapshot(reader, "notes")
    assert snap.rows == [
        ({"id": 1}, {"id": 1, "text": "one", "extra": "[1,2]"}),
        ({"id": 2}, {"id": 2, "text": "two", "extra": None}),
    ]


def test_schema_changes_are_marked_for_their_table(store: CentralStore, reader: sqlite3.Connection) -> None:
    seq = Seq()
    rep = created(store, seq)
    at = start(reader)
    apply(rep, seq.rec([("U", 0, [1, "a", None])]))
    apply(rep, seq.rec([("S", 0, []), ("U", 0, [2, "b", None])]))  # recreated
    apply(rep, seq.rec([("X", 1, [])]))  # dropped
    apply(rep, seq.rec([("V", 1, ["on_demand"])]))  # announced on_demand
    read = read_after(reader, at, table="items")
    assert [sorted(u.schema_changed) for u in read.units] == [[], ["items"]]
    assert [c.key for c in read.units[1].changes] == [{"id": 2}]
    read = read_after(reader, at, table="pairs")
    assert [(sorted(u.schema_changed), u.changes) for u in read.units] == [(["pairs"], ()), (["pairs"], ())]
    with pytest.raises(LookupError):
        snapshot(reader, "pairs")  # on_demand: no rows here
    everything = read_after(reader, at, table=None)
    assert [sorted(u.schema_changed) for u in everything.units] == [[], ["items"], ["pairs"], ["pairs"]]
    assert isinstance(everything.units[0].changes[0], FeedRowChange)
