"""The status view: built from a hand-made StoreView, dead-letter counts and consumer counters."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from replicator.consumer import ConsumerStats
from replicator.metrics import render_metrics
from replicator.status import ResyncCounts, Status
from replicator.store_view import AgentView, StoreView, TableView
from replicator.stream_watch import AgentReport, Progress, PublishedPosition, StreamFacts

NOW = 1_000_000.0


def _table(name: str, visibility: str = "always", source: str = "agent") -> TableView:
    return TableView(name, source, visibility, ("id",), ("INTEGER",), ("id",), None)


def _agent(agent_id: str, *, watermark: int, head_seq: int, blocked: str | None = None) -> AgentView:
    tables = {t.name: t for t in (_table("notes"), _table("cache", "on_demand"), _table("alerts", source="relay"))}
    return AgentView(
        agent_id=agent_id,
        path=Path(f"/data/agents/{agent_id}.db"),
        epoch="e1",
        watermark=watermark,
        head_seq=head_seq,
        committed_at=NOW - 2.5,
        applied_at=NOW - 2.0,
        last_seen=NOW - 1.25,
        records_applied=watermark,
        changes_applied=watermark * 2,
        blocked=blocked,
        tables=MappingProxyType(tables),
    )


def _status(*, nats: bool = True, running: bool = True) -> Status:
    view = StoreView(
        MappingProxyType(
            {
                "b-agent": _agent("b-agent", watermark=4, head_seq=9, blocked="changes 5-5 dead-lettered"),
                "a-agent": _agent("a-agent", watermark=7, head_seq=7),
            }
        )
    )
    return Status(
        view=view,
        dead_letters={"b-agent": 2, None: 1},
        nats_connected=nats,
        nats_url="nats://127.0.0.1:4222",
        consumer_running=running,
        consumer=ConsumerStats(messages=11, applied=10, dead_letters=3),
        relay_published=5,
        now=NOW,
    )


def test_agents_in_id_order_with_lag_dead_letters_and_blocked() -> None:
    agents = _status().agents()
    assert [a["agent_id"] for a in agents] == ["a-agent", "b-agent"]
    a, b = agents
    assert (a["lag_changes"], a["dead_letters"], a["blocked"]) == (0, 0, None)
    assert (b["lag_changes"], b["dead_letters"], b["blocked"]) == (5, 2, "changes 5-5 dead-lettered")
    assert b["tables"] == {"always": ["alerts", "notes"], "on_demand": ["cache"]}
    assert b["replication_delay_s"] == 0.5 and b["seconds_since_seen"] == 1.25
    assert b["last_applied_at"] == NOW - 2.0 and b["head_seq"] == 9 and b["watermark"] == 4
    assert (a["state"], b["state"]) == ("ok", "blocked")
    assert list(b) == [
        "agent_id",
        "state",
        "epoch",
        "watermark",
        "head_seq",
        "lag_changes",
        "replication_delay_s",
        "last_applied_at",
        "last_seen",
        "seconds_since_seen",
        "records_applied",
        "changes_applied",
        "tables",
        "dead_letters",
        "blocked",
        "waiting_records",
        "waiting_since",
        "published_seq",
        "published_epoch",
        "new_epoch",
        "behind_for_s",
        "last_committed_at",
        "agent_blocked",
        "agent_last_seq",
        "agent_reported_at",
        "resync_pending",
        "resync_requested_at",
        "resyncs",
    ]


def test_one_agent() -> None:
    status = _status()
    assert status.agent("b-agent") == status.agents()[1]
    assert status.agent("nobody") is None


def test_each_agent_has_one_state_word() -> None:
    """blocked > stuck > lagging > idle > ok; stuck is the rule /health names ("has not moved")."""
    plain = _agent("a", watermark=7, head_seq=7)

    def state(agent: AgentView, facts: StreamFacts | None = None) -> str:
        entry = _one(agent, facts or _facts()).agent(agent.agent_id)
        assert entry is not None
        return str(entry["state"])

    assert state(plain) == "ok"
    published = PublishedPosition("e1", 12, 40, NOW - 50.0, first_seq=8)

    def behind(for_s: float) -> StreamFacts:
        return _facts(
            published=MappingProxyType({"a": published}),
            progress=MappingProxyType({"a": Progress("e1", 7, 5, NOW - for_s, published)}),
        )

    assert state(plain, behind(10.0)) == "lagging"  # behind for 10 s < stuck_after 30 s
    stuck = _one(plain, behind(31.0))
    assert stuck.agents()[0]["state"] == "stuck" and "has not moved for 31s" in stuck.problems[0]
    assert state(replace(plain, blocked="changes 8-8 dead-lettered"), behind(31.0)) == "blocked"
    assert state(replace(plain, agent_blocked="row 4: bad text", agent_reported_at=NOW - 9)) == "blocked"
    # Nothing to apply and no record for 10 min: idle (the HTPC cannot know it is switched off).
    assert state(replace(plain, last_seen=NOW - 599.0)) == "ok"
    assert state(replace(plain, last_seen=NOW - 600.0)) == "idle"
    assert state(replace(plain, last_seen=NOW - 3600.0), behind(10.0)) == "lagging"  # behind is not idle
    fresh = AgentView("new", Path("/x"), None, 0, 0, None, None, None, 0, 0, None)
    assert Status(view=StoreView(MappingProxyType({"new": fresh})), now=NOW).agents()[0]["state"] == "idle"


def test_an_agent_never_applied_has_no_delay_or_age() -> None:
    fresh = AgentView("new", Path("/x"), None, 0, 0, None, None, None, 0, 0, None)
    entry = Status(view=StoreView(MappingProxyType({"new": fresh})), now=NOW).agents()[0]
    assert entry["replication_delay_s"] is None and entry["seconds_since_seen"] is None
    assert entry["tables"] == {"always": [], "on_demand": []}


def test_health_degraded_while_an_agent_is_blocked() -> None:
    health = _status().health()
    assert health["status"] == "degraded"
    assert health["problems"] == ["agent b-agent is blocked: changes 5-5 dead-lettered"]
    assert health["agents"] == 2
    assert health["dead_letters"] == 3  # the one no agent could be named for counts too
    assert health["blocked_agents"] == {"b-agent": "changes 5-5 dead-lettered"}
    assert health["max_lag_changes"] == 5


def test_health_degraded_without_nats_or_consumer() -> None:
    assert _status(nats=False).health()["status"] == "degraded"
    assert _status(running=False).health()["status"] == "degraded"
    assert Status().health()["status"] == "degraded"
    assert Status().health()["max_lag_changes"] == 0


def test_metrics_render_the_same_view() -> None:
    text = render_metrics(_status())
    assert "replicator_messages_total 11.0" in text
    assert "replicator_records_applied_total 10.0" in text
    assert "replicator_dead_letters 3.0" in text
    assert "replicator_relay_published_total 5.0" in text
    assert 'replicator_agent_lag_changes{agent="b-agent"} 5.0' in text
    assert 'replicator_agent_watermark{agent="a-agent"} 7.0' in text
    assert 'replicator_agent_seconds_since_seen{agent="a-agent"} 1.25' in text
    assert "replicator_consumer_running 1.0" in text


def test_isolation_counters_and_degraded_while_apply_fails() -> None:
    status = replace(
        _status(), apply_failing_since=NOW - 5, dead_letters_pruned=7, queries_refused_busy=3, queries_overran=1
    )
    assert status.health()["status"] == "degraded"
    assert status.health()["consumer"]["apply_failing_since"] == NOW - 5
    text = render_metrics(status)
    for line in (
        "replicator_apply_failing 1.0",
        "replicator_dead_letters_pruned_total 7.0",
        "replicator_queries_refused_busy_total 3.0",
        "replicator_queries_overran_total 1.0",
        'replicator_agent_blocked{agent="b-agent"} 1.0',
        'replicator_agent_blocked{agent="a-agent"} 0.0',
        'replicator_agent_waiting_records{agent="a-agent"} 0.0',
        "replicator_records_over_cap_total 0.0",
        "replicator_foreign_messages_total 0.0",
        "replicator_msg_id_alarms_total 0.0",
    ):
        assert line in text, line
    # every sample has its HELP and TYPE, once (a histogram's samples are its _bucket, _sum and _count)
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    for line in text.splitlines():
        if not line.startswith("#"):
            name = line.split("{")[0].split(" ")[0]
            assert name in names or name.rsplit("_", 1)[0] in names, line


# ----------------------------------------------------------------------------- measured against the stream
def _facts(**kw: object) -> StreamFacts:
    return replace(StreamFacts(updated_at=NOW - 1), **kw)  # type: ignore[arg-type]


def _one(agent: AgentView, facts: StreamFacts | None = None, **kw: object) -> Status:
    status = Status(
        view=StoreView(MappingProxyType({agent.agent_id: agent})),
        nats_connected=True,
        consumer_running=True,
        stream=facts or _facts(),
        stuck_after=30.0,
        now=NOW,
    )
    return replace(status, **kw)  # type: ignore[arg-type]


def test_lag_and_delay_are_measured_against_the_stream() -> None:
    agent = _agent("a", watermark=7, head_seq=7)
    published = PublishedPosition("e1", 12, 40, NOW - 20.0, first_seq=8)
    progress = Progress("e1", 7, 5, NOW - 10.0, published)
    status = _one(
        agent, _facts(published=MappingProxyType({"a": published}), progress=MappingProxyType({"a": progress}))
    )
    entry = status.agent("a")
    assert entry is not None
    assert (entry["lag_changes"], entry["published_seq"], entry["head_seq"]) == (5, 12, 7)
    assert entry["replication_delay_s"] == 20.0  # now - commit time of the oldest unapplied change
    assert entry["behind_for_s"] == 10.0
    assert status.health()["lag"] == {"a": 5} and status.health()["max_lag_changes"] == 5
    assert status.healthy  # behind for 10 s < stuck_after 30 s: not a problem yet


def test_an_agent_behind_and_not_moving_past_stuck_after_is_a_problem() -> None:
    agent = _agent("a", watermark=7, head_seq=7)
    published = PublishedPosition("e2", 5, 40, NOW - 50.0, first_seq=5)  # a new epoch starting at 5
    facts = _facts(
        published=MappingProxyType({"a": published}),
        progress=MappingProxyType({"a": Progress("e1", 7, 5, NOW - 31.0, published)}),
    )
    status = _one(agent, facts)
    assert status.problems == [
        "agent a is 5 changes behind its new epoch, which the HTPC has not started (seq 5) and has not moved for 31s"
    ]
    assert status.health()["status"] == "degraded"
    # The view moved since the watch sampled it: not stuck (the next sample starts counting again).
    assert _one(_agent("a", watermark=8, head_seq=8), facts).problems == []
    # Blocked says it already: one sentence per agent.
    blocked = _one(replace(agent, blocked="changes 8-8 dead-lettered"), facts)
    assert blocked.problems == ["agent a is blocked: changes 8-8 dead-lettered"]


def test_ack_floor_standing_still_with_messages_pending_is_a_problem() -> None:
    agent = _agent("a", watermark=7, head_seq=7)
    facts = _facts(consumer_pending=3, consumer_ack_pending=1, ack_floor=90, ack_floor_since=NOW - 45.0)
    assert _one(agent, facts).problems == [
        "the central store is behind the stream and not moving: 4 messages not acknowledged, "
        "the ack floor at stream seq 90 for 45s"
    ]
    assert _one(agent, replace(facts, ack_floor_since=NOW - 5.0)).problems == []
    assert _one(agent, replace(facts, consumer_pending=0, consumer_ack_pending=0)).problems == []


def test_the_watch_failing_is_a_problem_once_it_lasts() -> None:
    agent = _agent("a", watermark=7, head_seq=7)
    failing = _facts(error="TimeoutError: nats: timeout", failing_since=NOW - 40.0)
    assert _one(agent, failing).problems == ["cannot read stream AGENT_CHANGES for 40s: TimeoutError: nats: timeout"]
    assert _one(agent, replace(failing, failing_since=NOW - 2.0)).problems == []  # a blip is not a problem
    # Without NATS it cannot be read at all: one sentence says so.
    assert _one(agent, failing, nats_connected=False).problems == ["not connected to NATS"]
    # Stale samples are not judged while failing.
    stale = replace(failing, ack_floor=1, consumer_pending=5, ack_floor_since=NOW - 100.0)
    assert len(_one(agent, stale).problems) == 1


def test_an_agent_reporting_it_cannot_send_is_a_problem() -> None:
    stored = replace(_agent("a", watermark=7, head_seq=7), agent_blocked="row 4: bad text", agent_reported_at=NOW - 9)
    assert _one(stored).problems == ["agent a reports it cannot send its changes: row 4: bad text"]
    entry = _one(stored).agent("a")
    assert entry is not None and entry["agent_blocked"] == "row 4: bad text"
    assert _one(stored).health()["agents_reporting_blocked"] == {"a": "row 4: bad text"}
    # A newer status record in the stream (the consumer may be the stuck part) wins over the stored one.
    newer = AgentReport("e1", 7, 7, None, NOW - 1, 50)
    assert _one(stored, _facts(reports=MappingProxyType({"a": newer}))).problems == []
    older = AgentReport("e1", 7, 7, None, NOW - 60, 50)
    assert len(_one(stored, _facts(reports=MappingProxyType({"a": older}))).problems) == 1
    # Only in the stream so far.
    streamed = AgentReport("e1", 7, 7, "publisher stuck", NOW - 1, 50)
    plain = _agent("a", watermark=7, head_seq=7)
    assert _one(plain, _facts(reports=MappingProxyType({"a": streamed}))).problems == [
        "agent a reports it cannot send its changes: publisher stuck"
    ]


def test_a_pending_resync_is_a_problem_saying_how_long() -> None:
    agent = replace(_agent("a", watermark=7, head_seq=7), resync_pending="dead letter 3", resync_requested_at=NOW - 12)
    status = _one(
        agent,
        resyncs=ResyncCounts(started=2, finished=1, failed=0),
        resyncs_pending=({"agent_id": "lost", "reason": "central copy lost", "requested_at": NOW - 4.0},),
    )
    assert status.problems == [
        "agent a: resync requested 12s ago is not finished (dead letter 3)",
        "agent lost: resync requested 4s ago is not finished (central copy lost)",
    ]
    assert status.health()["resyncs"] == {"started": 2, "finished": 1, "failed": 0, "pending": 2}
    text = render_metrics(status)
    for line in (
        "replicator_resyncs_started_total 2.0",
        "replicator_resyncs_finished_total 1.0",
        "replicator_resyncs_failed_total 0.0",
        "replicator_resyncs_pending 2.0",
        'replicator_agent_resync_pending{agent="a"} 1.0',
        'replicator_agent_resync_pending{agent="lost"} 1.0',
    ):
        assert line in text, line


def test_health_keeps_its_keys_and_adds_the_new_ones() -> None:
    health = _status().health()
    assert list(health) == [
        "status",
        "problems",
        "nats",
        "consumer",
        "auth",
        "stream_replicas",
        "agents",
        "dead_letters",
        "blocked_agents",
        "max_lag_changes",
        "agents_reporting_blocked",
        "lag",
        "stream",
        "stuck_after_s",
        "resyncs",
    ]
    assert health["resyncs"] is None  # no coordinator in this status
    assert set(health["stream"]) >= {"messages", "bytes", "first_seq", "last_seq", "consumer_pending", "ack_floor"}


def test_one_sentence_per_agent_whatever_is_wrong_with_it() -> None:
    agent = replace(
        _agent("a", watermark=7, head_seq=7, blocked="changes 8-8 dead-lettered"),
        resync_pending="changes 8-8 dead-lettered",
        resync_requested_at=NOW - 3,
        agent_blocked="row 9: bad text",
        agent_reported_at=NOW - 1,
    )
    assert _one(agent).problems == [
        "agent a is blocked: changes 8-8 dead-lettered; reports it cannot send its changes: row 9: bad text; "
        "its resync requested 3s ago is not finished"
    ]
    other_reason = replace(agent, agent_blocked=None, resync_pending="operator asked")
    assert _one(other_reason).problems == [
        "agent a is blocked: changes 8-8 dead-lettered; its resync requested 3s ago is not finished (operator asked)"
    ]
