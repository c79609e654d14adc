"""The replicator's status: one view of the central state, the consumer and NATS, rendered for every reader.

`Status` is a snapshot taken on the event loop (`service_status`): the
store's latest published `StoreView`, the dead-letter counts per agent, the
consumer's counters and the connection state. `/relay/agents`,
`/relay/agents/{id}` and `/health` serve its JSON, `/metrics` renders it
(metrics.py), and `replicator status` prints the same JSON read over HTTP.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .store_view import AgentView, StoreView

if TYPE_CHECKING:
    from .consumer import ConsumerStats
    from .service import ReplicatorService


def agent_status(agent: AgentView, *, dead_letters: int, now: float) -> dict[str, Any]:
    """One agent as `/relay/agents` shows it: epoch, watermark, lag, last seen, tables, dead letters, blocked."""
    applied_at, committed_at, last_seen = agent.applied_at, agent.committed_at, agent.last_seen
    return {
        "agent_id": agent.agent_id,
        "epoch": agent.epoch,
        "watermark": agent.watermark,
        "head_seq": agent.head_seq,
        "lag_changes": agent.lag_changes,
        "replication_delay_s": round(applied_at - committed_at, 6) if applied_at and committed_at else None,
        "last_applied_at": applied_at,
        "last_seen": last_seen,
        "seconds_since_seen": round(now - last_seen, 3) if last_seen else None,
        "records_applied": agent.records_applied,
        "changes_applied": agent.changes_applied,
        "tables": agent.tables_by_visibility(),
        "dead_letters": dead_letters,
        "blocked": agent.blocked,
        "waiting_records": agent.waiting,
        "waiting_since": agent.waiting_since,
    }


@dataclass(frozen=True)
class Status:
    """A snapshot of everything the status endpoints and the metrics report."""

    view: StoreView = field(default_factory=StoreView)
    dead_letters: Mapping[str | None, int] = field(default_factory=dict)  # per agent (None: no agent known)
    nats_connected: bool = False
    nats_url: str = ""
    nats_embedded: bool = False
    embedded_restarts: int = 0
    consumer_running: bool = False
    durable: str = "replicator"
    consumer: ConsumerStats | None = None
    consumer_error: str | None = None
    apply_failing_since: float | None = None  # the consumer cannot apply (disk full, ...) since then
    dead_letters_pruned: int = 0
    queries_refused_busy: int = 0  # answered 429: their caller already ran --query-max-concurrent
    queries_overran: int = 0  # answered 408 while SQLite was still inside one long step
    query_connections_idle: int = 0
    auth: bool = False
    stream_replicas: int | None = None
    relay_published: int = 0
    now: float = field(default_factory=time.time)

    @property
    def problems(self) -> list[str]:
        """Why the HTPC is degraded, one sentence each (empty: ok)."""
        found: list[str] = []
        if not self.nats_connected:
            found.append("not connected to NATS")
        if not self.consumer_running:
            found.append("the consumer is not running")
        if self.apply_failing_since is not None:
            found.append(f"the consumer cannot apply since {self.apply_failing_since:.0f}: {self.consumer_error}")
        for agent in self.view.agents.values():
            if agent.blocked:
                found.append(f"agent {agent.agent_id} is blocked: {agent.blocked}")
        return found

    @property
    def healthy(self) -> bool:
        """Nothing is wrong (what `/ready` and `/health` call ok): see `problems`."""
        return not self.problems

    @property
    def dead_letter_total(self) -> int:
        return sum(self.dead_letters.values())

    def agents(self) -> list[dict[str, Any]]:
        """Every agent the HTPC knows, by id."""
        return [self._agent(self.view.agents[a]) for a in self.view.agent_ids()]

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        found = self.view.agent(agent_id)
        return self._agent(found) if found is not None else None

    def _agent(self, agent: AgentView) -> dict[str, Any]:
        return agent_status(agent, dead_letters=self.dead_letters.get(agent.agent_id, 0), now=self.now)

    def health(self) -> dict[str, Any]:
        agents = self.view.agents.values()
        return {
            "status": "ok" if self.healthy else "degraded",
            "problems": self.problems,
            "nats": {
                "connected": self.nats_connected,
                "url": self.nats_url,
                "embedded": self.nats_embedded,
                "embedded_restarts": self.embedded_restarts,
            },
            "consumer": {
                "running": self.consumer_running,
                "durable": self.durable,
                "last_fetch_at": self.consumer.last_fetch_at if self.consumer is not None else None,
                "last_error": self.consumer_error,
                "apply_failing_since": self.apply_failing_since,
            },
            "auth": self.auth,
            "stream_replicas": self.stream_replicas,
            "agents": len(self.view.agents),
            "dead_letters": self.dead_letter_total,
            "blocked_agents": {a.agent_id: a.blocked for a in sorted(agents, key=_by_id) if a.blocked},
            "max_lag_changes": max((a.lag_changes for a in agents), default=0),
        }


def _by_id(agent: AgentView) -> str:
    return agent.agent_id


def service_status(service: ReplicatorService) -> Status:
    """The service's status now (on the event loop; reads the store's published view, never its replicas)."""
    consumer = service.consumer
    return Status(
        view=service.store.view if service.store is not None else StoreView(),
        dead_letters=service.dead_letters.counts() if service.dead_letters is not None else {},
        nats_connected=service.nats_connected,
        nats_url=service.nats_url,
        nats_embedded=service.embedded is not None,
        embedded_restarts=service.embedded.restarts if service.embedded is not None else 0,
        consumer_running=service.consumer_running,
        durable=service.settings.durable,
        consumer=copy.copy(consumer.stats) if consumer is not None else None,
        consumer_error=consumer.last_error if consumer is not None else None,
        apply_failing_since=consumer.apply_failing_since if consumer is not None else None,
        dead_letters_pruned=service.dead_letters.pruned if service.dead_letters is not None else 0,
        queries_refused_busy=service.query_engine.refused_busy if service.query_engine is not None else 0,
        queries_overran=service.query_engine.overran if service.query_engine is not None else 0,
        query_connections_idle=service.query_engine.idle_connections() if service.query_engine is not None else 0,
        auth=service.auth is not None,
        stream_replicas=service.stream_replicas,
        relay_published=service.relay_writer.published,
    )
