"""Prometheus text exposition (format 0.0.4) of the replicator's counters and gauges, rendered from a `Status`.

prometheus-client does the exposition: `StatusCollector` yields the metric families of one `Status` snapshot,
and `render_metrics` renders them from a private `CollectorRegistry` (nothing global, no state between
scrapes). Every family has one HELP and one TYPE line; per-agent gauges carry an `agent` label; the apply
delay is a histogram (`_bucket{le=...}`, `_sum`, `_count`). The README lists every metric with its meaning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .histogram import HistogramSnapshot
from .status import Status

_CONSUMER_COUNTERS = (
    ("messages", "replicator_messages_total", "Stream messages handled"),
    ("applied", "replicator_records_applied_total", "Records applied to the central store"),
    ("duplicates", "replicator_records_duplicates_total", "Records skipped as already applied"),
    ("stale", "replicator_records_stale_total", "Records skipped from a retired agent epoch"),
    (
        "gaps",
        "replicator_records_gaps_total",
        "Records that came before an earlier one of their agent (kept until due)",
    ),
    ("dead_letters", "replicator_records_dead_letters_total", "Records sent to the dead-letter store"),
    (
        "fetch_stalls",
        "replicator_records_fetch_stalls_total",
        "Fetches that hung past the watchdog and were cut off (an empty fetch on an idle stream is not one)",
    ),
    ("commit_failures", "replicator_records_commit_failures_total", "Central commits that failed and were retried"),
    (
        "apply_failures",
        "replicator_apply_failures_total",
        "Applies that failed for the machine's sake and were retried",
    ),
    ("over_cap", "replicator_records_over_cap_total", "Records beyond --max-held-per-agent, terminated"),
    ("foreign", "replicator_foreign_messages_total", "JetStream acknowledgements found on an agent subject, dropped"),
    ("msg_id_alarms", "replicator_msg_id_alarms_total", "Messages carrying another agent's message id"),
    ("statuses", "replicator_agent_status_records_total", "Status records of agents (what they report of themselves)"),
)


def _histogram(name: str, help_text: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=[])
    family.add_metric([], [(le, float(n)) for le, n in snap.cumulative()], snap.total)
    return family


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> Metric:
    """One counter or gauge family; its label names are its samples' (the same for each; none if no sample).

    prometheus-client keeps a counter's name without `_total` and writes it back on exposition: the names
    scraped are the ones given here."""
    labels = list(samples[0][0]) if samples else []
    family: CounterMetricFamily | GaugeMetricFamily
    if kind == "counter":
        family = CounterMetricFamily(name, help_text, labels=labels)
    else:
        family = GaugeMetricFamily(name, help_text, labels=labels)
    for sample_labels, value in samples:
        family.add_metric([sample_labels[k] for k in labels], value)
    return family


_Metric = Callable[[str, str, str, list[tuple[dict[str, str], float]]], None]


class StatusCollector(Collector):
    """The metric families of one `Status` snapshot (a prometheus_client Collector; holds nothing else)."""

    def __init__(self, status: Status) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        return iter(_families(self._status))


def render_metrics(status: Status) -> str:
    """Prometheus text (0.0.4) of `status`, through a private registry holding only its collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    return generate_latest(registry).decode()


def _families(status: Status) -> list[Metric]:
    families: list[Metric] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        families.append(_family(name, kind, help_text, samples))

    st = status.consumer
    if st is not None:
        for field, name, help_text in _CONSUMER_COUNTERS:
            metric(name, "counter", help_text, [({}, float(getattr(st, field, 0)))])
        metric("replicator_apply_seconds_total", "counter", "Time spent applying batches", [({}, st.apply_seconds)])
        families.append(
            _histogram(
                "replicator_apply_delay_seconds",
                "Agent commit to central commit, per agent transaction applied",
                st.apply_delay.snapshot(),
            )
        )
        metric(
            "replicator_consumer_running",
            "gauge",
            "1 while the consumer loop runs",
            [({}, 1.0 if status.consumer_running else 0.0)],
        )
    metric(
        "replicator_dead_letters", "gauge", "Records in the dead-letter store", [({}, float(status.dead_letter_total))]
    )
    metric(
        "replicator_dead_letters_pruned_total",
        "counter",
        "Dead letters dropped to keep each agent within --dead-letters-per-agent",
        [({}, float(status.dead_letters_pruned))],
    )
    metric(
        "replicator_queries_refused_busy_total",
        "counter",
        "Queries answered 429: their caller already ran --query-max-concurrent",
        [({}, float(status.queries_refused_busy))],
    )
    metric(
        "replicator_queries_overran_total",
        "counter",
        "Queries answered 408 while SQLite was still inside one long step",
        [({}, float(status.queries_overran))],
    )
    metric(
        "replicator_query_connections_idle",
        "gauge",
        "Pooled read-only query connections open and idle",
        [({}, float(status.query_connections_idle))],
    )
    metric(
        "replicator_apply_failing",
        "gauge",
        "1 while the consumer cannot apply (disk full, no file descriptors, ...)",
        [({}, 0.0 if status.apply_failing_since is None else 1.0)],
    )
    metric(
        "replicator_nats_connected",
        "gauge",
        "1 while connected to NATS",
        [({}, 1.0 if status.nats_connected else 0.0)],
    )
    metric(
        "replicator_relay_published_total",
        "counter",
        "Relay API writes published to JetStream",
        [({}, float(status.relay_published))],
    )
    _feed_metrics(status, metric)
    _stream_metrics(status, metric)
    _agent_metrics(status, metric)
    return families


def _one(value: float | int | None) -> list[tuple[dict[str, str], float]]:
    """A single unlabelled sample, or none when the value is unknown."""
    return [] if value is None else [({}, float(value))]


#: The change feed hub's figures (FeedHub.figures): (key, metric, kind, help).
_FEED_FIGURES = [
    (
        "subscribers",
        "replicator_feed_subscribers",
        "gauge",
        "Live /relay/changes subscribers (SSE streams, long-polls)",
    ),
    ("agents_followed", "replicator_feed_agents_followed", "gauge", "Agents with live feed subscribers"),
    ("snapshots", "replicator_feed_snapshots_total", "counter", "Table snapshots served by /relay/changes"),
    ("catch_up_reads", "replicator_feed_catch_up_reads_total", "counter", "Feed reads from a subscriber's offset"),
    ("live_reads", "replicator_feed_live_reads_total", "counter", "Feed reads after an agent's commit (shared)"),
    ("loop_reads", "replicator_feed_loop_reads_total", "counter", "Of those, small enough to run on the event loop"),
    ("units_delivered", "replicator_feed_units_delivered_total", "counter", "Transactions sent to live subscribers"),
    ("must_refetch", "replicator_feed_must_refetch_total", "counter", "must-refetch answers"),
    ("refused", "replicator_feed_refused_total", "counter", "Subscribers refused at --feed-max-subscribers"),
]


def _feed_metrics(status: Status, metric: _Metric) -> None:
    if status.feed is None:
        return
    for key, name, kind, help_text in _FEED_FIGURES:
        metric(name, kind, help_text, [({}, float(status.feed.get(key, 0)))])


def _stream_metrics(status: Status, metric: _Metric) -> None:
    facts = status.stream
    metric("replicator_healthy", "gauge", "1 while /health says ok (no problems)", _one(1 if status.healthy else 0))
    metric("replicator_problems", "gauge", "Problems /health lists now", _one(len(status.problems)))
    metric(
        "replicator_stream_watch_failing",
        "gauge",
        "1 while the last read of the stream and the consumer failed",
        _one(0 if facts.error is None else 1),
    )
    metric(
        "replicator_stream_watch_age_seconds",
        "gauge",
        "Seconds since the stream and the consumer were last read",
        _one(None if facts.updated_at is None else round(status.now - facts.updated_at, 3)),
    )
    if facts.updated_at is not None:
        metric("replicator_stream_messages", "gauge", "Messages in the stream", _one(facts.messages))
        metric("replicator_stream_bytes", "gauge", "Bytes in the stream", _one(facts.bytes))
        metric("replicator_stream_first_seq", "gauge", "First sequence the stream still holds", _one(facts.first_seq))
        metric("replicator_stream_last_seq", "gauge", "Last sequence in the stream", _one(facts.last_seq))
    metric(
        "replicator_consumer_pending",
        "gauge",
        "Stream messages not yet delivered to the durable consumer",
        _one(facts.consumer_pending),
    )
    metric(
        "replicator_consumer_ack_pending",
        "gauge",
        "Messages delivered to the durable consumer and not yet acknowledged",
        _one(facts.consumer_ack_pending),
    )
    metric(
        "replicator_consumer_ack_floor",
        "gauge",
        "Stream sequence up to which every message is acknowledged (committed centrally)",
        _one(facts.ack_floor),
    )
    if status.resyncs is not None:
        for name, value, help_text in (
            ("started", status.resyncs.started, "Resyncs requested of agents"),
            ("finished", status.resyncs.finished, "Resyncs whose fresh copy replaced the central copy"),
            ("failed", status.resyncs.failed, "Resyncs that failed"),
        ):
            metric(f"replicator_resyncs_{name}_total", "counter", help_text, _one(value))
        metric(
            "replicator_resyncs_pending",
            "gauge",
            "Resyncs requested and not finished",
            _one(len(status.resyncs_waiting())),
        )


def _agent_metrics(status: Status, metric: _Metric) -> None:
    agents = [status.view.agents[a] for a in status.view.agent_ids()]
    measures = status.measures
    metric("replicator_agents", "gauge", "Agents the HTPC has a central copy of", _one(len(agents)))
    metric(
        "replicator_blocked_agents",
        "gauge",
        "Agents blocked, by the HTPC (a dead letter in their sequence) or by their own report",
        _one(sum(1 for a, m in measures.items() if m.reported_blocked or _blocked(status, a))),
    )
    metric(
        "replicator_agent_watermark",
        "gauge",
        "Last change sequence applied per agent",
        [({"agent": a.agent_id}, float(a.watermark)) for a in agents],
    )
    metric(
        "replicator_agent_published_seq",
        "gauge",
        "Newest change sequence known to exist per agent (stream, its own report), in its newest epoch",
        [({"agent": a}, float(m.lag.published_seq)) for a, m in measures.items()],
    )
    metric(
        "replicator_agent_lag_changes",
        "gauge",
        "Changes that exist (published or reported by the agent) but are not applied centrally, per agent",
        [({"agent": a}, float(m.lag.lag_changes)) for a, m in measures.items()],
    )
    metric(
        "replicator_agent_replication_delay_seconds",
        "gauge",
        "Per agent: now minus the commit time of its oldest unapplied change, else the last applied one's delay",
        [
            ({"agent": a}, round(m.replication_delay_s, 6))
            for a, m in measures.items()
            if m.replication_delay_s is not None
        ],
    )
    metric(
        "replicator_agent_behind_seconds",
        "gauge",
        "Per agent: seconds it has been behind without its central copy moving (0: not behind)",
        [({"agent": a}, round(m.behind_for_s or 0.0, 3)) for a, m in measures.items()],
    )
    metric(
        "replicator_agent_waiting_records",
        "gauge",
        "Records per agent that came ahead of their turn, waiting for an earlier one",
        [({"agent": a.agent_id}, float(a.waiting)) for a in agents],
    )
    metric(
        "replicator_agent_blocked",
        "gauge",
        "1 while an agent's replication is blocked (see /relay/agents for the reason)",
        [({"agent": a.agent_id}, 1.0 if a.blocked else 0.0) for a in agents],
    )
    metric(
        "replicator_agent_reported_blocked",
        "gauge",
        "1 while an agent reports that its publisher cannot send (its status record says why)",
        [({"agent": a}, 1.0 if m.reported_blocked else 0.0) for a, m in measures.items()],
    )
    waiting = status.resyncs_waiting()
    metric(
        "replicator_agent_resync_pending",
        "gauge",
        "1 while a resync of the agent is requested and not finished",
        [({"agent": a}, 1.0 if a in waiting else 0.0) for a in sorted(set(status.view.agents) | set(waiting))],
    )
    known = sorted({a.agent_id for a in agents} | {a for a in status.dead_letters if a is not None})
    metric(
        "replicator_agent_dead_letters",
        "gauge",
        "Records of the agent in the dead-letter store",
        [({"agent": a}, float(status.dead_letters.get(a, 0))) for a in known],
    )
    metric(
        "replicator_agent_seconds_since_seen",
        "gauge",
        "Seconds since the last record per agent",
        [({"agent": a.agent_id}, round(status.now - a.last_seen, 3)) for a in agents if a.last_seen],
    )


def _blocked(status: Status, agent_id: str) -> bool:
    agent = status.view.agents.get(agent_id)
    return agent is not None and agent.blocked is not None
