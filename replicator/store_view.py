"""Immutable snapshots of the central state, for readers on the event loop.

The consumer's apply thread is the one owner of the central copies
(`CentralStore.replicas`, their tables, watermarks and counters). After each
batch it publishes a new `StoreView`; the relay API, the query engine, the
status view and the metrics read only the most recent one. A reader holding
a view sees one consistent moment, and the apply thread never mutates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType


@dataclass(frozen=True)
class TableView:
    name: str
    source: str  # "agent" (replicated from the agent's database) or "relay" (written over HTTP)
    visibility: str  # "always" or "on_demand"
    columns: tuple[str, ...]
    types: tuple[str, ...]
    pk: tuple[str, ...]
    sql: str | None


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    path: Path
    epoch: str | None
    watermark: int  # last change sequence applied (committed)
    head_seq: int  # highest change sequence seen from the agent
    committed_at: float | None  # when the agent committed the last applied change
    applied_at: float | None  # when the HTPC committed it
    last_seen: float | None  # when the HTPC last saw a record of this agent
    records_applied: int
    changes_applied: int
    blocked: str | None  # why this agent's later changes wait (a dead letter in its sequence), or None
    tables: Mapping[str, TableView] = field(default_factory=lambda: MappingProxyType({}))
    waiting: int = 0  # records that came ahead of their turn, waiting for an earlier one
    waiting_since: float | None = None  # when the oldest of them arrived
    resync_pending: str | None = None  # why a resync of this agent was requested and is not finished, or None
    resync_requested_at: float | None = None  # when that resync was requested
    resyncs: int = 0  # resyncs of this agent finished
    agent_blocked: str | None = None  # what the agent itself reports it cannot send (its status record), or None
    agent_last_seq: int | None = None  # the agent's newest committed change, as it last reported it
    agent_reported_at: float | None = None  # when the agent last reported its status
    last_resync: str | None = None  # request id of the last resync applied to this copy
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the central file when it was opened
    feed_id: str | None = None  # the copy's current feed (feed_log.py): a new one after a new epoch/resync/restore
    feed_n: int = 0  # the feed's committed head: n of the last complete unit (or its floor)

    @property
    def lag_changes(self) -> int:
        return max(0, self.head_seq - self.watermark)

    def tables_by_visibility(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"always": [], "on_demand": []}
        for name in sorted(self.tables):
            out.setdefault(self.tables[name].visibility, []).append(name)
        return out


@dataclass(frozen=True)
class StoreView:
    agents: Mapping[str, AgentView] = field(default_factory=lambda: MappingProxyType({}))

    def agent(self, agent_id: str) -> AgentView | None:
        return self.agents.get(agent_id)

    def table(self, agent_id: str, table: str) -> TableView | None:
        agent = self.agents.get(agent_id)
        return agent.tables.get(table) if agent is not None else None

    def agent_ids(self) -> list[str]:
        return sorted(self.agents)
