"""What the stream holds, read from JetStream every few seconds: the truth health and lag are measured against.

`StreamWatch` reads, each cycle: the stream's state (first/last sequence,
messages, bytes, and how many messages each `agents.<id>.changes` subject
holds), the durable consumer's pending / ack-pending counts and ack floor, and
per agent the newest message on its changes subject (`get_last_msg`). A change
record gives the newest change the agent published (`PublishedPosition`: epoch,
last_seq, committed_at); a status record gives what the agent says of itself
(`AgentReport`: its newest committed and acknowledged sequence, why it cannot
send). Only the header fields are used; anything else on the subject (a
JetStream acknowledgement stored there, a record another agent's id) is
skipped and the previous position kept.

Per-agent reads are bounded per cycle (`max_reads` messages, `max_read_bytes`
bytes): agents whose subject changed since their last read go first, then the
longest unread; hundreds of agents are covered over a few cycles.

After reading, the watch compares what exists with the central store's view
(`measure_lag`) and remembers since when each agent has been behind without
its central position moving, and since when the consumer's ack floor has not
moved while messages were pending: `status.py` turns those into problems once
they last `stuck_after` seconds.

`StreamWatch.facts` is an immutable `StreamFacts`, replaced as a whole by the
watch task on the event loop; readers (status, metrics) only read the
attribute. A failed cycle keeps the previous numbers and records why
(`error`, `failing_since`); the watch never stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import nats.js.errors
import orjson
from nats.js import JetStreamContext

from agent_client import CHANGES_SUBJECTS, RECORD_VERSION, STREAM_NAME, changes_subject, subject_agent

from .store_view import AgentView, StoreView

log = logging.getLogger("replicator.stream_watch")

#: Default seconds a "behind and not moving" state must last before health calls it a problem.
STUCK_AFTER_S = 30.0
#: Default seconds between two reads of the stream (at most; a short `stuck_after` reads more often).
WATCH_INTERVAL_S = 5.0


@dataclass(frozen=True)
class PublishedPosition:
    """The newest change record of one agent in the stream (its last message on `agents.<id>.changes`)."""

    epoch: str | None
    last_seq: int  # the record's last change sequence
    stream_seq: int  # where it is in the stream
    at: float | None  # when the agent committed it (the record's committed_at)
    first_seq: int = 0  # the record's first change sequence (0: unknown)


@dataclass(frozen=True)
class AgentReport:
    """The newest status record an agent published about itself (kind "status" on its changes subject)."""

    epoch: str | None
    last_seq: int | None  # its newest committed change
    acked_seq: int | None  # its newest change JetStream acknowledged (so the stream holds it)
    blocked: str | None  # why its publisher cannot send, or None
    at: float | None  # when the agent wrote the report
    stream_seq: int


@dataclass(frozen=True)
class Lag:
    """How far an agent's central copy is from what exists of it (`measure_lag`)."""

    epoch: str | None  # the epoch measured: the agent's newest known (the central one if nothing newer)
    published_seq: int  # the newest change known to exist in that epoch (stream, agent's report, head_seq)
    applied_seq: int  # the central watermark in that epoch (0 for an epoch the HTPC has not started)
    new_epoch: bool  # the agent is in an epoch the HTPC has not started (all of it counts as lag)

    @property
    def lag_changes(self) -> int:
        return max(0, self.published_seq - self.applied_seq)


@dataclass(frozen=True)
class Progress:
    """Whether an agent's central copy keeps up, as the watch last sampled it."""

    epoch: str | None  # the central position when sampled ...
    watermark: int  # ... (a problem only while the view still stands here)
    lag: int  # the lag measured then
    behind_since: float | None  # wall time since the agent is behind without its central position moving
    #: the oldest change record known to be unapplied; `at` is when the agent committed it (if the record
    #: said so), else when the watch first saw it: the replication delay is at least `now - at`
    oldest_unapplied: PublishedPosition | None = None

    @property
    def oldest_unapplied_at(self) -> float | None:
        return self.oldest_unapplied.at if self.oldest_unapplied is not None else None


@dataclass(frozen=True)
class StreamFacts:
    updated_at: float | None = None  # wall time of the last successful read (None: never read)
    error: str | None = None  # why the last read failed, or None
    failing_since: float | None = None  # wall time of the first failed read in a row (None: the last one worked)
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    bytes: int = 0
    consumer_exists: bool | None = None  # the durable consumer exists (None: not read yet)
    consumer_pending: int | None = None  # messages not yet delivered to the durable consumer
    consumer_ack_pending: int | None = None  # delivered, not yet acknowledged
    ack_floor: int | None = None  # every stream message up to this one is acknowledged
    ack_floor_since: float | None = None  # the ack floor has not moved since then while messages were pending
    published: Mapping[str, PublishedPosition] = field(default_factory=lambda: MappingProxyType({}))
    reports: Mapping[str, AgentReport] = field(default_factory=lambda: MappingProxyType({}))
    progress: Mapping[str, Progress] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def consumer_unfinished(self) -> int:
        """Messages the consumer has not acknowledged yet (pending + ack-pending; 0 if unknown)."""
        return (self.consumer_pending or 0) + (self.consumer_ack_pending or 0)

    def summary(self) -> dict[str, Any]:
        """The stream and consumer numbers as `/health` shows them."""
        return {
            "updated_at": self.updated_at,
            "error": self.error,
            "failing_since": self.failing_since,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "messages": self.messages,
            "bytes": self.bytes,
            "consumer_exists": self.consumer_exists,
            "consumer_pending": self.consumer_pending,
            "consumer_ack_pending": self.consumer_ack_pending,
            "ack_floor": self.ack_floor,
            "ack_floor_since": self.ack_floor_since,
        }


def measure_lag(agent: AgentView | None, published: PublishedPosition | None, report: AgentReport | None) -> Lag:
    """An agent's lag against what exists: the newest of what the stream holds for it, what it reported
    itself (its status record, in the stream or as the consumer stored it) and the highest sequence the
    HTPC saw, minus what the central store applied, in the agent's newest epoch.

    An epoch the HTPC has not started (a new agent database, a lost central copy) counts entirely; one the
    central store retired (an old database still publishing) is ignored.
    """
    central_epoch = agent.epoch if agent is not None else None
    retired: frozenset[str] = getattr(agent, "retired", frozenset()) if agent is not None else frozenset()
    known = [p for p in (published, report) if p is not None and p.epoch is not None and p.epoch not in retired]
    newest = max(known, key=lambda p: p.stream_seq) if known else None
    epoch = newest.epoch if newest is not None else central_epoch
    same = agent is not None and epoch == central_epoch
    seqs = [0]
    if same and agent is not None:
        seqs += [agent.head_seq, agent.watermark]
        if agent.agent_last_seq is not None and (report is None or report.epoch == central_epoch):
            seqs.append(agent.agent_last_seq)
    if published is not None and published.epoch == epoch:
        seqs.append(published.last_seq)
    if report is not None and report.epoch == epoch:
        seqs += [s for s in (report.last_seq, report.acked_seq) if s is not None]
    applied = agent.watermark if same and agent is not None else 0
    return Lag(epoch, max(seqs), applied, new_epoch=not same and epoch is not None)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def decode_last(agent: str, data: bytes, stream_seq: int) -> PublishedPosition | AgentReport | None:
    """The header of an agent's message: its change position, its status report, or None for anything else
    (not JSON, another agent's record, a JetStream acknowledgement stored on the subject, a record whose
    header contradicts itself). Only header fields are checked; the consumer validates the rest."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict) or body.get("agent_id") != agent or body.get("v") != RECORD_VERSION:
        return None
    epoch = _str(body.get("epoch"))
    kind = body.get("kind", "changes")
    if kind == "changes":
        first, last = _int(body.get("first_seq")), _int(body.get("last_seq"))
        changes = body.get("changes")
        if epoch is None or first is None or last is None or not 1 <= first <= last:
            return None
        if not isinstance(changes, list) or len(changes) != last - first + 1:
            return None  # the consumer dead-letters it without a place in the agent's sequence
        return PublishedPosition(epoch, last, stream_seq, _float(body.get("committed_at")), first)
    if kind == "status":
        return AgentReport(
            epoch,
            _int(body.get("last_seq")),
            _int(body.get("acked_seq")),
            _str(body.get("blocked")),
            _float(body.get("at")),
            stream_seq,
        )
    return None


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class StreamWatch:
    def __init__(
        self,
        js: Callable[[], JetStreamContext | None],
        durable: str,
        agents: Callable[[], Iterable[str]],
        *,
        view: Callable[[], StoreView] | None = None,
        stuck_after: float = STUCK_AFTER_S,
        interval: float | None = None,
        max_reads: int = 32,
        max_read_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._js = js
        self.durable = durable
        self._agents = agents
        self._view = view or _view_of(agents)
        self.stuck_after = stuck_after
        # Three looks at the stream within `stuck_after`, never more often than twice a second.
        self.interval = interval if interval is not None else max(0.5, min(WATCH_INTERVAL_S, stuck_after / 3))
        self.max_reads = max_reads
        self.max_read_bytes = max_read_bytes
        self.facts = StreamFacts()
        self._subject_counts: dict[str, int] = {}  # per agent: its subject's message count at its last read
        self._read_at: dict[str, float] = {}  # per agent: monotonic time of its last read
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval if self.facts.error is None else min(self.interval, 1.0))
            await self.refresh()

    async def refresh(self) -> StreamFacts:
        """One cycle: read the stream, the consumer and the agents due; never raises (errors go in facts)."""
        previous = self.facts
        try:
            # Bounded: every request has its own timeout, and the cycle as a whole has one too.
            facts = await asyncio.wait_for(self._read(previous), timeout=max(10.0, self.interval * 3))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS down, a timeout, a JetStream API error: recorded, never fatal
            now = time.time()
            facts = replace(previous, error=_error_text(exc), failing_since=previous.failing_since or now)
            if previous.error is None:
                log.warning("stream watch: cannot read stream %s: %s", STREAM_NAME, facts.error)
            else:
                log.debug("stream watch: still failing: %s", facts.error)
        else:
            if previous.error is not None:
                log.info("stream watch: reading stream %s again", STREAM_NAME)
        self.facts = facts
        return facts

    async def _read(self, previous: StreamFacts) -> StreamFacts:
        js = self._js()
        if js is None:
            raise ConnectionError("no JetStream connection")
        info = await js.stream_info(STREAM_NAME, subjects_filter=CHANGES_SUBJECTS)
        state = info.state
        counts: dict[str, int] = {}
        for subject, n in (state.subjects or {}).items():
            agent = subject_agent(subject)
            if agent is not None:
                counts[agent] = n
        try:
            consumer = await js.consumer_info(STREAM_NAME, self.durable)
        except nats.js.errors.NotFoundError:
            consumer = None
        published = dict(previous.published)
        reports = dict(previous.reports)
        for gone in (set(published) | set(reports) | set(self._read_at)) - set(counts):
            # Nothing of it left in the stream (aged out): nothing to measure it against.
            published.pop(gone, None)
            reports.pop(gone, None)
            self._subject_counts.pop(gone, None)
            self._read_at.pop(gone, None)
        await self._read_agents(js, counts, published, reports)
        now = time.time()
        pending = consumer.num_pending if consumer is not None else None
        ack_pending = consumer.num_ack_pending if consumer is not None else None
        floor = consumer.ack_floor.stream_seq if consumer is not None and consumer.ack_floor is not None else None
        facts = StreamFacts(
            updated_at=now,
            first_seq=state.first_seq,
            last_seq=state.last_seq,
            messages=state.messages,
            bytes=state.bytes,
            consumer_exists=consumer is not None,
            consumer_pending=pending,
            consumer_ack_pending=ack_pending,
            ack_floor=floor,
            ack_floor_since=_ack_floor_since(previous, floor, (pending or 0) + (ack_pending or 0), now),
            published=MappingProxyType(published),
            reports=MappingProxyType(reports),
        )
        view = self._view() if self._view is not None else StoreView()
        return replace(facts, progress=MappingProxyType(track_progress(previous.progress, view, facts, now)))

    async def _read_agents(
        self,
        js: JetStreamContext,
        counts: Mapping[str, int],
        published: dict[str, PublishedPosition],
        reports: dict[str, AgentReport],
    ) -> None:
        """Read the newest message of the agents due (bounded), updating `published` and `reports`."""
        changed = [a for a in counts if counts[a] != self._subject_counts.get(a)]
        unchanged = [a for a in counts if counts[a] == self._subject_counts.get(a)]
        by_age = sorted(changed, key=lambda a: self._read_at.get(a, 0.0)) + sorted(
            unchanged, key=lambda a: self._read_at.get(a, 0.0)
        )
        budget = self.max_read_bytes
        due = by_age[: self.max_reads]
        for i in range(0, len(due), 8):
            if budget <= 0:
                return
            chunk = due[i : i + 8]
            found = await asyncio.gather(*(self._read_last(js, a) for a in chunk))
            for agent, (msg_seq, data) in zip(chunk, found, strict=True):
                self._subject_counts[agent] = counts[agent]
                self._read_at[agent] = time.monotonic()
                budget -= len(data)
                if msg_seq is None:
                    published.pop(agent, None)
                    continue
                got = decode_last(agent, data, msg_seq)
                if isinstance(got, PublishedPosition):
                    published[agent] = got
                elif isinstance(got, AgentReport):
                    reports[agent] = got

    async def _read_last(self, js: JetStreamContext, agent: str) -> tuple[int | None, bytes]:
        try:
            msg = await js.get_last_msg(STREAM_NAME, changes_subject(agent))
        except nats.js.errors.NotFoundError:
            return None, b""
        return msg.seq, msg.data or b""


def _ack_floor_since(previous: StreamFacts, floor: int | None, unfinished: int, now: float) -> float | None:
    """Since when the ack floor stands still while messages wait (None: nothing waits, or it moved)."""
    if floor is None or unfinished == 0:
        return None
    if previous.ack_floor == floor and previous.ack_floor_since is not None:
        return previous.ack_floor_since
    return now


def track_progress(
    previous: Mapping[str, Progress], view: StoreView, facts: StreamFacts, now: float
) -> dict[str, Progress]:
    """Each agent's progress now, continuing `previous`: behind since when (without its central position
    moving), and when the oldest change known to be unapplied was committed."""
    out: dict[str, Progress] = {}
    for agent_id in sorted(set(view.agents) | set(facts.published) | set(facts.reports)):
        agent = view.agents.get(agent_id)
        published, report = facts.published.get(agent_id), facts.reports.get(agent_id)
        lag = measure_lag(agent, published, report)
        epoch, watermark = (agent.epoch, agent.watermark) if agent is not None else (None, 0)
        before = previous.get(agent_id)
        if lag.lag_changes == 0:
            out[agent_id] = Progress(epoch, watermark, 0, None)
            continue
        stood = (
            before is not None
            and before.behind_since is not None
            and (before.epoch, before.watermark)
            == (
                epoch,
                watermark,
            )
        )
        behind_since = before.behind_since if stood and before is not None else now
        oldest = before.oldest_unapplied if before is not None else None
        if oldest is None or oldest.epoch != lag.epoch or oldest.last_seq <= lag.applied_seq:
            oldest = _oldest_unapplied(lag, published, report, now)
        out[agent_id] = Progress(epoch, watermark, lag.lag_changes, behind_since, oldest)
    return out


def _oldest_unapplied(
    lag: Lag, published: PublishedPosition | None, report: AgentReport | None, now: float
) -> PublishedPosition:
    """The oldest unapplied change record known when an agent is first seen behind: the newest one in the
    stream (its commit time, else now), or what the agent reported (first seen now)."""
    if published is not None and published.epoch == lag.epoch and published.last_seq > lag.applied_seq:
        return published if published.at is not None else replace(published, at=now)
    stream_seq = report.stream_seq if report is not None else 0
    return PublishedPosition(lag.epoch, lag.published_seq, stream_seq, now)


def _view_of(agents: Callable[[], Iterable[str]]) -> Callable[[], StoreView] | None:
    """The store view behind `agents` when it is a bound `CentralStore.agent_ids` (the service's wiring)."""
    owner = getattr(agents, "__self__", None)
    if owner is None or not isinstance(getattr(owner, "view", None), StoreView):
        return None

    def view() -> StoreView:
        found = owner.view
        return found if isinstance(found, StoreView) else StoreView()

    return view
