"""The central store on a real SQLite file, without NATS: applying change and relay records, epochs, rejections."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent_client import ChangeRecord, RelayRecord, RelayRow, TableLayout
from replicator.central_store import AgentReplica, CentralStore
from replicator.data_dir import DataDir
from replicator.errors import RecordRejected
from replicator.replica_state import ReplicaState
from replicator.sequencer import RecordHeader, sequence
from tests.unit._central import ITEMS, change_record, relay_record, store_fixture

AGENT = "unit-agent"
EPOCH, EPOCH2 = "aaaaaaaa", "bbbbbbbb"
SECRETS = TableLayout(table="secrets", columns=["k", "v"], pk=["k"], sql="CREATE TABLE secrets (k TEXT PRIMARY KEY, v)")

store = store_fixture


def record(
    first: int, changes: list[tuple[str, int, list[Any]]], *, epoch: str = EPOCH, final: bool = True
) -> ChangeRecord:
    return change_record(AGENT, first, changes, {"0": ITEMS, "1": SECRETS}, epoch=epoch, final=final)


def relay(*rows: tuple[str, dict[str, Any]]) -> RelayRecord:
    return relay_record(AGENT, *rows)


def apply(rep: AgentReplica, rec: ChangeRecord | RelayRecord, stream_seq: int | None = None) -> bool:
    """One record in its own transaction, as the consumer does it (savepoint inside the agent's transaction)."""
    rep.begin()
    try:
        with rep.record_savepoint():
            if isinstance(rec, RelayRecord):
                written = rep.apply_relay(rec, stream_seq)
            else:
                rep.apply_changes(rec)
                written = True
    finally:
        if not rep.state.open_group:
            rep.commit()
    return written


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def created(store: CentralStore) -> AgentReplica:
    rep = store.replica(AGENT)
    apply(rep, record(1, [("S", 0, []), ("U", 0, [1, "one", None]), ("U", 0, [2, "two", {"b": "AAE="}])]))
    return rep


# ---------------------------------------------------------------- change records
def test_schema_change_and_upserts(store: CentralStore) -> None:
    rep = created(store)
    assert rows(rep.path, "SELECT id, name, data FROM items ORDER BY id") == [(1, "one", None), (2, "two", b"\x00\x01")]
    state = rep.state
    assert (state.epoch, state.watermark, state.head_seq, state.committed_at) == (EPOCH, 3, 3, 1001.0)
    assert (state.records_applied, state.changes_applied) == (1, 3)
    assert state.tables["items"].columns == ("id", "name", "data")
    assert state.tables["items"].types == ("INTEGER", "TEXT", "BLOB")
    assert rows(rep.path, "SELECT type FROM pragma_table_info('items') ORDER BY cid") == [
        ("INTEGER",),
        ("TEXT",),
        ("BLOB",),
    ]


def test_upsert_replaces_and_delete_removes(store: CentralStore) -> None:
    rep = created(store)
    apply(rep, record(4, [("U", 0, [1, "uno", None]), ("D", 0, [2]), ("D", 0, [99])]))
    assert rows(rep.path, "SELECT id, name FROM items") == [(1, "uno")]
    assert (rep.state.watermark, rep.state.records_applied, rep.state.changes_applied) == (6, 2, 6)


def test_changes_at_or_below_the_watermark_are_skipped(store: CentralStore) -> None:
    rep = created(store)
    apply(rep, record(2, [("U", 0, [1, "again", None]), ("U", 0, [2, "again", None]), ("U", 0, [3, "three", None])]))
    assert rows(rep.path, "SELECT id, name FROM items ORDER BY id") == [(1, "one"), (2, "two"), (3, "three")]
    assert (rep.state.watermark, rep.state.changes_applied) == (4, 4)


def test_drop_removes_the_table(store: CentralStore) -> None:
    rep = created(store)
    apply(rep, record(4, [("X", 0, [])]))
    assert "items" not in rep.state.tables
    assert rows(rep.path, "SELECT name FROM sqlite_master WHERE name = 'items'") == []
    assert rows(rep.path, "SELECT name FROM _cr_tables") == []


def test_visibility_announcement_registers_an_on_demand_table(store: CentralStore) -> None:
    rep = created(store)
    apply(rep, record(4, [("V", 1, ["on_demand"])]))
    assert rep.state.tables["secrets"].visibility == "on_demand"
    assert rows(rep.path, "SELECT name FROM sqlite_master WHERE name = 'secrets'") == []  # no rows kept here
    store.publish_view()
    table = store.view.table(AGENT, "secrets")
    assert table is not None and table.visibility == "on_demand"
    with pytest.raises(RecordRejected, match="not replicated here"):
        apply(rep, record(5, [("U", 1, ["k", "v"])]))


def test_a_new_epoch_drops_the_agent_tables_and_retires_the_old_epoch(store: CentralStore, tmp_path: Path) -> None:
    rep = created(store)
    apply(rep, relay(("notes", {"id": 1, "text": "kept"})))
    apply(rep, record(1, [("S", 1, []), ("U", 1, ["k", "v"])], epoch=EPOCH2))
    assert (rep.state.epoch, rep.state.watermark, rep.state.head_seq) == (EPOCH2, 2, 2)
    assert rep.state.retired == frozenset({EPOCH})
    assert set(rep.state.tables) == {"secrets", "notes"}
    assert rows(rep.path, "SELECT name FROM sqlite_master WHERE name = 'items'") == []
    assert rows(rep.path, "SELECT id, text FROM notes") == [(1, "kept")]  # written over HTTP: not the agent's
    store.close()
    reopened = CentralStore(DataDir(tmp_path)).replica(AGENT)
    try:
        assert reopened.state.retired == frozenset({EPOCH})
        assert reopened.position().is_retired(EPOCH)
        assert (reopened.state.epoch, reopened.state.watermark) == (EPOCH2, 2)
    finally:
        reopened.close()


def test_state_survives_a_reopen(store: CentralStore, tmp_path: Path) -> None:
    rep = created(store)
    rep.begin()
    rep.set_blocked("changes 4-4 dead-lettered")
    rep.commit()
    expected = rep.state.copy()
    store.close()
    again = CentralStore(DataDir(tmp_path))
    try:
        state = again.replica(AGENT).state
        assert (state.epoch, state.watermark, state.head_seq, state.blocked) == (EPOCH, 3, 3, expected.blocked)
        assert (state.committed_at, state.applied_at, state.last_seen) == (
            expected.committed_at,
            expected.applied_at,
            expected.applied_at,
        )
        assert (state.records_applied, state.changes_applied) == (1, 3)
        assert state.tables == expected.tables
        again.replicas[AGENT].begin()
        again.replicas[AGENT].set_blocked(None)
        again.replicas[AGENT].commit()
    finally:
        again.close()
    third = CentralStore(DataDir(tmp_path))
    try:
        assert third.replica(AGENT).state.blocked is None
    finally:
        third.close()


# ---------------------------------------------------------------- rejections leave everything as it was
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ([("U", 0, [3, "three", None]), ("U", 1, ["k", "v"])], "not replicated here"),
        ([("U", 0, [3, "three", None]), ("U", 0, [2**63, "big", None])], "bad value"),
        ([("U", 0, [3, "three", None]), ("D", 0, [{"x": 1}])], "bad value"),
        ([("S", 1, []), ("U", 1, ["k", "v"]), ("U", 0, [3, True, None])], "bad value"),
    ],
)
def test_a_rejected_record_leaves_state_and_data_unchanged(
    store: CentralStore, changes: list[tuple[str, int, list[Any]]], reason: str
) -> None:
    rep = created(store)
    rep.begin()
    before = rep.state.copy()
    with pytest.raises(RecordRejected, match=reason), rep.record_savepoint():
        rep.apply_changes(record(4, changes))
    assert rep.state == before
    rep.commit()
    assert rows(rep.path, "SELECT id, name FROM items ORDER BY id") == [(1, "one"), (2, "two")]
    assert rows(rep.path, "SELECT name FROM sqlite_master WHERE name = 'secrets'") == []
    assert rows(rep.path, "SELECT value FROM _cr_state WHERE key = 'watermark'") == [(3,)]


def test_a_schema_mismatch_is_rejected(store: CentralStore) -> None:
    rep = created(store)
    other = ITEMS.model_copy(update={"columns": ["id", "nick", "data"]})
    rec = record(4, [("U", 0, [3, "x", None])]).model_copy(update={"layouts": {"0": other, "1": SECRETS}})
    with pytest.raises(RecordRejected, match="schema mismatch"):
        apply(rep, rec)
    assert rep.state.watermark == 3


def test_a_rejected_new_epoch_keeps_the_old_one(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    before = rep.state.copy()
    with pytest.raises(RecordRejected), rep.record_savepoint():
        rep.apply_changes(record(1, [("U", 0, [1, "x", None])], epoch=EPOCH2))  # its table does not exist yet
    assert rep.state == before
    rep.commit()
    assert rows(rep.path, "SELECT id FROM items ORDER BY id") == [(1,), (2,)]
    assert rows(rep.path, "SELECT epoch FROM _cr_epochs") == []


def test_rollback_restores_state_and_data(store: CentralStore) -> None:
    rep = created(store)
    before = rep.state.copy()
    rep.begin()
    with rep.record_savepoint():
        rep.apply_changes(record(4, [("U", 0, [3, "three", None])], final=False))
    rep.set_blocked("something")
    rep.state.head_seq = 50
    assert rep.state.open_group
    rep.rollback()
    assert rep.state == before
    assert not rep.in_txn
    assert rows(rep.path, "SELECT id FROM items ORDER BY id") == [(1,), (2,)]


# ---------------------------------------------------------------- relay records
def test_relay_records_create_and_upsert_a_table(store: CentralStore) -> None:
    rep = store.replica(AGENT)
    assert apply(rep, relay(("notes", {"id": 1, "text": "a", "tags": ["x"]})), stream_seq=10)
    assert apply(rep, relay(("notes", {"id": 1, "text": "b"}), ("notes", {"id": 2, "flag": True})), stream_seq=11)
    assert rows(rep.path, "SELECT id, text, tags, flag FROM notes ORDER BY id") == [
        (1, "b", '["x"]', None),
        (2, None, None, 1),
    ]
    meta = rep.state.tables["notes"]
    assert (meta.source, meta.pk, meta.columns) == ("relay", ("id",), ("id", "text", "tags", "flag"))
    assert (rep.state.records_applied, rep.state.changes_applied) == (2, 3)


def test_a_relay_table_without_id_has_no_key(store: CentralStore) -> None:
    rep = store.replica(AGENT)
    apply(rep, relay(("log", {"line": "a"}), ("log", {"line": "a"})))
    assert rows(rep.path, "SELECT line FROM log") == [("a",), ("a",)]
    with pytest.raises(RecordRejected, match="lacks its primary key"):
        apply(rep, relay(("notes", {"id": 1}), ("notes", {"text": "no id"})))


def test_a_duplicate_relay_stream_seq_is_not_applied_twice(store: CentralStore) -> None:
    rep = store.replica(AGENT)
    assert apply(rep, relay(("log", {"line": "a"})), stream_seq=7)
    before = rep.state.copy()
    assert not apply(rep, relay(("log", {"line": "a"})), stream_seq=7)
    assert rows(rep.path, "SELECT count(*) FROM log") == [(1,)]
    assert (rep.state.records_applied, rep.state.changes_applied) == (before.records_applied, before.changes_applied)
    store.forget_relay_seen(7)
    assert apply(rep, relay(("log", {"line": "a"})), stream_seq=7)  # past the ack floor: no longer remembered


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (("bad name", {"id": 1}), "invalid table name"),
        (("notes", {}), "no columns"),
        (("notes", {"x; DROP": 1}), "invalid column name"),
        (("notes", {"id": 2**64}), "64 bits"),
        (("notes", {"id": float("nan")}), "finite"),
        (("log", {"line": "a relay table of its own"}), None),
        (("items", {"id": 9, "name": "x"}), "belongs to agent"),  # the agent's table: only its records write it
        (("items", {"id": 9, "nick": "x"}), "belongs to agent"),
        (("secrets", {"k": "x"}), "belongs to agent"),
    ],
)
def test_relay_rejections_leave_state_and_data_unchanged(
    store: CentralStore, row: tuple[str, dict[str, Any]], reason: str | None
) -> None:
    rep = created(store)
    apply(rep, record(4, [("V", 1, ["on_demand"])]))
    rep.begin()
    before = rep.state.copy()
    if reason is None:
        with rep.record_savepoint():
            rep.apply_relay(relay(row), 1)
        rep.commit()
        assert rows(rep.path, "SELECT line FROM log") == [("a relay table of its own",)]
        assert rows(rep.path, "SELECT count(*) FROM items WHERE id = 9") == [(0,)]
        return
    with pytest.raises(RecordRejected, match=reason), rep.record_savepoint():
        rep.apply_relay(relay(("notes", {"id": 1, "text": "first row is fine"}), row), 1)
    assert rep.state == before
    rep.commit()
    assert rows(rep.path, "SELECT name FROM sqlite_master WHERE name = 'notes'") == []
    assert rows(rep.path, "SELECT count(*) FROM _cr_relay_seen") == [(0,)]


# ---------------------------------------------------------------- views
def test_the_view_shows_the_committed_state_during_an_open_group(store: CentralStore) -> None:
    rep = created(store)
    store.publish_view()
    committed = store.view.agent(AGENT)
    assert committed is not None and committed.watermark == 3
    rep.begin()
    with rep.record_savepoint():
        rep.apply_changes(record(4, [("S", 1, []), ("U", 0, [3, "three", None])], final=False))
    view = store.publish_view().agent(AGENT)
    assert view is not None
    assert (view.watermark, view.records_applied, view.changes_applied) == (3, 1, 3)
    assert set(view.tables) == {"items"}
    assert view.head_seq == 5  # seen, not yet committed
    rep.commit()
    view = store.publish_view([AGENT]).agent(AGENT)
    assert view is not None and (view.watermark, set(view.tables)) == (5, {"items", "secrets"})
    assert view.lag_changes == 0


def test_publish_view_for_some_agents_keeps_the_others(store: CentralStore) -> None:
    created(store)
    other = store.replica("other-agent")
    store.publish_view()
    first = store.view
    apply(other, RelayRecord(agent_id="other-agent", rows=[RelayRow(table="t", data={"id": 1})]))
    second = store.publish_view(["other-agent"])
    assert second.agent(AGENT) is first.agent(AGENT)
    assert second.agent_ids() == ["other-agent", AGENT]
    other_view = second.agent("other-agent")
    assert other_view is not None and other_view.records_applied == 1
    first_other = first.agent("other-agent")
    assert first_other is not None and first_other.records_applied == 0  # a published view never changes


def test_position_of_an_unknown_agent_creates_nothing(store: CentralStore, tmp_path: Path) -> None:
    assert store.position("nobody") == ReplicaState().position()
    assert "nobody" not in store.replicas
    assert not (tmp_path / "agents" / "nobody.db").exists()


def test_an_invalid_agent_id_is_rejected(store: CentralStore) -> None:
    with pytest.raises(RecordRejected, match="invalid agent id"):
        store.replica("../etc")


def test_observe_tracks_the_highest_sequence_seen_of_the_current_epoch(store: CentralStore) -> None:
    rep = created(store)  # watermark 3

    def seen(first: int, last: int, epoch: str = EPOCH) -> int:
        header = RecordHeader(AGENT, AGENT, "changes", epoch, first, last)
        rep.observe(header, sequence(rep.position(), header))
        assert rep.state.last_seen is not None
        return rep.state.head_seq

    assert seen(2, 3) == 3  # duplicate
    assert seen(8, 9) == 9  # beyond a gap: the lag shows it
    assert seen(4, 5) == 9  # the next one, below what was seen
    assert seen(20, 20, epoch=EPOCH2) == 9  # another epoch (a gap: it must start at 1)
    assert seen(1, 30, epoch=EPOCH2) == 9  # a new epoch counts once applied
    rep.begin()
    with rep.record_savepoint():
        rep.apply_changes(record(4, [("U", 0, [3, "x", None])], final=False))
    assert seen(7, 12) == 9  # not the next part of the open transaction
    assert seen(5, 11) == 11


# ---------------------------------------------------------------- records ahead of their turn
def test_records_ahead_are_remembered_once_and_due_in_order(store: CentralStore, tmp_path: Path) -> None:
    rep = created(store)  # watermark 3
    rep.begin()
    for stream_seq, first in ((50, 7), (40, 5), (45, 6), (40, 5)):  # the last one is a redelivery
        rep.keep_ahead(RecordHeader.of(AGENT, record(first, [("U", 0, [first, "x", None])])), stream_seq)
    rep.commit()
    assert rep.state.ahead == 3 and rep.state.ahead_since is not None
    assert rep.due_ahead(10) == []  # change 4 is missing: none is due
    apply(rep, record(4, [("U", 0, [4, "four", None])]))
    assert rep.due_ahead(10) == [40]  # only the next one: the others follow it
    apply(rep, record(5, [("U", 0, [5, "five", None])]))
    rep.begin()
    rep.settle_ahead(40)
    rep.commit()
    assert rep.due_ahead(10) == [45]
    reopened = CentralStore(DataDir(tmp_path))  # remembered across a restart
    try:
        assert reopened.replica(AGENT).state.ahead == 2
    finally:
        reopened.close()


def test_a_rolled_back_settle_keeps_the_record_remembered(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    rep.keep_ahead(RecordHeader.of(AGENT, record(5, [("U", 0, [5, "x", None])])), 9)
    rep.commit()
    rep.begin()
    rep.settle_ahead(9)
    assert rep.state.ahead == 0 and rep.state.ahead_since is None
    rep.rollback()
    assert rep.state.ahead == 1 and rows(rep.path, "SELECT stream_seq FROM _cr_ahead") == [(9,)]


def test_a_new_epoch_forgets_the_old_epochs_records_ahead(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    rep.keep_ahead(RecordHeader.of(AGENT, record(9, [("U", 0, [9, "x", None])])), 90)
    rep.keep_ahead(RecordHeader.of(AGENT, record(2, [("U", 0, [2, "y", None])], epoch=EPOCH2)), 91)
    rep.commit()
    apply(rep, record(1, [("S", 0, [])], epoch=EPOCH2))
    assert rep.state.ahead == 1 and rep.due_ahead(10) == [91]


# ---------------------------------------------------------------- quota and the machine's errors
def test_the_quota_refuses_what_could_pass_it_and_lets_deletions_through(tmp_path: Path) -> None:
    store = CentralStore(DataDir(tmp_path), max_agent_bytes=1024 * 1024, max_record_bytes=64 * 1024)
    try:
        rep = created(store)
        big = record(4, [("U", 0, [4, "x" * 300_000, None])])
        rep.check_quota(big, 300_000)  # 2 x 300 KB fits in 1 MiB next to what is there
        apply(rep, big)
        assert rep.used_bytes() > 300_000
        with pytest.raises(RecordRejected, match="over its storage quota"):
            rep.check_quota(record(5, [("U", 0, [5, "y" * 400_000, None])]), 400_000)
        rep.check_quota(record(5, [("D", 0, [4])]), 10_000_000)  # a deletion always passes
        assert int(rows(rep.path, "PRAGMA max_page_count")[0][0]) > 0
    finally:
        store.close()


def test_errors_of_the_machine_are_retried_and_errors_of_the_record_are_rejected() -> None:
    from replicator.central_store import is_environment_error

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    constraint = sqlite3.IntegrityError("NOT NULL constraint failed")
    constraint.sqlite_errorcode = 1299  # type: ignore[attr-defined]
    assert is_environment_error(full) and is_environment_error(OSError(24, "Too many open files"))
    assert not is_environment_error(constraint) and not is_environment_error(ValueError("x"))


def test_sqlite_rolling_back_by_itself_is_noticed_and_rollback_still_works(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    with rep.record_savepoint():
        rep.apply_changes(record(4, [("U", 0, [4, "four", None])]))
    rep.conn.execute("ROLLBACK")  # what SQLite does itself on a full disk
    assert rep.txn_lost
    rep.rollback()  # no "no transaction is active"
    assert not rep.in_txn and rep.state.watermark == 3
    assert rows(rep.path, "SELECT count(*) FROM items WHERE id = 4") == [(0,)]


# ---------------------------------------------------------------- resync
REQUEST = "0123456789abcdef0123456789abcdef"


def resync_record(
    first: int, changes: list[tuple[str, int, list[Any]]], *, epoch: str = EPOCH, final: bool = True
) -> ChangeRecord:
    return record(first, [("R", 0, [REQUEST]), *changes], epoch=epoch, final=final)


def apply_resync(rep: AgentReplica, rec: ChangeRecord) -> None:
    rep.begin()
    with rep.record_savepoint():
        rep.apply_resync(rec)
    if not rep.state.open_group:
        rep.commit()


def test_a_resync_replaces_the_agent_tables_keeps_relay_tables_and_clears_blocked(
    store: CentralStore, tmp_path: Path
) -> None:
    rep = created(store)  # items 1, 2 at watermark 3
    apply(rep, relay(("notes", {"id": 1, "text": "kept"})))
    rep.begin()
    rep.set_blocked("changes 4-4 dead-lettered")
    rep.commit()
    apply_resync(rep, resync_record(9, [("S", 0, []), ("U", 0, [7, "seven", None])]))
    state = rep.state
    assert (state.epoch, state.watermark, state.blocked, state.last_resync, state.resyncs) == (
        EPOCH,
        11,
        None,
        REQUEST,
        1,
    )
    assert rows(rep.path, "SELECT id, name FROM items") == [(7, "seven")]
    assert rows(rep.path, "SELECT id, text FROM notes") == [(1, "kept")]
    store.publish_view()
    view = store.view.agent(AGENT)
    assert view is not None and (view.resyncs, view.last_resync, view.blocked) == (1, REQUEST, None)
    store.close()
    again = CentralStore(DataDir(tmp_path))  # all of it is stored
    try:
        st = again.replica(AGENT).state
        assert (st.watermark, st.blocked, st.last_resync, st.resyncs) == (11, None, REQUEST, 1)
    finally:
        again.close()


def test_a_resync_of_another_epoch_retires_the_old_one_and_forgets_what_it_supersedes(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    rep.keep_ahead(RecordHeader.of(AGENT, record(9, [("U", 0, [9, "x", None])])), 90)  # old epoch
    rep.keep_ahead(RecordHeader.of(AGENT, record(5, [("U", 0, [5, "x", None])], epoch=EPOCH2)), 91)  # superseded
    rep.keep_ahead(RecordHeader.of(AGENT, record(30, [("U", 0, [30, "y", None])], epoch=EPOCH2)), 92)  # after it
    rep.commit()
    apply_resync(rep, resync_record(20, [("S", 1, []), ("U", 1, ["k", "v"])], epoch=EPOCH2))
    state = rep.state
    assert (state.epoch, state.watermark, state.retired) == (EPOCH2, 22, frozenset({EPOCH}))
    assert set(state.tables) == {"secrets"}
    assert state.ahead == 1 and rows(rep.path, "SELECT stream_seq FROM _cr_ahead") == [(92,)]
    assert rep.due_ahead(10) == []  # 23..29 still missing
    apply(rep, record(23, [("U", 1, ["k2", "v2"])] * 7, epoch=EPOCH2))
    assert rep.due_ahead(10) == [92]


def test_a_multi_part_resync_shows_the_old_copy_until_its_final_part(store: CentralStore) -> None:
    rep = created(store)
    reader = sqlite3.connect(f"file:{rep.path}?mode=ro", uri=True)
    try:
        rep.begin()
        rep.begin_group()
        with rep.record_savepoint():
            rep.apply_resync(resync_record(4, [("S", 0, []), ("U", 0, [10, "ten", None])], final=False))
        assert rep.state.open_group and rep.in_txn
        assert reader.execute("SELECT id FROM items ORDER BY id").fetchall() == [(1,), (2,)]  # the old copy
        store.publish_view()
        view = store.view.agent(AGENT)
        assert view is not None and (view.watermark, view.resyncs) == (3, 0)
        with rep.record_savepoint():
            rep.apply_changes(record(7, [("U", 0, [11, "eleven", None])]))
        rep.end_group()
        assert rep.state.resync_applied() == REQUEST
        rep.commit()
        assert reader.execute("SELECT id FROM items ORDER BY id").fetchall() == [(10,), (11,)]  # the new one
    finally:
        reader.close()


def test_an_abandoned_group_goes_back_to_before_its_first_part(store: CentralStore) -> None:
    rep = created(store)
    rep.begin()
    with rep.record_savepoint():
        rep.apply_changes(record(4, [("U", 0, [4, "four", None])]))  # a whole record before the group
    rep.begin_group()
    with rep.record_savepoint():
        rep.apply_resync(resync_record(5, [("S", 0, []), ("U", 0, [10, "ten", None])], final=False))
    rep.abandon_group()
    assert (rep.state.watermark, rep.state.open_group, rep.state.resyncs) == (4, False, 0)
    rep.commit()
    assert rows(rep.path, "SELECT id FROM items ORDER BY id") == [(1,), (2,), (4,)]


# ---------------------------------------------------------------- values, reports, files
def test_text_that_is_not_utf8_is_stored_as_text_with_its_exact_bytes(store: CentralStore) -> None:
    rep = created(store)
    bad = {"t": "w/8o"}  # b"\xc3\xff\x28"
    apply(rep, record(4, [("U", 0, [5, bad, None]), ("U", 0, [6, "fine", None]), ("U", 0, [7, bad, {"t": "gA=="}])]))
    assert rows(rep.path, "SELECT id, typeof(name), hex(name), typeof(data), hex(data) FROM items WHERE id > 4") == [
        (5, "text", "C3FF28", "null", ""),
        (6, "text", "66696E65", "null", ""),
        (7, "text", "C3FF28", "text", "80"),
    ]
    # A key that is such text is found again (delete by key).
    apply(rep, record(7, [("S", 1, []), ("U", 1, [bad, "v"]), ("D", 1, [bad])]))
    assert rows(rep.path, "SELECT count(*) FROM secrets") == [(0,)]


def test_the_agents_status_report_is_kept_newest_first_and_stored(store: CentralStore, tmp_path: Path) -> None:
    from agent_client import AgentStatusRecord

    rep = created(store)
    newer = AgentStatusRecord(agent_id=AGENT, epoch=EPOCH, last_seq=9, acked_seq=7, blocked="no", log_bytes=1, at=50.0)
    older = AgentStatusRecord(agent_id=AGENT, epoch=EPOCH, last_seq=8, acked_seq=6, blocked=None, log_bytes=1, at=40.0)
    rep.begin()
    assert rep.note_status(newer) and not rep.note_status(older)
    assert not rep.state.changes_moved()
    rep.commit()
    store.publish_view()
    view = store.view.agent(AGENT)
    assert view is not None and (view.agent_blocked, view.agent_last_seq, view.agent_reported_at) == ("no", 9, 50.0)
    store.close()
    again = CentralStore(DataDir(tmp_path))
    try:
        st = again.replica(AGENT).state
        assert (st.agent_epoch, st.agent_last_seq, st.agent_acked_seq, st.agent_blocked) == (EPOCH, 9, 7, "no")
    finally:
        again.close()


def test_a_damaged_central_file_is_quarantined_and_started_afresh(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    data.agents.mkdir(parents=True)
    data.agent_db("broken").write_bytes(b"this is not a database" * 100)
    data.agent_db("broken").with_name("broken.db-wal").write_bytes(b"junk")
    store = CentralStore(data)
    try:
        assert "broken" in store.replicas and store.replicas["broken"].state.epoch is None
        (found,) = store.take_quarantined()
        assert found.agent_id == "broken" and found.moved_to.parent == data.quarantine
        assert found.moved_to.read_bytes().startswith(b"this is not a database")
        assert found.moved_to.with_name(found.moved_to.name + "-wal").read_bytes() == b"junk"
        assert store.take_quarantined() == []
        assert rows(data.agent_db("broken"), "SELECT count(*) FROM _cr_state") == [(0,)]
    finally:
        store.close()


def test_a_side_file_without_its_database_is_set_aside(tmp_path: Path) -> None:
    data = DataDir(tmp_path)
    data.agents.mkdir(parents=True)
    orphan = data.agent_db("lost").with_name("lost.db-wal")
    orphan.write_bytes(b"stale wal")
    store = CentralStore(data)
    try:
        store.replica("lost")
        (moved,) = data.quarantine.glob("lost-*.db-wal")
        assert moved.read_bytes() == b"stale wal"
        assert not orphan.exists() or orphan.read_bytes() != b"stale wal"
        assert store.take_quarantined() == []  # nothing was damaged: the agent's file was simply gone
    finally:
        store.close()


def test_reopen_after_the_file_was_deleted_starts_a_new_copy(store: CentralStore) -> None:
    rep = created(store)
    rep.path.unlink()
    fresh = store.reopen(AGENT)
    assert fresh is store.replicas[AGENT] and fresh is not rep
    assert fresh.state.epoch is None and fresh.path.exists()  # (its inode number may be the old one, reused)
    store.publish_view([AGENT])
    view = store.view.agent(AGENT)
    assert view is not None and view.file_id == fresh.file_id and view.watermark == 0


def test_resync_marks_show_on_the_view_until_cleared(store: CentralStore) -> None:
    created(store)
    store.publish_view()
    store.mark_resyncs({AGENT: ("a gap", 12.0), "unseen-agent": ("lost", 13.0)})
    view = store.view.agent(AGENT)
    assert view is not None and (view.resync_pending, view.resync_requested_at) == ("a gap", 12.0)
    assert store.view.agent("unseen-agent") is None
    store.publish_view([AGENT])  # a batch of the apply thread keeps the marks
    view = store.view.agent(AGENT)
    assert view is not None and view.resync_pending == "a gap"
    store.mark_resyncs({})
    view = store.view.agent(AGENT)
    assert view is not None and view.resync_pending is None
