"""The consumer's apply thread on real SQLite files (no NATS): what it finds for the resync coordinator, how a
resync record and a rejected part of a multi-part transaction are carried out, status records, the apply
delay, and retrying or discarding dead letters read from the stored payload."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import AgentStatusRecord, ChangeRecord, RelayRecord, RelayRow, TableLayout, encode_record
from replicator.central_store import CentralStore
from replicator.consumer import Consumer, _Item
from replicator.data_dir import DataDir
from replicator.dead_letters import DeadLetterStore
from replicator.errors import DeadLetterNotFound

AGENT = "unit-agent"
SUBJECT = f"agents.{AGENT}.changes"
EPOCH = "aaaaaaaa"
REQUEST = "0123456789abcdef0123456789abcdef"
ITEMS = TableLayout(
    table="items", columns=["id", "name"], pk=["id"], types=["INTEGER", "TEXT"], sql="CREATE TABLE items (...)"
)


class Listener:
    """Collects what the consumer tells the coordinator."""

    def __init__(self) -> None:
        self.wanted: list[tuple[str, str]] = []
        self.applied: list[tuple[str, str | None]] = []
        self.rejected: list[tuple[str, str, str]] = []
        self.seen: list[Collection[str]] = []
        self.requests: list[tuple[str, str, str]] = []

    def resync_wanted(self, agent_id: str, reason: str) -> None:
        self.wanted.append((agent_id, reason))

    def resync_applied(self, agent_id: str, request_id: str | None) -> None:
        self.applied.append((agent_id, request_id))

    def resync_rejected(self, agent_id: str, request_id: str, reason: str) -> None:
        self.rejected.append((agent_id, request_id, reason))

    def agents_seen(self, agents: Collection[str]) -> None:
        self.seen.append(agents)

    async def request(self, agent_id: str, reason: str, *, by: str = "operator") -> dict[str, Any]:
        self.requests.append((agent_id, reason, by))
        return {"agent_id": agent_id, "request_id": "r" * 32, "state": "pending"}


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Consumer, CentralStore, DeadLetterStore, Listener]]:
    store = CentralStore(DataDir(tmp_path))
    dead = DeadLetterStore(tmp_path / "dl.db")
    consumer = Consumer(None, store, dead, resync_after=5.0)  # type: ignore[arg-type]  # js: never used here
    listener = Listener()
    consumer.resyncs = listener
    try:
        yield consumer, store, dead, listener
    finally:
        consumer._executor.shutdown()
        store.close()
        dead.close()


def change(first: int, changes: list[tuple[str, list[Any]]], *, final: bool = True, resync: bool = False) -> bytes:
    ops: list[tuple[int, str, int, list[Any]]] = []
    if resync:
        ops.append((first, "R", 0, [REQUEST]))
    ops += [(first + len(ops) + i, op, 1, values) for i, (op, values) in enumerate(changes)]
    rec = ChangeRecord(
        agent_id=AGENT,
        epoch=EPOCH,
        first_seq=first,
        last_seq=first + len(ops) - 1,
        final=final,
        committed_at=100.0,
        layouts={"1": ITEMS},
        changes=ops,
    )
    return encode_record(rec)


def run(consumer: Consumer, listener: Listener, *datas: bytes, start: int = 1) -> list[str]:
    """Process one batch on this thread, hand its events over like the event loop does; the actions."""
    items = [_Item(SUBJECT, d, start + i) for i, d in enumerate(datas)]
    result = consumer._process_batch(items)
    consumer._deliver(result.events)
    return [action.value for action, _agent in result.actions]


def items_rows(store: CentralStore) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{store.path_for(AGENT)}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id, name FROM items ORDER BY id").fetchall()
    finally:
        conn.close()


def started(consumer: Consumer, listener: Listener) -> None:
    assert run(consumer, listener, change(1, [("S", []), ("U", [1, "one"]), ("U", [2, "two"])])) == ["ack"]


def test_a_dead_letter_in_the_sequence_blocks_the_agent_and_wants_a_resync(parts: Any) -> None:
    consumer, store, dead, listener = parts
    started(consumer, listener)
    assert run(consumer, listener, change(4, [("U", [3, True])]), start=10) == ["term"]  # a boolean: rejected
    view = store.view.agent(AGENT)
    assert view is not None and view.blocked is not None and "changes 4-4 dead-lettered" in view.blocked
    assert listener.wanted == [(AGENT, view.blocked)] and dead.total() == 1


def test_a_resync_record_replaces_the_copy_and_is_reported_when_committed(parts: Any) -> None:
    consumer, store, _dead, listener = parts
    started(consumer, listener)
    run(consumer, listener, change(4, [("U", [3, True])]), start=10)  # blocked
    later = change(5, [("U", [9, "nine"])])
    assert run(consumer, listener, later, start=11) == ["ack"]  # remembered ahead of its turn (acked)
    fresh = change(6, [("S", []), ("U", [1, "uno"]), ("U", [5, "cinco"])], resync=True)
    assert run(consumer, listener, fresh, start=12) == ["ack"]
    assert listener.applied == [(AGENT, REQUEST)]
    assert items_rows(store) == [(1, "uno"), (5, "cinco")]
    view = store.view.agent(AGENT)
    assert view is not None and (view.blocked, view.watermark, view.resyncs, view.waiting) == (None, 9, 1, 0)


def test_a_rejected_part_of_a_resync_takes_the_whole_resync_back_and_is_reported(parts: Any) -> None:
    consumer, store, _dead, listener = parts
    started(consumer, listener)
    first = change(4, [("S", []), ("U", [7, "seven"])], final=False, resync=True)
    bad = change(7, [("U", [8, True])], final=False)
    assert run(consumer, listener, first, bad) == ["ack", "term"]  # the first part: undone, dropped with the commit
    assert listener.rejected and listener.rejected[0][:2] == (AGENT, REQUEST)
    assert items_rows(store) == [(1, "one"), (2, "two")]  # the old copy, whole
    view = store.view.agent(AGENT)
    assert view is not None and view.watermark == 3 and view.blocked and REQUEST in view.blocked
    assert run(consumer, listener, change(8, [("U", [9, "nine"])]), start=5) == ["ack"]  # later: waits ahead
    assert store.replicas[AGENT].state.ahead == 1 and not store.replicas[AGENT].in_txn


def test_a_rejected_part_of_a_transaction_keeps_the_records_before_it(parts: Any) -> None:
    consumer, store, _dead, listener = parts
    started(consumer, listener)
    whole = change(4, [("U", [4, "four"])])
    part1 = change(5, [("U", [5, "five"])], final=False)
    part2 = change(6, [("U", [6, True])], final=False)
    assert run(consumer, listener, whole, part1, part2) == ["ack", "ack", "term"]
    assert items_rows(store) == [(1, "one"), (2, "two"), (4, "four")]
    assert "changes 6-6 dead-lettered" in (store.view.agent(AGENT).blocked or "")
    assert len(listener.wanted) == 1 and listener.rejected == []


def test_status_records_are_kept_not_sequenced_and_not_an_apply_delay(parts: Any) -> None:
    consumer, store, _dead, listener = parts
    started(consumer, listener)
    observed = consumer.stats.apply_delay.snapshot().count
    status = AgentStatusRecord(agent_id=AGENT, epoch=EPOCH, last_seq=9, acked_seq=3, blocked="x", log_bytes=5, at=9.0)
    assert run(consumer, listener, encode_record(status)) == ["ack"]
    relay = RelayRecord(agent_id=AGENT, rows=[RelayRow(table="notes", data={"id": 1})])
    assert run(consumer, listener, encode_record(relay)) == ["term"]  # a relay record on a changes subject
    view = store.view.agent(AGENT)
    assert view is not None and (view.agent_blocked, view.agent_last_seq, view.agent_reported_at) == ("x", 9, 9.0)
    assert view.watermark == 3 and consumer.stats.statuses == 1
    assert consumer.stats.apply_delay.snapshot().count == observed  # only commits that applied change records count
    run(consumer, listener, change(4, [("U", [4, "four"])]))
    assert consumer.stats.apply_delay.snapshot().count == observed + 1


def test_a_gap_that_does_not_fill_wants_a_resync_once_after_resync_after(parts: Any) -> None:
    consumer, _store, _dead, listener = parts
    started(consumer, listener)
    run(consumer, listener, change(9, [("U", [9, "nine"])]), start=20)  # changes 4-8 missing
    assert consumer._stuck_scan(100.0, False).wanted == []  # first seen now
    assert consumer._stuck_scan(104.0, False).wanted == []
    (wanted,) = consumer._stuck_scan(105.5, False).wanted
    assert wanted[0] == AGENT and "wait for an earlier change" in wanted[1]
    assert consumer._stuck_scan(200.0, False).wanted == []  # asked once for this state


def test_an_agent_reporting_what_the_stream_no_longer_delivers_wants_a_resync_when_idle(parts: Any) -> None:
    consumer, _store, _dead, listener = parts
    started(consumer, listener)
    status = AgentStatusRecord(agent_id=AGENT, epoch=EPOCH, last_seq=50, acked_seq=50, log_bytes=0, at=1.0)
    run(consumer, listener, encode_record(status))
    assert consumer._stuck_scan(0.0, False).wanted == [] and consumer._stuck_scan(10.0, False).wanted == []
    assert consumer._stuck_scan(20.0, True).wanted == []  # idle from now on
    (wanted,) = consumer._stuck_scan(26.0, True).wanted
    assert "reports change 50" in wanted[1]


async def test_retry_applies_a_stored_dead_letter_and_removes_it(parts: Any) -> None:
    consumer, store, dead, listener = parts
    started(consumer, listener)
    letter = dead.add(
        agent_id=AGENT, subject=SUBJECT, stream_seq=None, reason="r", payload=change(4, [("U", [4, "x"])])
    )
    answer = await consumer.retry_dead_letter(letter)
    assert answer["outcome"] == "applied" and answer["read_from"] == "stored"
    assert items_rows(store)[-1] == (4, "x") and dead.total() == 0
    with pytest.raises(DeadLetterNotFound):
        await consumer.retry_dead_letter(letter)


async def test_retry_that_fails_again_keeps_the_dead_letter_with_the_new_reason(parts: Any) -> None:
    consumer, _store, dead, listener = parts
    started(consumer, listener)
    letter = dead.add(
        agent_id=AGENT, subject=SUBJECT, stream_seq=None, reason="old", payload=change(4, [("U", [4, True])])
    )
    answer = await consumer.retry_dead_letter(letter)
    assert answer["outcome"] == "failed" and answer["dead_letter"] == letter
    assert dead.total() == 1 and dead.get(letter).reason != "old" and "bad value" in dead.get(letter).reason


async def test_discard_of_a_change_in_the_sequence_requests_a_resync(parts: Any) -> None:
    consumer, _store, dead, listener = parts
    started(consumer, listener)
    missing = dead.add(
        agent_id=AGENT, subject=SUBJECT, stream_seq=None, reason="r", payload=change(4, [("U", [4, True])])
    )
    answer = await consumer.discard_dead_letter(missing)
    assert answer["discarded"] == missing and answer["resync"]["agent_id"] == AGENT
    assert "resync" in answer["consequence"] and listener.requests[0][0] == AGENT and dead.total() == 0
    covered = dead.add(agent_id=AGENT, subject=SUBJECT, stream_seq=None, reason="r", payload=change(2, [("U", [2, 1])]))
    answer = await consumer.discard_dead_letter(covered)
    assert answer["resync"] is None and "already covered" in answer["consequence"]
    junk = dead.add(agent_id=AGENT, subject=SUBJECT, stream_seq=None, reason="bad json", payload=b"{nope")
    answer = await consumer.discard_dead_letter(junk)
    assert answer["resync"] is None and "not a record" in answer["consequence"] and len(listener.requests) == 1


def test_an_agent_over_its_cap_of_held_records_or_with_one_gone_from_the_stream_wants_a_resync(parts: Any) -> None:
    consumer, store, _dead, listener = parts
    consumer.max_held_per_agent = 3
    started(consumer, listener)
    gaps = [change(10 + i, [("U", [10 + i, "x"])]) for i in range(5)]
    assert run(consumer, listener, *gaps, start=30) == ["ack", "ack", "ack", "term", "term"]
    (wanted,) = listener.wanted
    assert "over 3 records wait" in wanted[1] and store.view.agent(AGENT).blocked == wanted[1]
    listener.wanted.clear()
    result = consumer._process_batch([_Item("", b"", 30, None, ahead=True, gone=AGENT)])
    consumer._deliver(result.events)
    (wanted,) = listener.wanted
    assert "gone from the stream" in wanted[1] and store.replicas[AGENT].state.ahead == 2
