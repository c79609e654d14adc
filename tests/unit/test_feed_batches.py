"""How the hub cuts a run of feed units into batches (replicator/feed_hub.py `_collect`): whole units only, and a
burst of large transactions in several batches (live batches are encoded on the event loop)."""

from __future__ import annotations

from agent_client import Change, FeedOffset, UpToDate, decode_feed_message
from replicator.feed_hub import BATCH_MAX_CHANGES, _collect
from replicator.feed_log import FeedRowChange, FeedUnit

FEED = "0123456789abcdef"


def _unit(n: int, rows: int, table: str = "t", *, schema: bool = False) -> FeedUnit:
    changes = tuple(
        FeedRowChange(table, "insert", {"id": n * 100_000 + i}, {"id": n * 100_000 + i}) for i in range(rows)
    )
    return FeedUnit(n, changes, frozenset({table}) if schema else frozenset())


def test_a_burst_of_large_units_is_cut_after_the_unit_that_reaches_the_change_budget() -> None:
    per_unit = BATCH_MAX_CHANGES * 3 // 5  # two units cross the budget
    units = [_unit(n, per_unit) for n in range(1, 6)]
    end = FeedOffset(FEED, 5)
    batch = _collect(units, FeedOffset(FEED, 0), "t", end, True, 1000)
    assert [offset for offset, _m in batch.units] == [f"{FEED}_1", f"{FEED}_2"]
    assert batch.offset == FeedOffset(FEED, 2) and not batch.complete
    rest = _collect(units[2:], batch.offset, "t", end, True, 1000)
    assert [offset for offset, _m in rest.units] == [f"{FEED}_3", f"{FEED}_4"] and not rest.complete
    last = _collect(units[4:], rest.offset, "t", end, True, 1000)
    assert last.offset == end and last.complete
    seen = [decode_feed_message(m) for b in (batch, rest, last) for _o, ms in b.units for m in ms]
    assert len(seen) == 5 * per_unit and all(isinstance(c, Change) for c in seen)
    ids = [c.key["id"] for c in seen if isinstance(c, Change)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # Every unit whole: exactly one `last`, on its final change, all with the unit's offset.
    for b in (batch, rest, last):
        for offset, messages in b.units:
            events = [decode_feed_message(m) for m in messages]
            assert [e.last for e in events if isinstance(e, Change)] == [False] * (per_unit - 1) + [True]
            assert {e.offset for e in events if isinstance(e, Change)} == {offset}
            assert not any(isinstance(e, UpToDate) for e in events)


def test_one_unit_larger_than_the_budget_still_comes_whole() -> None:
    units = [_unit(1, BATCH_MAX_CHANGES * 2), _unit(2, 3)]
    batch = _collect(units, FeedOffset(FEED, 0), "t", FeedOffset(FEED, 2), True, 1000)
    assert len(batch.units) == 1 and len(batch.units[0][1]) == BATCH_MAX_CHANGES * 2
    assert batch.offset == FeedOffset(FEED, 1) and not batch.complete


def test_a_schema_change_ends_the_batch_with_must_refetch_after_the_units_before_it() -> None:
    units = [_unit(1, 2), _unit(2, 0, schema=True), _unit(3, 2)]
    batch = _collect(units, FeedOffset(FEED, 0), "t", FeedOffset(FEED, 3), True, 1000)
    assert [offset for offset, _m in batch.units] == [f"{FEED}_1"]
    assert batch.refetch is not None and batch.offset == FeedOffset(FEED, 1)
