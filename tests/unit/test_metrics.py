"""The Prometheus exposition, read back by prometheus_client's own parser: every family, type and sample."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_client import MetricsUnavailable, agent_metrics_text
from replicator.consumer import ConsumerStats
from replicator.histogram import DELAY_BUCKETS, Histogram
from replicator.metrics import render_metrics
from replicator.status import ResyncCounts, Status
from replicator.store_view import AgentView, StoreView
from replicator.stream_watch import AgentReport, Progress, PublishedPosition, StreamFacts

NOW = 3_000_000.0


def _status() -> Status:
    def agent(agent_id: str, watermark: int, blocked: str | None = None) -> AgentView:
        return AgentView(
            agent_id, Path(f"/d/{agent_id}.db"), "e1", watermark, watermark, NOW - 3, NOW - 2, NOW - 1, 1, 1, blocked
        )

    stats = ConsumerStats(messages=9, applied=8, fetch_stalls=0)
    for delay in (0.0005, 0.003, 0.003, 0.2, 7.0, 1_000.0):
        stats.apply_delay.observe(delay)
    published = PublishedPosition("e1", 15, 77, NOW - 40, first_seq=13)
    return Status(
        view=StoreView(
            MappingProxyType({"ok-agent": agent("ok-agent", 5), "stuck-agent": agent("stuck-agent", 12, "dead letter")})
        ),
        nats_connected=True,
        consumer_running=True,
        consumer=stats,
        stream=StreamFacts(
            updated_at=NOW - 2,
            first_seq=3,
            last_seq=80,
            messages=78,
            bytes=40_960,
            consumer_exists=True,
            consumer_pending=2,
            consumer_ack_pending=1,
            ack_floor=77,
            published=MappingProxyType({"stuck-agent": published}),
            reports=MappingProxyType({"ok-agent": AgentReport("e1", 5, 5, "cannot encode", NOW - 1, 79)}),
            progress=MappingProxyType({"stuck-agent": Progress("e1", 12, 3, NOW - 20, published)}),
        ),
        resyncs=ResyncCounts(started=3, finished=2, failed=1),
        now=NOW,
    )


def _families(text: str) -> dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    out: dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in out, f"family {family.name} twice"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        assert len(samples) == len(family.samples), f"duplicate samples in {family.name}"
        out[family.name] = (family.type, samples)
    return out


def test_the_exposition_parses_and_every_family_is_typed_once() -> None:
    text = render_metrics(_status())
    families = _families(text)
    assert all(name.startswith("replicator_") for name in families)
    # The parser drops a _total suffix from counter family names; the TYPE lines name them in full.
    typed = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(typed) == len(set(typed)) == len(families)
    for line in text.splitlines():
        assert line.startswith("# HELP replicator_") or line.startswith("# TYPE replicator_") or line[0] != "#"


def test_the_new_gauges() -> None:
    families = _families(render_metrics(_status()))

    def value(name: str, **labels: str) -> float:
        _kind, samples = families[name.removesuffix("_total") if name.endswith("_total") else name]
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("replicator_blocked_agents") == 2.0  # one blocked by the HTPC, one by its own report
    assert value("replicator_agent_blocked", agent="stuck-agent") == 1.0
    assert value("replicator_agent_blocked", agent="ok-agent") == 0.0
    assert value("replicator_agent_reported_blocked", agent="ok-agent") == 1.0
    assert value("replicator_consumer_pending") == 2.0 and value("replicator_consumer_ack_pending") == 1.0
    assert value("replicator_consumer_ack_floor") == 77.0
    assert (value("replicator_stream_messages"), value("replicator_stream_bytes")) == (78.0, 40_960.0)
    assert (value("replicator_stream_first_seq"), value("replicator_stream_last_seq")) == (3.0, 80.0)
    assert value("replicator_agent_lag_changes", agent="stuck-agent") == 3.0  # 15 in the stream, 12 applied
    assert value("replicator_agent_published_seq", agent="stuck-agent") == 15.0
    assert value("replicator_agent_replication_delay_seconds", agent="stuck-agent") == 40.0
    assert value("replicator_agent_replication_delay_seconds", agent="ok-agent") == 1.0  # applied - committed
    assert value("replicator_agent_behind_seconds", agent="stuck-agent") == 20.0
    assert value("replicator_agent_behind_seconds", agent="ok-agent") == 0.0
    assert value("replicator_resyncs_started_total") == 3.0 and value("replicator_resyncs_failed_total") == 1.0
    assert value("replicator_resyncs_finished_total") == 2.0
    assert value("replicator_healthy") == 0.0 and value("replicator_problems") == 2.0
    assert value("replicator_stream_watch_failing") == 0.0 and value("replicator_stream_watch_age_seconds") == 2.0
    assert families["replicator_records_fetch_stalls"][0] == "counter"


def test_apply_delay_is_a_prometheus_histogram() -> None:
    kind, samples = _families(render_metrics(_status()))["replicator_apply_delay_seconds"]
    assert kind == "histogram"
    buckets = {dict(labels)["le"]: v for (name, labels), v in samples.items() if name.endswith("_bucket")}
    assert len(buckets) == len(DELAY_BUCKETS) + 1
    assert buckets["0.001"] == 1.0 and buckets["0.005"] == 3.0 and buckets["0.25"] == 4.0 and buckets["10"] == 5.0
    assert buckets["300"] == 5.0 and buckets["+Inf"] == 6.0  # 1000 s is beyond the last bound
    ordered = [buckets[le] for le in sorted(buckets, key=lambda le: float("inf") if le == "+Inf" else float(le))]
    assert ordered == sorted(ordered)  # cumulative
    assert samples[("replicator_apply_delay_seconds_count", ())] == 6.0
    assert samples[("replicator_apply_delay_seconds_sum", ())] == pytest.approx(1007.2065)


def test_unknown_stream_numbers_are_left_out_not_zero() -> None:
    families = _families(render_metrics(Status(now=NOW)))
    for name in ("replicator_stream_messages", "replicator_consumer_pending", "replicator_resyncs_started"):
        assert name not in families or not families[name][1], name


def test_histogram_bounds_are_inclusive_and_must_increase() -> None:
    hist = Histogram((1.0, 2.0))
    for v in (1.0, 1.5, 2.0, 9.0):
        hist.observe(v)
    snap = hist.snapshot()
    assert snap.counts == (1, 2, 1) and snap.count == 4 and snap.cumulative() == [("1", 1), ("2", 3), ("+Inf", 4)]
    with pytest.raises(ValueError):
        Histogram((2.0, 1.0))


def test_render_goes_through_a_private_registry_and_keeps_counter_names() -> None:
    from prometheus_client import REGISTRY

    before = {m.name for m in REGISTRY.collect()}
    text = render_metrics(_status())
    assert {m.name for m in REGISTRY.collect()} == before  # nothing registered globally
    typed = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")}
    assert typed["replicator_messages_total"] == "counter"  # prometheus-client writes `_total` back
    assert typed["replicator_apply_delay_seconds"] == "histogram"
    assert "replicator_messages_total 9.0" in text.splitlines()


def test_agents_and_dead_letters_per_agent() -> None:
    status = replace(_status(), dead_letters=MappingProxyType({"stuck-agent": 2, None: 1, "gone-agent": 4}))
    families = _families(render_metrics(status))
    assert families["replicator_agents"][1] == {("replicator_agents", ()): 2.0}
    per_agent = {dict(labels)["agent"]: v for (_n, labels), v in families["replicator_agent_dead_letters"][1].items()}
    assert per_agent == {"ok-agent": 0.0, "stuck-agent": 2.0, "gone-agent": 4.0}
    assert families["replicator_dead_letters"][1] == {("replicator_dead_letters", ()): 7.0}


# ----------------------------------------------------------------------------- the agent's own metrics
def _health(**over: object) -> dict[str, object]:
    hist = Histogram()
    for v in (0.0004, 0.002, 0.002):
        hist.observe(v)
    health: dict[str, object] = {
        "agent_id": "a-1",
        "nats": {"connected": True},
        "publisher_running": True,
        "blocked": "JetStream refused changes 5-5",
        "blocked_since": NOW - 30,
        "backlog": {"changes": 4, "oldest_age_s": 31.5},
        "last_committed_seq": 9,
        "acked_seq": 5,
        "last_publish_at": NOW - 40,
        "records_published": 3,
        "status_reports": 2,
        "msg_id_collisions": 0,
        "log_bytes": 8192,
        "local_db": {"ok": None, "file_bytes": 65536},
        "schema_problem": None,
        "publish_latency_s": hist.snapshot().as_dict(),
        "follows": {"b.t": {"seconds_behind": 0.0, "state": "live", "rows": 3}},
        "checked_at": NOW,
    }
    health.update(over)
    return health


def test_agent_metrics_from_health_check() -> None:
    text = agent_metrics_text(_health()).decode()
    families = _families(text)
    assert all(name.startswith("agent_client_") for name in families)

    def value(name: str, **labels: str) -> float:
        family = name.removesuffix("_total")
        for suffix in ("_bucket", "_count", "_sum"):
            if family.endswith(suffix) and family.removesuffix(suffix) in families:
                family = family.removesuffix(suffix)
        return families[family][1][(name, tuple(sorted({"agent": "a-1", **labels}.items())))]

    assert value("agent_client_blocked") == 1.0 and value("agent_client_blocked_seconds") == 30.0
    assert value("agent_client_backlog_changes") == 4.0 and value("agent_client_backlog_oldest_age_seconds") == 31.5
    assert (value("agent_client_last_committed_seq"), value("agent_client_acked_seq")) == (9.0, 5.0)
    assert value("agent_client_last_ack_age_seconds") == 40.0
    assert value("agent_client_records_published_total") == 3.0
    assert value("agent_client_publish_latency_seconds_count") == 3.0
    assert value("agent_client_publish_latency_seconds_bucket", le="0.0005") == 1.0
    assert value("agent_client_publish_latency_seconds_bucket", le="+Inf") == 3.0
    assert value("agent_client_follow_live", follow="b.t") == 1.0
    assert "agent_client_local_db_ok" not in families  # not checked: absent, not 0
    assert value("agent_client_publisher_running") == 1.0 and value("agent_client_nats_connected") == 1.0


def test_agent_metrics_when_nothing_was_ever_published() -> None:
    health = _health(blocked=None, blocked_since=None, last_publish_at=None, acked_seq=None, publisher_running=False)
    families = _families(agent_metrics_text(health).decode())
    assert "agent_client_last_ack_age_seconds" not in families and "agent_client_acked_seq" not in families
    assert families["agent_client_blocked_seconds"][1] == {("agent_client_blocked_seconds", (("agent", "a-1"),)): 0.0}
    assert families["agent_client_publisher_running"][1] == {
        ("agent_client_publisher_running", (("agent", "a-1"),)): 0.0
    }


def test_agent_metrics_without_prometheus_client_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # what an environment without it looks like
    with pytest.raises(MetricsUnavailable, match="pip install"):
        agent_metrics_text(_health())


def test_agent_client_imports_without_prometheus_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import agent_client\n"
        "try:\n    agent_client.agent_metrics_text({})\n"
        "except agent_client.MetricsUnavailable as e:\n    print('ok', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.startswith("ok agent metrics need prometheus-client"), out.stdout + out.stderr
