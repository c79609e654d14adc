"""The status view: built from a hand-made StoreView, dead-letter counts and consumer counters."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from replicator.consumer import ConsumerStats
from replicator.metrics import render_metrics
from replicator.status import Status
from replicator.store_view import AgentView, StoreView, TableView

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
    assert list(b) == [
        "agent_id",
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
    ]


def test_one_agent() -> None:
    status = _status()
    assert status.agent("b-agent") == status.agents()[1]
    assert status.agent("nobody") is None


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
    from dataclasses import replace

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
    # every sample has its HELP and TYPE, once
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))
    for line in text.splitlines():
        if not line.startswith("#"):
            assert line.split("{")[0].split(" ")[0] in names, line
