"""ReplicaState: every field comes back after a failed record (savepoint) or a rolled-back transaction."""

from __future__ import annotations

from dataclasses import fields

import pytest

from replicator.central_schema import TableMeta
from replicator.replica_state import ReplicaState
from replicator.sequencer import Position

T1 = TableMeta("t1", "agent", "always", ("id",), ("INTEGER",), ("id",), "CREATE TABLE t1 (id INTEGER PRIMARY KEY)")
T2 = TableMeta("t2", "relay", "always", ("id", "x"), ("", ""), ("id",), None)


def populated() -> ReplicaState:
    return ReplicaState(
        epoch="aaaaaaaa",
        watermark=10,
        head_seq=12,
        committed_at=100.0,
        applied_at=101.0,
        last_seen=102.0,
        records_applied=3,
        changes_applied=10,
        blocked=None,
        tables={"t1": T1},
        retired=frozenset({"00000000"}),
        open_group=False,
        group_started=0.0,
    )


def mutate(state: ReplicaState) -> None:
    """Change every field (the test below checks that this really touches them all)."""
    state.epoch = "bbbbbbbb"
    state.watermark = 99
    state.head_seq = 120
    state.committed_at = 200.0
    state.applied_at = 201.0
    state.last_seen = 202.0
    state.records_applied += 1
    state.changes_applied += 5
    state.blocked = "changes 11-11 dead-lettered"
    state.tables["t2"] = T2
    del state.tables["t1"]
    state.retired = state.retired | {"aaaaaaaa"}
    state.open_group = True
    state.group_started = 55.0
    state.ahead += 3
    state.ahead_since = 300.0
    state.last_resync = "0123456789abcdef0123456789abcdef"
    state.resyncs += 1
    state.agent_epoch = "cccccccc"
    state.agent_last_seq = 130
    state.agent_acked_seq = 125
    state.agent_blocked = "cannot send change 126"
    state.agent_reported_at = 400.0
    state.feed_id = "0123456789abcdef"
    state.feed_n = 77
    state.feed_floor = 70
    state.feed_rows = 7
    state.feed_bytes = 700
    state.feed_open = True
    state.feed_quiet = True


def test_mutate_changes_every_field() -> None:
    before, after = populated(), populated()
    mutate(after)
    unchanged = [f.name for f in fields(ReplicaState) if getattr(before, f.name) == getattr(after, f.name)]
    assert unchanged == []


def test_savepoint_restores_every_field_after_an_exception() -> None:
    state = populated()
    with pytest.raises(RuntimeError), state.savepoint():
        mutate(state)
        raise RuntimeError("record rejected")
    assert state == populated()


def test_savepoint_keeps_the_changes_without_an_exception() -> None:
    state, expected = populated(), populated()
    with state.savepoint():
        mutate(state)
    mutate(expected)
    assert state == expected


def test_restored_tables_are_not_the_mapping_mutated_inside() -> None:
    state = populated()
    with pytest.raises(RuntimeError), state.savepoint():
        tables = state.tables
        tables["t2"] = T2
        raise RuntimeError
    tables.pop("t1")  # the mapping used inside the failed block is no longer the state's
    assert state.tables == {"t1": T1}


def test_nested_savepoints_restore_only_their_own_part() -> None:
    state = populated()
    with state.savepoint():
        state.watermark = 11
        state.records_applied = 4
        with pytest.raises(ValueError), state.savepoint():
            state.watermark = 12
            state.blocked = "later"
            state.tables["t2"] = T2
            raise ValueError
        assert (state.watermark, state.records_applied, state.blocked, state.tables) == (11, 4, None, {"t1": T1})
    assert (state.watermark, state.records_applied) == (11, 4)


def test_an_outer_savepoint_undoes_an_inner_success() -> None:
    state = populated()
    with pytest.raises(KeyError), state.savepoint():
        with state.savepoint():
            mutate(state)
        raise KeyError
    assert state == populated()


def test_rollback_restores_the_begin_time_state() -> None:
    state = populated()
    state.begin()
    assert state.in_transaction
    mutate(state)
    state.rollback()
    assert not state.in_transaction
    assert state == populated()


def test_begin_inside_an_open_transaction_keeps_the_first_begin() -> None:
    state = populated()
    state.begin()
    state.watermark = 11
    state.begin()  # a later batch of the same open multi-part transaction
    state.watermark = 12
    state.rollback()
    assert state.watermark == 10


def test_commit_makes_the_state_the_one_rollback_returns_to() -> None:
    state = populated()
    state.begin()
    mutate(state)
    state.commit()
    expected = state.copy()
    state.begin()
    state.watermark = 1000
    state.rollback()
    assert state == expected


def test_rollback_outside_a_transaction_changes_nothing() -> None:
    state = populated()
    state.watermark = 11
    state.rollback()
    assert state.watermark == 11


def test_a_failed_savepoint_inside_a_transaction_keeps_the_transaction() -> None:
    state = populated()
    state.begin()
    state.watermark = 11
    with pytest.raises(RuntimeError), state.savepoint():
        state.watermark = 12
        raise RuntimeError
    assert state.in_transaction and state.watermark == 11
    state.rollback()
    assert state == populated()


def test_committed_is_the_begin_time_state_while_a_transaction_is_open() -> None:
    state = populated()
    assert state.committed() is state
    state.begin()
    mutate(state)
    assert state.committed() == populated()
    state.commit()
    assert state.committed() is state


def test_copy_is_independent() -> None:
    state = populated()
    copy = state.copy()
    mutate(state)
    assert copy == populated()


def test_position() -> None:
    state = populated()
    assert state.position() == Position("aaaaaaaa", 10, False, False, frozenset({"00000000"}))
    mutate(state)
    assert state.position() == Position("bbbbbbbb", 99, True, True, frozenset({"00000000", "aaaaaaaa"}))


def test_changes_moved_and_resync_applied_compare_with_the_begin_time_state() -> None:
    state = populated()
    state.begin()
    assert not state.changes_moved() and state.resync_applied() is None
    state.agent_reported_at = 500.0  # a status report is not a change
    state.records_applied += 1  # nor a relay write
    assert not state.changes_moved()
    state.watermark = 11
    assert state.changes_moved()
    state.last_resync, state.resyncs = "ab" * 16, state.resyncs + 1
    assert state.resync_applied() == "ab" * 16
    state.commit()
    assert not state.changes_moved() and state.resync_applied() is None


def test_abandoning_a_group_goes_back_to_its_first_part_and_keeps_what_came_before() -> None:
    state = populated()
    state.begin()
    state.watermark = 11  # a whole record before the multi-part transaction
    state.begin_group()
    assert state.in_group
    mutate(state)  # its parts
    state.abandon_group()
    assert not state.in_group and state.in_transaction
    assert state.watermark == 11 and state.tables == {"t1": T1}
    state.rollback()
    assert state == populated()


def test_a_finished_group_or_an_ended_transaction_leaves_nothing_to_abandon() -> None:
    state = populated()
    state.begin()
    state.begin_group()
    state.watermark = 12
    state.end_group()
    state.abandon_group()  # nothing to go back to
    assert state.watermark == 12
    state.begin_group()
    state.rollback()
    assert not state.in_group and state == populated()
    state.begin()
    state.begin_group()
    state.commit()
    assert not state.in_group
