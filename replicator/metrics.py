"""Prometheus text exposition of the replicator's counters and per-agent gauges, rendered from a `Status`."""

from __future__ import annotations

from .status import Status

_CONSUMER_COUNTERS = (
    ("messages", "replicator_messages_total", "Stream messages handled"),
    ("applied", "replicator_records_applied_total", "Records applied to the central store"),
    ("duplicates", "replicator_records_duplicates_total", "Records skipped as already applied"),
    ("stale", "replicator_records_stale_total", "Records skipped from a retired agent epoch"),
    ("gaps", "replicator_records_gaps_total", "Records nak'ed because an earlier record was missing"),
    ("dead_letters", "replicator_records_dead_letters_total", "Records sent to the dead-letter store"),
    ("fetch_stalls", "replicator_records_fetch_stalls_total", "Fetches cut off by the watchdog"),
    ("commit_failures", "replicator_records_commit_failures_total", "Central commits that failed and were retried"),
    (
        "apply_failures",
        "replicator_apply_failures_total",
        "Applies that failed for the machine's sake and were retried",
    ),
    ("over_cap", "replicator_records_over_cap_total", "Records beyond --max-held-per-agent, terminated"),
    ("foreign", "replicator_foreign_messages_total", "JetStream acknowledgements found on an agent subject, dropped"),
    ("msg_id_alarms", "replicator_msg_id_alarms_total", "Messages carrying another agent's message id"),
)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(status: Status) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    st = status.consumer
    if st is not None:
        for field, name, help_text in _CONSUMER_COUNTERS:
            metric(name, "counter", help_text, [({}, float(getattr(st, field)))])
        metric("replicator_apply_seconds_total", "counter", "Time spent applying batches", [({}, st.apply_seconds)])
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
    agents = [status.view.agents[a] for a in status.view.agent_ids()]
    metric(
        "replicator_agent_watermark",
        "gauge",
        "Last change sequence applied per agent",
        [({"agent": a.agent_id}, float(a.watermark)) for a in agents],
    )
    metric(
        "replicator_agent_lag_changes",
        "gauge",
        "Changes seen but not yet applied per agent",
        [({"agent": a.agent_id}, float(a.lag_changes)) for a in agents],
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
        "replicator_agent_seconds_since_seen",
        "gauge",
        "Seconds since the last record per agent",
        [({"agent": a.agent_id}, round(status.now - a.last_seen, 3)) for a in agents if a.last_seen],
    )
    return "\n".join(lines) + "\n"
