"""Prometheus text exposition of the replicator's counters and per-agent gauges."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .service import ReplicatorService


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(service: ReplicatorService) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")

    consumer = service.consumer
    if consumer is not None:
        st = consumer.stats
        for field, help_text in (
            ("messages", "Stream messages handled"),
            ("applied", "Records applied to the central store"),
            ("duplicates", "Records skipped as already applied"),
            ("stale", "Records skipped from a retired agent epoch"),
            ("gaps", "Records nak'ed because an earlier record was missing"),
            ("dead_letters", "Records sent to the dead-letter store"),
            ("fetch_stalls", "Fetches cut off by the watchdog"),
            ("commit_failures", "Central commits that failed and were retried"),
        ):
            metric(
                f"replicator_records_{field}_total" if field != "messages" else "replicator_messages_total",
                "counter",
                help_text,
                [({}, float(getattr(st, field)))],
            )
        metric("replicator_apply_seconds_total", "counter", "Time spent applying batches", [({}, st.apply_seconds)])
        metric(
            "replicator_consumer_running",
            "gauge",
            "1 while the consumer loop runs",
            [({}, 1.0 if consumer.running else 0.0)],
        )
    if service.dead_letters is not None:
        metric(
            "replicator_dead_letters",
            "gauge",
            "Records in the dead-letter store",
            [({}, float(service.dead_letters.total()))],
        )
    metric(
        "replicator_nats_connected",
        "gauge",
        "1 while connected to NATS",
        [({}, 1.0 if service.nc is not None and service.nc.is_connected else 0.0)],
    )
    metric(
        "replicator_relay_published_total",
        "counter",
        "Relay API writes published to JetStream",
        [({}, float(service.relay_published))],
    )
    if service.store is not None:
        agents = service.store.describe()
        now = time.time()
        metric(
            "replicator_agent_watermark",
            "gauge",
            "Last change sequence applied per agent",
            [({"agent": a["agent_id"]}, float(a["watermark"])) for a in agents],
        )
        metric(
            "replicator_agent_lag_changes",
            "gauge",
            "Changes seen but not yet applied per agent",
            [({"agent": a["agent_id"]}, float(a["lag_changes"])) for a in agents],
        )
        metric(
            "replicator_agent_seconds_since_seen",
            "gauge",
            "Seconds since the last record per agent",
            [({"agent": a["agent_id"]}, round(now - a["last_seen"], 3)) for a in agents if a["last_seen"]],
        )
    return "\n".join(lines) + "\n"
