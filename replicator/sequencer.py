"""The ordering policy: what to do with a record, given where its agent's central copy stands.

Per agent, change records are applied in sequence order within an epoch (one
agent database). `sequence` decides, from the replica's position and the
record's header alone, what becomes of a record; it touches no NATS, no SQLite
and no clock. The consumer carries the verdict out (apply it, ack, nak, term)
and the central store applies what is to be applied.

A resync record (its first change is R: the agent's fresh full copy, asked for
by resync.py) is the one way back from a broken sequence: it is applied
whatever was missing, open or blocked before it. A status record (the agent's
report about itself) is never sequenced.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from agent_client import AgentStatusRecord, ChangeRecord, RelayRecord


class Verdict(enum.Enum):
    APPLY = "apply"  # the next records of the current epoch (or a relay write): apply them
    NEW_EPOCH = "new_epoch"  # the first record of a new agent database: drop the old copy, then apply it
    DUPLICATE = "duplicate"  # already applied: ack it
    STALE_EPOCH = "stale_epoch"  # from an agent database since replaced: ack and drop it
    GAP = "gap"  # an earlier record is missing: nak it with a delay, the missing one comes first
    BLOCKED = "blocked"  # a gap behind a dead letter: nak it and park it until the sequence moves on
    DEAD_LETTER = "dead_letter"  # can never be applied (here: published on another agent's subject)
    RESYNC = "resync"  # a fresh full copy from the agent: replace its central copy with it (see below)
    STATUS = "status"  # the agent's report about itself: never sequenced, kept as the newest report


@dataclass(frozen=True)
class Position:
    """Where an agent's central copy stands (the live state, inside its open transaction if any)."""

    epoch: str | None = None
    watermark: int = 0  # last change sequence applied in `epoch`
    open_group: bool = False  # inside a multi-part transaction (a part with final=False was applied)
    blocked: bool = False  # a dead letter broke this agent's sequence
    retired: frozenset[str] = frozenset()  # epochs replaced by a newer one

    def is_retired(self, epoch: str | None) -> bool:
        return self.epoch is not None and epoch in self.retired


@dataclass(frozen=True)
class RecordHeader:
    """What the policy needs of a record: who sent it, and which changes of which epoch it carries."""

    subject_agent: str  # the agent whose subject it was published on
    record_agent: str  # the agent the record says it is from
    kind: Literal["changes", "relay", "status"]
    epoch: str | None = None
    first_seq: int = 0
    last_seq: int = 0
    final: bool = True  # the last part of its transaction
    resync: str | None = None  # the request id of a resync record (its first change is R), else None

    @classmethod
    def of(cls, subject_agent: str, record: ChangeRecord | RelayRecord | AgentStatusRecord) -> RecordHeader:
        if isinstance(record, RelayRecord):
            return cls(subject_agent, record.agent_id, "relay")
        if isinstance(record, AgentStatusRecord):
            return cls(subject_agent, record.agent_id, "status", record.epoch)
        return cls(
            subject_agent,
            record.agent_id,
            "changes",
            record.epoch,
            record.first_seq,
            record.last_seq,
            record.final,
            record.resync_request,
        )


def sequence(position: Position, header: RecordHeader) -> Verdict:
    """The verdict on a record whose agent's copy stands at `position`."""
    if header.record_agent != header.subject_agent:
        return Verdict.DEAD_LETTER
    if header.kind == "relay":
        return Verdict.APPLY  # relay writes carry no sequence (the store dedups their redeliveries)
    if header.kind == "status":
        return Verdict.STATUS
    if header.resync is not None:
        resync = _resync(position, header)
        if resync is not None:
            return resync
    verdict = _changes(position, header)
    if verdict is Verdict.GAP and position.blocked:
        return Verdict.BLOCKED
    return verdict


def _resync(position: Position, header: RecordHeader) -> Verdict | None:
    """A resync record replaces everything before it: RESYNC when it is news, None to judge it as usual.

    It is news when it starts above the watermark of the current epoch (whatever is missing, open or blocked
    before it is superseded by the snapshot that follows), or when its epoch is new or unknown (a central
    copy lost, or started from the middle of an agent database). One of a retired epoch is stale; one at or
    below the watermark was applied already (its later parts, duplicates, follow the usual rules).
    """
    if header.epoch == position.epoch:
        return Verdict.RESYNC if header.first_seq > position.watermark else None
    if position.is_retired(header.epoch):
        return Verdict.STALE_EPOCH
    return Verdict.RESYNC


def _changes(position: Position, header: RecordHeader) -> Verdict:
    if header.epoch != position.epoch:
        if position.is_retired(header.epoch):
            return Verdict.STALE_EPOCH
        if header.first_seq != 1:
            return Verdict.GAP  # a new epoch must start from its first change
        return Verdict.NEW_EPOCH
    if header.last_seq <= position.watermark and not position.open_group:
        return Verdict.DUPLICATE
    if position.open_group and header.first_seq != position.watermark + 1:
        # Inside a multi-part transaction only its next part may follow.
        return Verdict.DUPLICATE if header.last_seq <= position.watermark else Verdict.GAP
    if header.first_seq > position.watermark + 1:
        return Verdict.GAP
    return Verdict.APPLY
