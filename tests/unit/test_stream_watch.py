"""Lag arithmetic and progress tracking of the stream watch: pure functions over hand-made views and facts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import orjson

from replicator.store_view import AgentView, StoreView
from replicator.stream_watch import (
    AgentReport,
    Progress,
    PublishedPosition,
    StreamFacts,
    StreamWatch,
    decode_last,
    measure_lag,
    track_progress,
)

NOW = 2_000_000.0


def _agent(watermark: int = 10, head_seq: int = 10, epoch: str | None = "e1", **kw: object) -> AgentView:
    base = AgentView("a", Path("/x/a.db"), epoch, watermark, head_seq, NOW - 60, NOW - 59, NOW - 59, 1, watermark, None)
    return replace(base, **kw)  # type: ignore[arg-type]


def _pos(last: int, epoch: str = "e1", stream_seq: int = 100, at: float | None = NOW - 30) -> PublishedPosition:
    return PublishedPosition(epoch, last, stream_seq, at, first_seq=last)


def _report(
    last: int | None, acked: int | None = None, epoch: str = "e1", stream_seq: int = 200, blocked: str | None = None
) -> AgentReport:
    return AgentReport(epoch, last, acked, blocked, NOW - 5, stream_seq)


# ----------------------------------------------------------------------------- measure_lag
def test_caught_up_agent_has_no_lag() -> None:
    lag = measure_lag(_agent(), _pos(10), None)
    assert (lag.epoch, lag.published_seq, lag.applied_seq, lag.lag_changes, lag.new_epoch) == ("e1", 10, 10, 0, False)


def test_lag_counts_what_the_stream_holds_beyond_the_watermark() -> None:
    # head_seq says 10 (all the HTPC could apply); the stream holds up to 17.
    assert measure_lag(_agent(), _pos(17), None).lag_changes == 7


def test_lag_counts_what_the_agent_reports_it_committed_even_if_not_in_the_stream() -> None:
    # The agent committed up to 30 but JetStream acknowledged only 12 (it cannot send): lag 20, not 2.
    lag = measure_lag(_agent(), _pos(12), _report(30, acked=12))
    assert (lag.published_seq, lag.lag_changes) == (30, 20)
    # ... also as the consumer stored it (no status record read from the stream yet).
    assert measure_lag(_agent(agent_last_seq=25), _pos(12), None).lag_changes == 15


def test_head_seq_still_counts_when_the_stream_has_nothing() -> None:
    assert measure_lag(_agent(watermark=4, head_seq=9), None, None).lag_changes == 5


def test_a_new_epoch_the_htpc_has_not_started_counts_entirely() -> None:
    # A gap at the start of a new epoch: the stream's newest record is e2 seq 5, central is e1 at 10.
    lag = measure_lag(_agent(), _pos(5, epoch="e2"), None)
    assert (lag.epoch, lag.published_seq, lag.applied_seq, lag.lag_changes, lag.new_epoch) == ("e2", 5, 0, 5, True)
    # Central head_seq / watermark / the agent's old reports belong to e1 and do not count in e2.
    assert measure_lag(_agent(head_seq=40, agent_last_seq=40), _pos(5, epoch="e2"), None).lag_changes == 5
    assert measure_lag(_agent(), _pos(5, epoch="e2"), _report(40, epoch="e1", stream_seq=1)).lag_changes == 5


def test_the_newest_message_decides_the_epoch() -> None:
    # A status record of e2 newer than the last change record of e1: e2 is where the agent is.
    lag = measure_lag(_agent(), _pos(10, stream_seq=100), _report(3, acked=0, epoch="e2", stream_seq=150))
    assert (lag.epoch, lag.lag_changes, lag.new_epoch) == ("e2", 3, True)


def test_a_retired_epoch_is_ignored() -> None:
    agent = _agent(epoch="e2", watermark=3, head_seq=3)
    object.__setattr__(agent, "retired", frozenset({"e1"}))  # B's field, when the store view carries it
    lag = measure_lag(agent, _pos(50, epoch="e1"), None)
    assert (lag.epoch, lag.lag_changes) == ("e2", 0)


def test_an_agent_the_htpc_does_not_know_lags_by_all_it_published() -> None:
    # Central copy lost (or never made): the stream holds e1 up to 8.
    lag = measure_lag(None, _pos(8), None)
    assert (lag.lag_changes, lag.applied_seq, lag.new_epoch) == (8, 0, True)
    assert measure_lag(None, None, None).lag_changes == 0


# ----------------------------------------------------------------------------- track_progress
def _facts(**published: PublishedPosition) -> StreamFacts:
    return StreamFacts(updated_at=NOW, published=MappingProxyType(published))


def _view(*agents: AgentView) -> StoreView:
    return StoreView(MappingProxyType({a.agent_id: a for a in agents}))


def test_behind_since_holds_while_the_central_position_stands_still() -> None:
    first = track_progress({}, _view(_agent()), _facts(a=_pos(12)), NOW)
    assert first["a"].behind_since == NOW and first["a"].lag == 2
    assert first["a"].oldest_unapplied_at == NOW - 30  # the record's commit time
    # 10 s later, more published, nothing applied: still behind since NOW, the lag grows.
    later = track_progress(first, _view(_agent()), _facts(a=_pos(15, stream_seq=101, at=NOW + 9)), NOW + 10)
    assert later["a"].behind_since == NOW and later["a"].lag == 5
    assert later["a"].oldest_unapplied_at == NOW - 30  # still the oldest one known


def test_moving_resets_behind_since_and_catching_up_clears_it() -> None:
    first = track_progress({}, _view(_agent()), _facts(a=_pos(15, at=NOW - 30)), NOW)
    moved = track_progress(first, _view(_agent(watermark=12, head_seq=12)), _facts(a=_pos(15, at=NOW - 30)), NOW + 5)
    assert moved["a"].behind_since == NOW + 5 and moved["a"].lag == 3
    assert moved["a"].oldest_unapplied_at == NOW - 30  # record 15 is still not applied
    done = track_progress(moved, _view(_agent(watermark=15, head_seq=15)), _facts(a=_pos(15)), NOW + 6)
    assert done["a"] == Progress("e1", 15, 0, None)


def test_a_report_without_a_commit_time_is_first_seen_now() -> None:
    facts = replace(_facts(), reports=MappingProxyType({"a": _report(14, acked=10)}))
    got = track_progress({}, _view(_agent()), facts, NOW)
    assert got["a"].lag == 4 and got["a"].oldest_unapplied_at == NOW


def test_agents_only_in_the_stream_are_tracked() -> None:
    got = track_progress({}, _view(), _facts(ghost=_pos(3)), NOW)
    assert got["ghost"].lag == 3 and got["ghost"].behind_since == NOW


# ----------------------------------------------------------------------------- decode_last
def _change(**kw: object) -> bytes:
    body: dict[str, object] = {
        "v": 1,
        "kind": "changes",
        "agent_id": "a",
        "epoch": "0123abcd",
        "first_seq": 4,
        "last_seq": 5,
        "final": True,
        "committed_at": 12.5,
        "layouts": {},
        "changes": [[4, "D", 0, [1]], [5, "D", 0, [2]]],
    }
    body.update(kw)
    return orjson.dumps(body)


def test_decode_a_change_record_header() -> None:
    assert decode_last("a", _change(), 77) == PublishedPosition("0123abcd", 5, 77, 12.5, first_seq=4)


def test_decode_a_status_record() -> None:
    status = {"v": 1, "kind": "status", "agent_id": "a", "epoch": "0123abcd", "last_seq": 9, "acked_seq": 7}
    got = decode_last("a", orjson.dumps({**status, "blocked": "cannot encode row 3", "log_bytes": 1, "at": 3.0}), 8)
    assert got == AgentReport("0123abcd", 9, 7, "cannot encode row 3", 3.0, 8)


def test_decode_skips_what_is_not_the_agents_change_or_status() -> None:
    for data in (
        b"not json",
        b"[1]",
        b'{"stream": "AGENT_CHANGES", "seq": 4}',  # a JetStream acknowledgement stored on the subject
        _change(agent_id="b"),  # another agent's record
        _change(v=2),
        _change(kind="relay"),
        _change(first_seq=6),  # last < first
        _change(last_seq=9),  # its changes do not cover first..last: the consumer dead-letters it
        _change(epoch=None),
        _change(first_seq=True),
    ):
        assert decode_last("a", data, 1) is None, data


# ----------------------------------------------------------------------------- the watch itself
async def test_a_watch_without_a_connection_records_the_error_and_keeps_its_numbers() -> None:
    watch = StreamWatch(lambda: None, "replicator", lambda: [], stuck_after=3)
    assert watch.interval == 1.0  # three looks within stuck_after
    watch.facts = StreamFacts(updated_at=NOW, messages=5)
    facts = await watch.refresh()
    assert facts.error is not None and "no JetStream connection" in facts.error
    assert facts.messages == 5 and facts.updated_at == NOW and facts.failing_since is not None
    again = await watch.refresh()
    assert again.failing_since == facts.failing_since  # failing since the first failure in a row
