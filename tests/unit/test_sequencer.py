"""The ordering policy, case by case: every verdict and every boundary of `sequence`."""

from __future__ import annotations

import pytest

from agent_client import AgentStatusRecord, ChangeRecord, RelayRecord, RelayRow, TableLayout
from replicator.sequencer import Position, RecordHeader, Verdict, sequence

AGENT = "agent-1"


def changes(first: int, last: int, *, epoch: str | None = "e1", final: bool = True) -> RecordHeader:
    return RecordHeader(AGENT, AGENT, "changes", epoch, first, last, final)


REQUEST = "0123456789abcdef0123456789abcdef"


def resync(first: int, last: int, *, epoch: str | None = "e1", final: bool = True) -> RecordHeader:
    return RecordHeader(AGENT, AGENT, "changes", epoch, first, last, final, REQUEST)


def at(watermark: int, *, epoch: str | None = "e1", open_group: bool = False, blocked: bool = False) -> Position:
    return Position(epoch=epoch, watermark=watermark, open_group=open_group, blocked=blocked, retired=frozenset({"e0"}))


# ---------------------------------------------------------------- dead letters and relay records
def test_a_record_from_another_agent_is_a_dead_letter_whatever_the_position() -> None:
    forged = RecordHeader(AGENT, "someone-else", "changes", "e1", 6, 6)
    assert sequence(at(5), forged) is Verdict.DEAD_LETTER
    assert sequence(at(5, blocked=True), forged) is Verdict.DEAD_LETTER
    assert sequence(Position(), RecordHeader(AGENT, "someone-else", "relay")) is Verdict.DEAD_LETTER


@pytest.mark.parametrize("position", [Position(), at(5), at(5, open_group=True), at(5, blocked=True)])
def test_relay_records_are_always_applied(position: Position) -> None:
    assert sequence(position, RecordHeader(AGENT, AGENT, "relay")) is Verdict.APPLY


# ---------------------------------------------------------------- epochs
def test_the_first_record_of_a_new_agent_starts_its_epoch() -> None:
    assert sequence(Position(), changes(1, 3)) is Verdict.NEW_EPOCH


def test_a_new_epoch_must_start_at_its_first_change() -> None:
    assert sequence(Position(), changes(2, 3)) is Verdict.GAP
    assert sequence(at(9), changes(2, 3, epoch="e2")) is Verdict.GAP
    assert sequence(at(9, blocked=True), changes(2, 3, epoch="e2")) is Verdict.BLOCKED


def test_a_new_epoch_replaces_the_current_one() -> None:
    assert sequence(at(9), changes(1, 1, epoch="e2")) is Verdict.NEW_EPOCH
    assert sequence(at(9, open_group=True), changes(1, 1, epoch="e2")) is Verdict.NEW_EPOCH
    assert sequence(at(9, blocked=True), changes(1, 1, epoch="e2")) is Verdict.NEW_EPOCH


def test_records_of_a_retired_epoch_are_stale() -> None:
    assert sequence(at(9), changes(1, 1, epoch="e0")) is Verdict.STALE_EPOCH
    assert sequence(at(9), changes(7, 8, epoch="e0")) is Verdict.STALE_EPOCH
    assert sequence(at(9, blocked=True), changes(7, 8, epoch="e0")) is Verdict.STALE_EPOCH


def test_without_a_current_epoch_nothing_is_stale() -> None:
    fresh = Position(retired=frozenset({"e0"}))
    assert sequence(fresh, changes(1, 1, epoch="e0")) is Verdict.NEW_EPOCH
    assert sequence(fresh, changes(3, 4, epoch="e0")) is Verdict.GAP


def test_a_record_without_epoch_differs_from_the_current_one() -> None:
    assert sequence(at(3), changes(1, 1, epoch=None)) is Verdict.NEW_EPOCH
    assert sequence(at(3, epoch=None), changes(4, 4, epoch=None)) is Verdict.APPLY


# ---------------------------------------------------------------- within an epoch
@pytest.mark.parametrize(
    ("first", "last", "verdict"),
    [
        (1, 1, Verdict.DUPLICATE),
        (3, 5, Verdict.DUPLICATE),  # last_seq == watermark
        (5, 5, Verdict.DUPLICATE),
        (6, 6, Verdict.APPLY),  # first_seq == watermark + 1
        (6, 9, Verdict.APPLY),
        (4, 6, Verdict.APPLY),  # overlaps the watermark: the part above it is applied
        (1, 6, Verdict.APPLY),
        (7, 7, Verdict.GAP),  # first_seq == watermark + 2
        (50, 60, Verdict.GAP),
    ],
)
def test_sequence_within_the_current_epoch(first: int, last: int, verdict: Verdict) -> None:
    assert sequence(at(5), changes(first, last)) is verdict


def test_a_gap_behind_a_dead_letter_is_blocked() -> None:
    assert sequence(at(5, blocked=True), changes(7, 7)) is Verdict.BLOCKED
    # Blocked changes nothing else: the next record, duplicates and new epochs are judged as usual.
    assert sequence(at(5, blocked=True), changes(6, 6)) is Verdict.APPLY
    assert sequence(at(5, blocked=True), changes(5, 5)) is Verdict.DUPLICATE


def test_the_final_flag_does_not_change_the_verdict() -> None:
    assert sequence(at(5), changes(6, 6, final=False)) is Verdict.APPLY
    assert sequence(at(5), changes(8, 8, final=False)) is Verdict.GAP


# ---------------------------------------------------------------- inside an open multi-part transaction
@pytest.mark.parametrize(
    ("first", "last", "verdict"),
    [
        (6, 6, Verdict.APPLY),  # only the next part follows
        (6, 8, Verdict.APPLY),
        (5, 5, Verdict.DUPLICATE),  # a part already applied
        (1, 5, Verdict.DUPLICATE),
        (4, 6, Verdict.GAP),  # overlapping is not the next part
        (5, 6, Verdict.GAP),
        (7, 7, Verdict.GAP),
        (7, 9, Verdict.GAP),
    ],
)
def test_sequence_inside_an_open_group(first: int, last: int, verdict: Verdict) -> None:
    assert sequence(at(5, open_group=True), changes(first, last)) is verdict


def test_a_gap_inside_an_open_group_behind_a_dead_letter_is_blocked() -> None:
    assert sequence(at(5, open_group=True, blocked=True), changes(4, 6)) is Verdict.BLOCKED
    assert sequence(at(5, open_group=True, blocked=True), changes(1, 5)) is Verdict.DUPLICATE


# ---------------------------------------------------------------- headers from records
def test_header_of_a_change_record() -> None:
    layout = TableLayout(table="t", columns=["id"], pk=["id"], sql="CREATE TABLE t (id INTEGER PRIMARY KEY)")
    rec = ChangeRecord(
        agent_id=AGENT,
        epoch="e9e9e9e9",
        first_seq=3,
        last_seq=4,
        final=False,
        committed_at=1.0,
        layouts={"0": layout},
        changes=[(3, "S", 0, []), (4, "U", 0, [1])],
    )
    assert RecordHeader.of("subject-agent", rec) == RecordHeader(
        "subject-agent", AGENT, "changes", "e9e9e9e9", 3, 4, False
    )


def test_header_of_a_relay_record() -> None:
    rec = RelayRecord(agent_id=AGENT, rows=[RelayRow(table="t", data={"id": 1})])
    assert RecordHeader.of(AGENT, rec) == RecordHeader(AGENT, AGENT, "relay")


def test_verdicts_are_exhaustive() -> None:
    assert {v.name for v in Verdict} == {
        "APPLY",
        "NEW_EPOCH",
        "DUPLICATE",
        "STALE_EPOCH",
        "GAP",
        "BLOCKED",
        "DEAD_LETTER",
        "RESYNC",
        "STATUS",
    }


# ---------------------------------------------------------------- resync records
@pytest.mark.parametrize(
    "position",
    [at(5), at(5, blocked=True), at(5, open_group=True), at(5, open_group=True, blocked=True)],
)
def test_a_resync_above_the_watermark_is_applied_whatever_came_before(position: Position) -> None:
    # Right after the watermark, far above it (a gap that never filled), behind a dead letter, in an open group.
    for first in (6, 7, 500):
        assert sequence(position, resync(first, first + 3)) is Verdict.RESYNC
        assert sequence(position, resync(first, first, final=False)) is Verdict.RESYNC


def test_a_resync_of_a_new_or_unknown_epoch_is_applied_from_wherever_it_starts() -> None:
    assert sequence(Position(), resync(40, 50, epoch="e2")) is Verdict.RESYNC  # a lost central copy
    assert sequence(at(5), resync(40, 50, epoch="e2")) is Verdict.RESYNC  # a new database, its start aged out
    assert sequence(at(5, blocked=True), resync(1, 3, epoch="e2")) is Verdict.RESYNC


def test_a_resync_of_a_retired_epoch_is_stale() -> None:
    assert sequence(at(5), resync(40, 50, epoch="e0")) is Verdict.STALE_EPOCH


def test_a_resync_at_or_below_the_watermark_was_applied_before() -> None:
    assert sequence(at(9), resync(6, 9)) is Verdict.DUPLICATE  # redelivered after its commit
    assert sequence(at(9), resync(9, 9)) is Verdict.DUPLICATE
    assert sequence(at(9, open_group=True), resync(6, 9)) is Verdict.DUPLICATE  # a part already applied


def test_status_records_are_never_sequenced() -> None:
    status = RecordHeader(AGENT, AGENT, "status", "e1")
    for position in (Position(), at(5), at(5, blocked=True), at(5, open_group=True)):
        assert sequence(position, status) is Verdict.STATUS
    assert sequence(at(5), RecordHeader(AGENT, "someone-else", "status", "e1")) is Verdict.DEAD_LETTER


def test_header_of_a_resync_record_carries_its_request() -> None:
    layout = TableLayout(table="t", columns=["id"], pk=["id"], sql="CREATE TABLE t (id INTEGER PRIMARY KEY)")
    rec = ChangeRecord(
        agent_id=AGENT,
        epoch="e9e9e9e9",
        first_seq=7,
        last_seq=9,
        committed_at=1.0,
        layouts={"3": layout},
        changes=[(7, "R", 0, [REQUEST]), (8, "S", 3, []), (9, "U", 3, [1])],
    )
    assert RecordHeader.of(AGENT, rec) == RecordHeader(AGENT, AGENT, "changes", "e9e9e9e9", 7, 9, True, REQUEST)


def test_header_of_a_status_record() -> None:
    rec = AgentStatusRecord(agent_id=AGENT, epoch="e9e9e9e9", last_seq=5, acked_seq=4, log_bytes=0, at=1.0)
    assert RecordHeader.of(AGENT, rec) == RecordHeader(AGENT, AGENT, "status", "e9e9e9e9")
