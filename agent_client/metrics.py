"""The agent's own Prometheus metrics, built from `health_check()`: backlog, acks, publish latency, blocked.

For an agent that serves HTTP (or one that wants its figures in its own Prometheus registry):

    body = await render_agent_metrics(storage)   # bytes, Prometheus text 0.0.4 (METRICS_CONTENT_TYPE)

or, from a `health_check()` taken already, `agent_metrics_text(health)` / `AgentMetricsCollector(health)`.
Every metric carries an `agent` label; a followed table's also a `follow` label (`<agent>.<table>`).

`prometheus-client` is optional for agent_client: it is imported only when metrics are rendered, and its
absence is a clear `MetricsUnavailable`. Nothing global is registered: each rendering uses a private registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .errors import AgentStorageError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .agent_storage import AgentStorage

#: The Content-Type of `render_agent_metrics`' answer (Prometheus text exposition 0.0.4).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsUnavailable(AgentStorageError, ImportError):
    """Agent metrics need the optional `prometheus-client` package, which is not installed."""


def _require_prometheus() -> None:
    """Import prometheus_client (on first use only); MetricsUnavailable when it is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MetricsUnavailable("agent metrics need prometheus-client: pip install 'prometheus-client>=0.20'") from exc


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for None, booleans and anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class AgentMetricsCollector:
    """A prometheus_client Collector over one `health_check()` result (register it, or use agent_metrics_text)."""

    def __init__(self, health: Mapping[str, Any]) -> None:
        self._health = dict(health)

    def collect(self) -> Iterator[Metric]:
        _require_prometheus()
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        h = self._health
        agent = str(h.get("agent_id", ""))
        now = _number(h.get("checked_at"))

        def family(kind: str, name: str, help_text: str, value: float | None) -> Metric | None:
            if value is None:
                return None
            metric: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                metric = CounterMetricFamily(name, help_text, labels=["agent"])
            else:
                metric = GaugeMetricFamily(name, help_text, labels=["agent"])
            metric.add_metric([agent], value)
            return metric

        def age(at: Any) -> float | None:
            at_s = _number(at)
            return None if at_s is None or now is None else max(0.0, now - at_s)

        nats = h.get("nats") or {}
        backlog = h.get("backlog") or {}
        local = h.get("local_db") or {}
        blocked = h.get("blocked") is not None
        ok = local.get("ok")
        found = [
            family(
                "gauge", "agent_client_nats_connected", "1 while connected to NATS", float(bool(nats.get("connected")))
            ),
            family(
                "gauge",
                "agent_client_publisher_running",
                "1 while the publisher's loop runs (0: replicate=False, or it died and nothing is sent)",
                float(bool(h.get("publisher_running"))),
            ),
            family(
                "gauge",
                "agent_client_blocked",
                "1 while the publisher cannot send (health_check()['blocked'] says why)",
                float(blocked),
            ),
            family(
                "gauge",
                "agent_client_blocked_seconds",
                "Seconds the publisher has been blocked (0: not blocked)",
                (age(h.get("blocked_since")) or 0.0) if blocked else 0.0,
            ),
            family(
                "gauge",
                "agent_client_backlog_changes",
                "Local changes committed and not yet acknowledged by JetStream",
                _number(backlog.get("changes")),
            ),
            family(
                "gauge",
                "agent_client_backlog_oldest_age_seconds",
                "Age of the oldest change not yet acknowledged (0: no backlog)",
                _number(backlog.get("oldest_age_s")) or 0.0,
            ),
            family(
                "gauge",
                "agent_client_last_committed_seq",
                "Newest local change sequence committed",
                _number(h.get("last_committed_seq")),
            ),
            family(
                "gauge",
                "agent_client_acked_seq",
                "Newest local change sequence JetStream acknowledged",
                _number(h.get("acked_seq")),
            ),
            family(
                "gauge",
                "agent_client_last_ack_age_seconds",
                "Seconds since the last PubAck (absent until the first one)",
                age(h.get("last_publish_at")),
            ),
            family(
                "counter",
                "agent_client_records_published_total",
                "Change records acknowledged by JetStream since the storage was opened",
                _number(h.get("records_published")),
            ),
            family(
                "counter",
                "agent_client_status_reports_total",
                "Status records acknowledged by JetStream since the storage was opened",
                _number(h.get("status_reports")),
            ),
            family(
                "counter",
                "agent_client_msg_id_collisions_total",
                "PubAcks that called a record a duplicate of a message this agent never published",
                _number(h.get("msg_id_collisions")),
            ),
            family(
                "gauge",
                "agent_client_log_bytes",
                "Bytes the local change log takes on disk",
                _number(h.get("log_bytes")),
            ),
            family(
                "gauge",
                "agent_client_db_file_bytes",
                "Bytes of the local database file",
                _number(local.get("file_bytes")),
            ),
            family(
                "gauge",
                "agent_client_local_db_ok",
                "1 while PRAGMA quick_check says ok (absent when not checked)",
                None if ok is None else float(bool(ok)),
            ),
            family(
                "gauge",
                "agent_client_schema_problem",
                "1 while a schema change made outside agent_client could not be followed",
                float(h.get("schema_problem") is not None),
            ),
        ]
        yield from (m for m in found if m is not None)
        latency = h.get("publish_latency_s")
        if isinstance(latency, Mapping):
            hist = HistogramMetricFamily(
                "agent_client_publish_latency_seconds",
                "Seconds from a record's send to its PubAck, per record acknowledged",
                labels=["agent"],
            )
            buckets = [(str(le), float(n)) for le, n in dict(latency.get("le") or {}).items()]
            hist.add_metric([agent], buckets, float(latency.get("sum") or 0.0))
            yield hist
        yield from self._follows(agent)

    def _follows(self, agent: str) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        follows = self._health.get("follows") or {}
        behind = GaugeMetricFamily(
            "agent_client_follow_seconds_behind",
            "Per followed table: seconds since its copy was last up to date (0 while live)",
            labels=["agent", "follow"],
        )
        live = GaugeMetricFamily(
            "agent_client_follow_live", "Per followed table: 1 while its feed is live", labels=["agent", "follow"]
        )
        rows = GaugeMetricFamily(
            "agent_client_follow_rows", "Per followed table: rows in the local copy", labels=["agent", "follow"]
        )
        for name, entry in sorted(follows.items()):
            seconds = _number(entry.get("seconds_behind"))
            if seconds is not None:
                behind.add_metric([agent, name], seconds)
            live.add_metric([agent, name], float(entry.get("state") == "live"))
            count = _number(entry.get("rows"))
            if count is not None:
                rows.add_metric([agent, name], count)
        yield from (behind, live, rows)


def agent_metrics_text(health: Mapping[str, Any]) -> bytes:
    """Prometheus text (0.0.4) of one `health_check()` result."""
    _require_prometheus()
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentMetricsCollector(health))
    return generate_latest(registry)


async def render_agent_metrics(storage: AgentStorage) -> bytes:
    """The agent's metrics now, as Prometheus text (0.0.4): `health_check(integrity=False)` rendered.

    Raises MetricsUnavailable without prometheus-client, StorageClosed after `close()`."""
    _require_prometheus()  # fail before reading anything
    return agent_metrics_text(await storage.health_check(integrity=False))
