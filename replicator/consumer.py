"""The durable pull consumer that turns the change stream into central copies.

Per agent, records are applied in sequence order: what becomes of each record
is the sequencer's verdict (replicator/sequencer.py), and this module carries
it out. A batch of fetched messages is applied on one thread (SQLite work never
blocks the event loop), each record in a savepoint inside its agent's
transaction; each agent's transaction commits once per batch, and only then
are its messages acked. Duplicates are acked, gaps are nak'ed with a delay (the
publisher's retransmission or JetStream's redelivery fills them), and anything
that cannot be decoded or applied is written to the dead-letter store and
terminated, while the consumer carries on.

The apply thread owns the central store's replicas. After each batch (and
after rolling back an expired multi-part transaction) it publishes what the
event loop may read: the store's view, the open groups and the parked messages.

A watchdog bounds every `fetch`: nats-py has been seen to stall in fetch
(nats-py issue #986), and a stalled consumer looks exactly like an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agent_client import (
    STREAM_NAME,
    Backoff,
    ChangeRecord,
    RecordDecodeError,
    RelayRecord,
    consumer_config,
    decode_record,
    relay_subject_agent,
    subject_agent,
)

from .central_store import AgentReplica, CentralStore
from .dead_letters import DeadLetterStore
from .errors import RecordRejected
from .sequencer import RecordHeader, Verdict, sequence

log = logging.getLogger("replicator.consumer")


class _Action(enum.Enum):
    """What becomes of a delivered message in JetStream."""

    ACK = "ack"
    NAK = "nak"  # with the consumer's nak delay: redelivered later
    TERM = "term"  # never redelivered (it is in the dead-letter store)
    HOLD = "hold"  # kept in progress until its multi-part transaction commits (then ack) or is abandoned (nak)


class _Applied(enum.Enum):
    """How writing an APPLY / NEW_EPOCH record into its agent's open transaction went."""

    WRITTEN = "written"
    FAILED = "failed"  # unexpected (I/O): rolled back to the savepoint, to be retried


class _Commit(enum.Enum):
    """What became of an agent's transaction at the end of the batch."""

    COMMITTED = "committed"
    FAILED = "failed"  # rolled back: everything of the agent in it is redelivered
    OPEN = "open"  # inside a multi-part transaction: its final part has not arrived yet


def _nats_action(verdict: Verdict, applied: _Applied | None, commit: _Commit | None) -> _Action:
    """Carry out the sequencer's verdict on a message, given how applying it and its agent's commit went."""
    if verdict is Verdict.DEAD_LETTER:
        return _Action.TERM
    if verdict in (Verdict.DUPLICATE, Verdict.STALE_EPOCH):
        return _Action.ACK
    if verdict in (Verdict.GAP, Verdict.BLOCKED) or applied is not _Applied.WRITTEN:
        return _Action.NAK
    if commit is _Commit.COMMITTED:
        return _Action.ACK
    if commit is _Commit.OPEN:
        return _Action.HOLD
    return _Action.NAK


@dataclass
class _Item:
    subject: str
    data: bytes
    stream_seq: int | None


@dataclass(frozen=True)
class _Step:
    """One message's fate on the apply thread, before its agent's commit."""

    verdict: Verdict
    agent: str | None
    applied: _Applied | None = None


@dataclass
class _BatchResult:
    actions: list[tuple[_Action, str | None]]  # (action, agent id) per message
    committed: list[str] = field(default_factory=list)  # agents whose transaction committed
    failed: list[str] = field(default_factory=list)  # agents whose commit failed (nak everything of theirs)


@dataclass
class ConsumerStats:
    batches: int = 0
    messages: int = 0
    applied: int = 0
    duplicates: int = 0
    stale: int = 0
    gaps: int = 0
    dead_letters: int = 0
    fetch_stalls: int = 0
    commit_failures: int = 0
    apply_seconds: float = 0.0
    last_fetch_at: float | None = None
    last_apply_at: float | None = None


class Consumer:
    def __init__(
        self,
        js: JetStreamContext,
        store: CentralStore,
        dead_letters: DeadLetterStore,
        *,
        durable: str = "replicator",
        batch: int = 256,
        fetch_timeout: float = 0.5,
        fetch_watchdog: float = 10.0,
        nak_delay: float = 0.2,
        group_timeout: float = 20.0,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        opt_start_seq: int | None = None,
    ) -> None:
        self.js = js
        self.store = store
        self.dead_letters = dead_letters
        self.durable = durable
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.fetch_watchdog = fetch_watchdog
        self.nak_delay = nak_delay
        self.group_timeout = group_timeout
        self.config = consumer_config(durable, deliver_policy=deliver_policy, opt_start_seq=opt_start_seq)
        self.ack_wait = float(self.config.ack_wait or 0.0)
        self.stats = ConsumerStats()
        self._relay_pruned = time.monotonic()
        self.running = False
        self.max_stream_seq = 0
        self.last_error: str | None = None
        self.on_batch: Callable[[int], None] | None = None
        self._applied_changed = asyncio.Condition()
        self._held: dict[str, list[Msg]] = defaultdict(list)
        self._held_touched = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None
        # Owned by the apply thread; the event loop reads only the immutable snapshots published after each batch.
        self._parked: dict[str, set[int]] = defaultdict(set)  # stream seqs nak'ed behind a blocked agent's dead letter
        self._parked_now: frozenset[int] = frozenset()  # those of agents still blocked (snapshot)
        self._open_groups: Mapping[str, float] = MappingProxyType({})  # agent -> monotonic start (snapshot)

    # ------------------------------------------------------------ public
    def applied(self, agent_id: str) -> tuple[str | None, int]:
        """(epoch, watermark) committed for the agent."""
        view = self.store.view.agent(agent_id)
        return (view.epoch, view.watermark) if view is not None else (None, 0)

    async def wait_applied(self, agent_id: str, min_seq: int, timeout: float, epoch: str | None = None) -> bool:
        def ready() -> bool:
            ep, wm = self.applied(agent_id)
            if epoch is not None and ep != epoch:
                return False
            return wm >= min_seq

        async with self._applied_changed:
            try:
                await asyncio.wait_for(self._applied_changed.wait_for(ready), timeout)
                return True
            except TimeoutError:
                return ready()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="replicator-consumer")

    async def stop(self) -> None:
        """Finish the batch in hand (commit + ack), then stop."""
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 15)
        await self._abandon_open_groups()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ loop
    async def _subscribe(self) -> Any:
        # Create the durable, or keep the existing one (rebuild may have set where it starts). One made before
        # relay writes had their own subject filters on change records only: widen it to every subject.
        try:
            info = await self.js.consumer_info(STREAM_NAME, self.durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(STREAM_NAME, config=dataclasses.replace(self.config, name=self.durable))
        else:
            if info.config.filter_subject or info.config.filter_subjects:
                widened = dataclasses.replace(info.config, filter_subject=None, filter_subjects=None)
                await self.js.add_consumer(STREAM_NAME, config=widened)
                log.warning("consumer %s: now reads every subject of %s", self.durable, STREAM_NAME)
        return await self.js.pull_subscribe_bind(durable=self.durable, stream=STREAM_NAME)

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until stopped (or, with until_idle, until nothing is pending or unacked)."""
        self.running = True
        backoff = Backoff(0.2, 5.0)
        try:
            while not self._stopping:
                try:
                    if self._sub is None:
                        self._sub = await self._subscribe()
                    msgs = await self._fetch()
                    backoff.reset()
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    delay = backoff.next()
                    log.warning("consumer: %s; retrying in %.1fs", self.last_error, delay)
                    self._sub = None
                    await asyncio.sleep(delay)
                    continue
                await self._touch_held()
                await self._expire_open_groups()  # also under load: other agents' traffic must not hide it
                if msgs:
                    await self._handle(msgs)
                    if until_idle and self._all_parked(msgs) and await self._idle():
                        return  # only records waiting behind a dead letter keep coming back
                else:
                    await self._forget_acked_relay()
                    if until_idle and await self._idle():
                        return
        finally:
            self.running = False

    def _all_parked(self, msgs: list[Msg]) -> bool:
        parked = self._parked_now
        return all(m.reply and m.metadata.sequence.stream in parked for m in msgs)

    async def _idle(self) -> bool:
        info = await self._sub.consumer_info()
        # Records waiting behind a dead letter stay unacked for good: they must not keep a rebuild from finishing.
        return bool(info.num_pending == 0 and info.num_ack_pending <= len(self._parked_now) and not self._held)

    async def _fetch(self) -> list[Msg]:
        try:
            msgs: list[Msg] = await asyncio.wait_for(
                self._sub.fetch(self.batch, timeout=self.fetch_timeout), self.fetch_timeout + self.fetch_watchdog
            )
        except nats.errors.TimeoutError:
            msgs = []
        except TimeoutError:
            # The watchdog fired: fetch itself hung. Drop the subscription and bind again.
            self.stats.fetch_stalls += 1
            log.warning("consumer: fetch stalled for %.0fs; resubscribing", self.fetch_timeout + self.fetch_watchdog)
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
            msgs = []
        self.stats.last_fetch_at = time.time()
        return msgs

    async def _handle(self, msgs: list[Msg]) -> None:
        items = [_Item(m.subject, m.data, m.metadata.sequence.stream if m.reply else None) for m in msgs]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        result = await loop.run_in_executor(self._executor, self._process_batch, items)
        self.stats.apply_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.stats.last_apply_at = time.time()
        self.max_stream_seq = max([self.max_stream_seq, *(i.stream_seq or 0 for i in items)])
        if result.committed:  # readers waiting for min_seq may go as soon as the data is committed
            async with self._applied_changed:
                self._applied_changed.notify_all()
        acks: list[Any] = []
        for msg, (action, agent) in zip(msgs, result.actions, strict=True):
            if action is _Action.ACK:
                acks.append(msg.ack())
            elif action is _Action.NAK:
                acks.append(msg.nak(delay=self.nak_delay))
            elif action is _Action.TERM:
                acks.append(msg.term())
            elif action is _Action.HOLD and agent is not None:
                self._held[agent].append(msg)
        for agent in result.committed:
            acks.extend(m.ack() for m in self._held.pop(agent, []))
        for agent in result.failed:
            acks.extend(m.nak(delay=self.nak_delay) for m in self._held.pop(agent, []))
        for coro in acks:
            try:
                await coro
            except Exception as exc:  # a lost ack only causes a harmless redelivery
                log.debug("ack failed: %r", exc)
        if self.on_batch is not None:
            self.on_batch(len(msgs))

    async def _touch_held(self) -> None:
        """Keep held parts of an open multi-part transaction from being redelivered while we wait."""
        now = time.monotonic()
        if not self._held or now - self._held_touched < self.ack_wait / 3:
            return
        self._held_touched = now
        for msgs in self._held.values():
            for m in msgs:
                with contextlib.suppress(Exception):
                    await m.in_progress()

    async def _forget_acked_relay(self) -> None:
        now = time.monotonic()
        if self._sub is None or now - self._relay_pruned < 60:
            return
        self._relay_pruned = now
        try:
            info = await self._sub.consumer_info()
        except Exception:  # only housekeeping: next time
            return
        if info.ack_floor is not None and info.ack_floor.stream_seq:
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.store.forget_relay_seen, info.ack_floor.stream_seq
            )

    async def _expire_open_groups(self) -> None:
        now = time.monotonic()
        stale = [a for a, started in self._open_groups.items() if now - started > self.group_timeout]
        if not stale:
            return
        rolled_back = await asyncio.get_running_loop().run_in_executor(self._executor, self._rollback, stale)
        for agent in rolled_back:
            log.warning("agent %s: multi-part transaction incomplete after %.0fs; retrying", agent, self.group_timeout)
            for m in self._held.pop(agent, []):
                with contextlib.suppress(Exception):
                    await m.nak(delay=self.nak_delay)

    async def _abandon_open_groups(self) -> None:
        rolled_back = await asyncio.get_running_loop().run_in_executor(self._executor, self._rollback, None)
        for agent in rolled_back:
            for m in self._held.pop(agent, []):
                with contextlib.suppress(Exception):
                    await m.nak()

    # ------------------------------------------------------------ apply thread
    def _rollback(self, agents: list[str] | None) -> list[str]:
        """Roll back the open transactions of `agents` (None: of every agent); the agents rolled back."""
        if agents is None:
            agents = [a for a, rep in self.store.replicas.items() if rep.in_txn]
        done: list[str] = []
        for agent in agents:
            rep = self.store.replicas.get(agent)
            if rep is not None and rep.in_txn:
                rep.rollback()
                done.append(agent)
        self._publish(done, done)
        return done

    def _publish(self, seen: Iterable[str], touched: Iterable[str]) -> None:
        """Publish what the event loop may read: the store view, open groups, parked messages."""
        self.store.publish_view(seen)
        groups = dict(self._open_groups)
        for agent in touched:
            rep = self.store.replicas.get(agent)
            if rep is not None and rep.in_txn and rep.state.open_group:
                groups[agent] = rep.state.group_started
            else:
                groups.pop(agent, None)
        self._open_groups = MappingProxyType(groups)
        self._parked_now = frozenset(
            seq
            for agent, seqs in self._parked.items()
            if (rep := self.store.replicas.get(agent)) is not None and rep.state.blocked is not None
            for seq in seqs
        )

    def _process_batch(self, items: list[_Item]) -> _BatchResult:
        touched: dict[str, AgentReplica] = {}  # agents whose transaction this batch wrote into
        seen: set[str] = set()  # agents with any record in this batch
        steps = [self._process_one(item, touched, seen) for item in items]
        commits: dict[str, _Commit] = {}
        for agent, rep in touched.items():
            if not rep.in_txn:
                commits[agent] = _Commit.COMMITTED
            elif rep.state.open_group:
                commits[agent] = _Commit.OPEN  # inside a multi-part transaction still open
            else:
                try:
                    rep.commit()
                    commits[agent] = _Commit.COMMITTED
                except Exception as exc:  # disk full, I/O error: nothing of this batch is lost, it is redelivered
                    self.stats.commit_failures += 1
                    self.last_error = f"commit for {agent} failed: {exc}"
                    log.error("%s", self.last_error)
                    rep.rollback()
                    commits[agent] = _Commit.FAILED
        result = _BatchResult(
            [(_nats_action(s.verdict, s.applied, commits.get(s.agent) if s.agent else None), s.agent) for s in steps],
            committed=[a for a, c in commits.items() if c is _Commit.COMMITTED],
            failed=[a for a, c in commits.items() if c is _Commit.FAILED],
        )
        self._publish(seen, touched)  # readers on the event loop see this batch's commits from now on
        return result

    def _dead(self, item: _Item, agent: str | None, reason: str) -> _Step:
        self.dead_letters.add(
            agent_id=agent, subject=item.subject, stream_seq=item.stream_seq, reason=reason, payload=item.data
        )
        self.stats.dead_letters += 1
        log.warning("dead letter (agent %s, stream seq %s): %s", agent, item.stream_seq, reason)
        return _Step(Verdict.DEAD_LETTER, agent)

    def _process_one(self, item: _Item, touched: dict[str, AgentReplica], seen: set[str]) -> _Step:
        relay_owner = relay_subject_agent(item.subject)
        owner = relay_owner or subject_agent(item.subject)
        if owner is None:
            return self._dead(item, None, f"unexpected subject {item.subject!r}")
        try:
            rec = decode_record(item.data)
        except RecordDecodeError as exc:
            return self._dead(item, owner, str(exc))
        if isinstance(rec, RelayRecord) != (relay_owner is not None):
            # Relay writes come only from the HTPC's own key (agents may not publish on relay subjects), and an
            # agent's key may not pass its records off as relay writes into its own or anyone's tables.
            what = "a relay record" if isinstance(rec, RelayRecord) else "a change record"
            return self._dead(item, owner, f"{what} may not be published on {item.subject!r}")
        header = RecordHeader.of(owner, rec)
        verdict = sequence(self.store.position(owner), header)
        if verdict is Verdict.DEAD_LETTER:
            return self._dead(item, owner, f"record says agent {rec.agent_id!r} but was published on {item.subject!r}")
        try:
            rep = self.store.replica(owner)
        except RecordRejected as exc:
            return self._dead(item, owner, str(exc))
        seen.add(owner)
        rep.observe(header, verdict)
        if verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
            return _Step(verdict, owner)
        if verdict is Verdict.STALE_EPOCH:
            self.stats.stale += 1
            return _Step(verdict, owner)
        if verdict in (Verdict.GAP, Verdict.BLOCKED):
            self.stats.gaps += 1
            if verdict is Verdict.BLOCKED and item.stream_seq is not None:
                self._parked[owner].add(item.stream_seq)
            return _Step(verdict, owner)
        rep.begin()
        touched[owner] = rep
        try:
            with rep.record_savepoint():
                if isinstance(rec, RelayRecord):
                    written = rep.apply_relay(rec, item.stream_seq)
                else:
                    rep.apply_changes(rec)
                    written = True
        except RecordRejected as exc:
            if isinstance(rec, ChangeRecord):
                # Survives a restart (stored with the batch's commit); later changes wait behind it.
                rep.set_blocked(
                    f"changes {rec.first_seq}-{rec.last_seq} dead-lettered ({exc}); later changes wait behind them"
                )
            return self._dead(item, owner, str(exc))
        except Exception as exc:  # unexpected (I/O): roll back and retry later rather than lose it
            self.last_error = f"apply failed for {owner}: {exc!r}"
            log.error("%s", self.last_error)
            return _Step(verdict, owner, _Applied.FAILED)
        if not written:
            self.stats.duplicates += 1  # a relay record applied before whose ack was lost
            return _Step(verdict, owner, _Applied.WRITTEN)
        self.stats.applied += 1
        if isinstance(rec, ChangeRecord) and rep.state.blocked is not None:
            rep.set_blocked(None)  # the sequence moved on (e.g. a new epoch): no longer blocked
            self._parked.pop(owner, None)
        return _Step(verdict, owner, _Applied.WRITTEN)
