"""Everything about an agent's central copy that lives in memory, restored as one on failure.

The SQLite file is the truth; `ReplicaState` mirrors it (and adds what is only
in memory: the highest sequence seen, when the agent was last seen, an open
multi-part transaction). A record is applied inside `savepoint()` and an
agent's batch inside `begin()`/`commit()`: when either fails, every field goes
back to what it was, with the SQL rolled back alongside (see AgentReplica).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

from .central_schema import TableMeta
from .sequencer import Position


@dataclass
class ReplicaState:
    epoch: str | None = None
    watermark: int = 0  # last change sequence applied in `epoch`
    head_seq: int = 0  # highest change sequence seen of `epoch`
    committed_at: float | None = None  # when the agent committed the last applied change
    applied_at: float | None = None  # when the HTPC committed it
    last_seen: float | None = None  # when the HTPC last saw a record of this agent
    records_applied: int = 0
    changes_applied: int = 0
    blocked: str | None = None  # why later changes wait behind a dead letter, or None
    ahead: int = 0  # records remembered because they came ahead of their turn (see _cr_ahead)
    ahead_since: float | None = None  # when the oldest of them arrived (None when there are none)
    tables: dict[str, TableMeta] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()  # epochs replaced by a newer agent database
    open_group: bool = False  # inside a multi-part transaction (a part with final=False was applied)
    group_started: float = 0.0  # time.monotonic() when the open multi-part transaction began
    last_resync: str | None = None  # request id of the last resync applied (its fresh copy replaced this one)
    resyncs: int = 0  # resyncs applied to this copy
    # The agent's own report (its newest status record; never sequenced): what it committed, what JetStream
    # acknowledged, why it cannot send (None: it can), of which epoch, when it said so.
    agent_epoch: str | None = None
    agent_last_seq: int | None = None
    agent_acked_seq: int | None = None
    agent_blocked: str | None = None
    agent_reported_at: float | None = None
    # The feed log (feed_log.py), mirrored: its id, the n of its last complete unit (the head; its floor when
    # empty), the floor, its rows and body bytes, whether rows of the open multi-part transaction are written
    # (final=0, to be closed by a final row), and whether a resync's refill is being applied (never logged).
    feed_id: str | None = None
    feed_n: int = 0
    feed_floor: int = 0
    feed_rows: int = 0
    feed_bytes: int = 0
    feed_open: bool = False
    feed_quiet: bool = False

    def __post_init__(self) -> None:
        self._begun: ReplicaState | None = None  # the state when the open transaction began (not a field)
        self._group: ReplicaState | None = None  # the state when the open multi-part transaction began (not a field)

    def copy(self) -> ReplicaState:
        """An independent copy (TableMeta is frozen: copying the mapping is enough)."""
        return replace(self, tables=dict(self.tables))

    def restore(self, saved: ReplicaState) -> None:
        """Become `saved` again, field by field."""
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))
        self.tables = dict(saved.tables)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Restore every field if the block raises (and re-raise)."""
        saved = self.copy()
        try:
            yield
        except BaseException:
            self.restore(saved)
            raise

    # ------------------------------------------------------------ transaction
    @property
    def in_transaction(self) -> bool:
        return self._begun is not None

    def begin(self) -> None:
        """Remember the state as of now (the last commit); a no-op inside an open transaction."""
        if self._begun is None:
            self._begun = self.copy()

    def commit(self) -> None:
        """The current state is the committed one from now on."""
        self._begun = None
        self._group = None

    def rollback(self) -> None:
        """Go back to the state `begin` remembered (a no-op outside a transaction)."""
        self._group = None
        if self._begun is not None:
            self.restore(self._begun)
            self._begun = None

    # ------------------------------------------------------------ multi-part transaction (inside the open one)
    @property
    def in_group(self) -> bool:
        return self._group is not None

    def begin_group(self) -> None:
        """Remember the state before the first part of a multi-part transaction."""
        self._group = self.copy()

    def end_group(self) -> None:
        """Its final part was applied: nothing to go back to any more."""
        self._group = None

    def abandon_group(self) -> None:
        """A part can never be applied: back to the state before the first part (the rest of the open
        transaction, records complete before it, stays)."""
        if self._group is not None:
            self.restore(self._group)
            self._group = None

    def committed(self) -> ReplicaState:
        """The state as of the last commit: what `begin` remembered while a transaction is open, else self."""
        return self._begun if self._begun is not None else self

    def changes_moved(self) -> bool:
        """Change records were applied in the open transaction (its epoch or watermark moved since `begin`)."""
        done = self.committed()
        return (self.epoch, self.watermark) != (done.epoch, done.watermark)

    def resync_applied(self) -> str | None:
        """The request id of a resync applied in the open transaction (finished when it commits), else None."""
        done = self.committed()
        return self.last_resync if self.resyncs != done.resyncs else None

    def position(self) -> Position:
        """Where the copy stands, for the ordering policy."""
        return Position(
            epoch=self.epoch,
            watermark=self.watermark,
            open_group=self.open_group,
            blocked=self.blocked is not None,
            retired=self.retired,
        )
