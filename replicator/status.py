"""The replicator's status: one view of the central state, the stream, the consumer and NATS, for every reader.

`Status` is a snapshot taken on the event loop (`service_status`): the
store's latest published `StoreView`, what the stream holds (the stream
watch's `StreamFacts`), the dead-letter counts per agent, the consumer's
counters, the resyncs and the connection state. `/relay/agents`,
`/relay/agents/{id}` and `/health` serve its JSON, `/ready` answers 503 with
its `problems`, `/metrics` renders it (metrics.py), and `replicator status`
prints the same JSON read over HTTP.

Lag is measured against what exists (stream_watch.measure_lag): the newest
change the agent published or reported, minus what the central store applied.
`problems` names, one sentence each, every reason the HTPC is not doing its
job: NATS, the consumer, apply failures, blocked agents (the HTPC's reason or
the agent's own), resyncs not finished, the central store behind the stream
and not moving for `stuck_after` seconds, and the stream watch failing.
Each agent also carries one word, its `state` (`agent_state`): blocked,
stuck, lagging, idle or ok, so that no reader has to derive it again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from agent_client import STREAM_NAME

from .store_view import AgentView, StoreView
from .stream_watch import STUCK_AFTER_S, AgentReport, Lag, StreamFacts, measure_lag

if TYPE_CHECKING:
    from .consumer import ConsumerStats
    from .service import ReplicatorService


@dataclass(frozen=True)
class AgentMeasure:
    """One agent measured against what exists: lag, delay, how long it has stood still, what it reports."""

    lag: Lag
    replication_delay_s: float | None  # now - commit time of the oldest unapplied change, else the last one's
    behind_for_s: float | None  # behind without its central position moving, this long (None: not so)
    reported_blocked: str | None  # why the agent says it cannot send (its newest status record), or None
    reported_last_seq: int | None  # its newest committed change, as it last reported
    reported_at: float | None  # when it last reported

    def stuck(self, stuck_after: float) -> bool:
        """Behind what exists and not moving for `stuck_after` seconds (a problem /health names)."""
        return self.behind_for_s is not None and self.behind_for_s >= stuck_after


@dataclass(frozen=True)
class ResyncCounts:
    """The resync coordinator's counters (service.resync)."""

    started: int = 0
    finished: int = 0
    failed: int = 0


#: No record from an agent this long (and nothing to apply): "idle". The HTPC cannot tell an idle agent (it
#: sends nothing while nothing changes) from one that is switched off.
IDLE_AFTER_S = 600.0

#: The agent states `agent_status` names (its "state"), most pressing first.
AGENT_STATES = ("blocked", "stuck", "lagging", "idle", "ok")


def agent_state(agent: AgentView, measure: AgentMeasure, *, now: float, stuck_after: float = STUCK_AFTER_S) -> str:
    """One word for the agent: `blocked` (by the HTPC, or by its own report), `stuck` (behind and not moving
    for `stuck_after` seconds: the rule /health names as a problem), `lagging` (changes not applied yet),
    `idle` (nothing to apply and no record for `IDLE_AFTER_S`), else `ok`."""
    if agent.blocked or measure.reported_blocked:
        return "blocked"
    if measure.stuck(stuck_after):
        return "stuck"
    if measure.lag.lag_changes > 0:
        return "lagging"
    if agent.last_seen is None or now - agent.last_seen >= IDLE_AFTER_S:
        return "idle"
    return "ok"


def agent_status(
    agent: AgentView,
    *,
    dead_letters: int,
    now: float,
    measure: AgentMeasure | None = None,
    stuck_after: float = STUCK_AFTER_S,
) -> dict[str, Any]:
    """One agent as `/relay/agents` shows it: state, epoch, watermark, lag, last seen, tables, dead letters,
    blocked."""
    applied_at, committed_at, last_seen = agent.applied_at, agent.committed_at, agent.last_seen
    measure = measure or _measure(agent, None, StreamFacts(), now)
    return {
        "agent_id": agent.agent_id,
        "state": agent_state(agent, measure, now=now, stuck_after=stuck_after),
        "epoch": agent.epoch,
        "watermark": agent.watermark,
        "head_seq": agent.head_seq,
        "lag_changes": measure.lag.lag_changes,
        "replication_delay_s": _round(measure.replication_delay_s),
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
        "published_seq": measure.lag.published_seq,
        "published_epoch": measure.lag.epoch,
        "new_epoch": measure.lag.new_epoch,
        "behind_for_s": _round(measure.behind_for_s),
        "last_committed_at": committed_at,
        "agent_blocked": measure.reported_blocked,
        "agent_last_seq": measure.reported_last_seq,
        "agent_reported_at": measure.reported_at,
        "resync_pending": agent.resync_pending,
        "resync_requested_at": agent.resync_requested_at,
        "resyncs": agent.resyncs,
    }


def _round(value: float | None) -> float | None:
    return round(value, 3) if value is not None else None


def _reported(agent: AgentView | None, report: AgentReport | None) -> tuple[str | None, int | None, float | None]:
    """(blocked, last_seq, at) the agent reported last: its status record as the consumer stored it, or the
    newest one in the stream when that is newer (the consumer may be the part that is stuck)."""
    stored = (agent.agent_blocked, agent.agent_last_seq, agent.agent_reported_at) if agent is not None else None
    streamed = (report.blocked, report.last_seq, report.at) if report is not None else None
    if stored is None or stored[2] is None:
        return streamed or (None, None, None)
    if streamed is None or (streamed[2] or 0.0) <= stored[2]:
        return stored
    return streamed


def _measure(agent: AgentView | None, agent_id: str | None, facts: StreamFacts, now: float) -> AgentMeasure:
    name = agent.agent_id if agent is not None else agent_id or ""
    published, report = facts.published.get(name), facts.reports.get(name)
    lag = measure_lag(agent, published, report)
    progress = facts.progress.get(name)
    position = (agent.epoch, agent.watermark) if agent is not None else (None, 0)
    behind_for = None
    delay = None
    if lag.lag_changes > 0 and progress is not None and (progress.epoch, progress.watermark) == position:
        if progress.behind_since is not None:
            behind_for = max(0.0, now - progress.behind_since)
        oldest = progress.oldest_unapplied
        if oldest is not None and oldest.at is not None and oldest.epoch == lag.epoch:
            delay = max(0.0, now - oldest.at)
    if delay is None and agent is not None and agent.applied_at and agent.committed_at:
        delay = agent.applied_at - agent.committed_at
    blocked, last_seq, at = _reported(agent, report)
    return AgentMeasure(lag, delay, behind_for, blocked, last_seq, at)


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
    stream: StreamFacts = field(default_factory=StreamFacts)  # what the stream holds (the stream watch)
    stuck_after: float = STUCK_AFTER_S  # behind and not moving this long is a problem
    resyncs: ResyncCounts | None = None  # None: no resync coordinator
    resyncs_pending: tuple[Mapping[str, Any], ...] = ()  # the coordinator's pending requests
    feed: Mapping[str, Any] | None = None  # the change feed hub's figures (FeedHub.figures); None: no hub
    now: float = field(default_factory=time.time)

    @cached_property
    def measures(self) -> dict[str, AgentMeasure]:
        """Every agent the HTPC or the stream knows, measured against what exists (by id)."""
        ids = set(self.view.agents) | set(self.stream.published) | set(self.stream.reports)
        return {a: _measure(self.view.agents.get(a), a, self.stream, self.now) for a in sorted(ids)}

    @cached_property
    def problems(self) -> list[str]:
        """Why the HTPC is degraded, one sentence each (empty: ok)."""
        found: list[str] = []
        if not self.nats_connected:
            found.append("not connected to NATS")
        if not self.consumer_running:
            found.append("the consumer is not running")
        if self.apply_failing_since is not None:
            found.append(f"the consumer cannot apply since {self.apply_failing_since:.0f}: {self.consumer_error}")
        named: set[str] = set()  # agents with a problem of their own: not reported again as merely behind
        waiting = self.resyncs_waiting()
        for agent_id in sorted(set(self.measures) | set(waiting)):
            sentence = self._agent_problem(agent_id, waiting.get(agent_id))
            if sentence is not None:
                found.append(sentence)
                named.add(agent_id)
        found += self._stream_problems(named)
        return found

    def _agent_problem(self, agent_id: str, resync: tuple[str, float | None] | None) -> str | None:
        """One sentence for everything wrong with one agent: blocked (the HTPC's reason), blocked by its own
        report, a resync not finished. None when nothing is."""
        agent = self.view.agents.get(agent_id)
        measure = self.measures.get(agent_id)
        blocked = agent.blocked if agent is not None else None
        reported = measure.reported_blocked if measure is not None else None
        parts: list[str] = []
        if blocked:
            parts.append(f"is blocked: {blocked}")
        if reported:
            parts.append(f"reports it cannot send its changes: {reported}")
        if resync is not None:
            reason, since = resync
            age = f" {self.now - since:.0f}s ago" if since is not None else ""
            why = "" if reason in (blocked, reported) else f" ({reason})"
            if not parts:
                return f"agent {agent_id}: resync requested{age} is not finished{why}"
            parts.append(f"its resync requested{age} is not finished{why}")
        return f"agent {agent_id} " + "; ".join(parts) if parts else None

    def resyncs_waiting(self) -> dict[str, tuple[str, float | None]]:
        """Agent -> (reason, requested at) of every resync requested and not finished."""
        waiting: dict[str, tuple[str, float | None]] = {}
        for agent in self.view.agents.values():
            if agent.resync_pending:
                waiting[agent.agent_id] = (agent.resync_pending, agent.resync_requested_at)
        for entry in self.resyncs_pending:
            agent_id = entry.get("agent_id")
            if isinstance(agent_id, str) and agent_id not in waiting:
                at = entry.get("requested_at")
                when = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else None
                waiting[agent_id] = (str(entry.get("reason") or "requested"), when)
        return dict(sorted(waiting.items()))

    def _stream_problems(self, named: set[str]) -> list[str]:
        """What the stream watch shows: the central store behind and not moving, the watch failing."""
        facts = self.stream
        if not self.nats_connected:
            return []  # said already; the stream cannot be read nor the consumer move without it
        if facts.error is not None:
            failing = self.now - (facts.failing_since or self.now)
            if failing < self.stuck_after:
                return []
            return [f"cannot read stream {STREAM_NAME} for {failing:.0f}s: {facts.error}"]
        found: list[str] = []
        still = self.now - facts.ack_floor_since if facts.ack_floor_since is not None else 0.0
        if facts.consumer_unfinished > 0 and still >= self.stuck_after:
            found.append(
                f"the central store is behind the stream and not moving: {facts.consumer_unfinished} messages "
                f"not acknowledged, the ack floor at stream seq {facts.ack_floor} for {still:.0f}s"
            )
        for agent_id, measure in self.measures.items():
            if agent_id in named or not measure.stuck(self.stuck_after):
                continue
            behind = measure.behind_for_s or 0.0
            lag = measure.lag
            what = "its new epoch, which the HTPC has not started" if lag.new_epoch else "what it published"
            changes = f"{lag.lag_changes} change{'s' if lag.lag_changes != 1 else ''}"
            found.append(
                f"agent {agent_id} is {changes} behind {what} (seq {lag.published_seq}) "
                f"and has not moved for {behind:.0f}s"
            )
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
        return agent_status(
            agent,
            dead_letters=self.dead_letters.get(agent.agent_id, 0),
            now=self.now,
            measure=self.measures.get(agent.agent_id),
            stuck_after=self.stuck_after,
        )

    def health(self) -> dict[str, Any]:
        agents = self.view.agents.values()
        measures = self.measures
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
            "max_lag_changes": max((m.lag.lag_changes for m in measures.values()), default=0),
            "agents_reporting_blocked": {a: m.reported_blocked for a, m in measures.items() if m.reported_blocked},
            "lag": {a: m.lag.lag_changes for a, m in measures.items()},
            "stream": self.stream.summary(),
            "stuck_after_s": self.stuck_after,
            "resyncs": None
            if self.resyncs is None
            else {
                "started": self.resyncs.started,
                "finished": self.resyncs.finished,
                "failed": self.resyncs.failed,
                "pending": len(self.resyncs_waiting()),
            },
        }


def _by_id(agent: AgentView) -> str:
    return agent.agent_id


def _resync_state(service: ReplicatorService) -> tuple[ResyncCounts | None, tuple[Mapping[str, Any], ...]]:
    """The resync coordinator's counters and pending requests (None, () while there is none)."""
    resync = getattr(service, "resync", None)
    if resync is None:
        return None, ()
    counts = ResyncCounts(
        int(getattr(resync, "started", 0)), int(getattr(resync, "finished", 0)), int(getattr(resync, "failed", 0))
    )
    pending = getattr(resync, "pending", None)
    return counts, tuple(pending()) if callable(pending) else ()


def service_status(service: ReplicatorService) -> Status:
    """The service's status now (on the event loop; reads the store's published view, never its replicas)."""
    consumer = service.consumer
    watch = service.stream_watch
    resyncs, resyncs_pending = _resync_state(service)
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
        stream=watch.facts if watch is not None else StreamFacts(),
        stuck_after=watch.stuck_after if watch is not None else STUCK_AFTER_S,
        resyncs=resyncs,
        resyncs_pending=resyncs_pending,
        feed=service.feed_hub.figures() if service.feed_hub is not None else None,
    )
