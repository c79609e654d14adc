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

    def __post_init__(self) -> None:
        self._begun: ReplicaState | None = None  # the state when the open transaction began (not a field)

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

    def rollback(self) -> None:
        """Go back to the state `begin` remembered (a no-op outside a transaction)."""
        if self._begun is not None:
            self.restore(self._begun)
            self._begun = None

    def committed(self) -> ReplicaState:
        """The state as of the last commit: what `begin` remembered while a transaction is open, else self."""
        return self._begun if self._begun is not None else self

    def position(self) -> Position:
        """Where the copy stands, for the ordering policy."""
        return Position(
            epoch=self.epoch,
            watermark=self.watermark,
            open_group=self.open_group,
            blocked=self.blocked is not None,
            retired=self.retired,
        )
