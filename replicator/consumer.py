"""The durable pull consumer that turns the change stream into central copies.

Per agent, records are applied in sequence order. A batch of fetched messages
is applied on one thread (SQLite work never blocks the event loop), each
record in a savepoint inside its agent's transaction; each agent's
transaction commits once per batch, and only then are its messages acked.
Duplicates are acked, gaps are nak'ed with a delay (the publisher's
retransmission or JetStream's redelivery fills them), and anything that
cannot be decoded or applied is written to the dead-letter store and
terminated, while the consumer carries on.

A watchdog bounds every `fetch`: nats-py has been seen to stall in fetch
(nats-py issue #986), and a stalled consumer looks exactly like an idle one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from agent_client import STREAM_NAME, STREAM_SUBJECTS, ChangeRecord, RecordDecodeError, RelayRecord, decode_record

from .central_store import AgentReplica, CentralStore, Outcome
from .dead_letters import DeadLetterStore
from .errors import RecordRejected

log = logging.getLogger("replicator.consumer")

ACK, NAK, TERM, HOLD = "ack", "nak", "term", "hold"
_APPLIED = "applied"  # written in the agent's open transaction: ack once it commits


@dataclass
class _Item:
    subject: str
    data: bytes
    stream_seq: int | None


@dataclass
class _BatchResult:
    actions: list[tuple[str, str | None]]  # (action, agent id) per message
    committed: list[str] = field(default_factory=list)  # agents whose transaction committed
    abandoned: list[str] = field(default_factory=list)  # agents whose open multi-part group was rolled back
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


def _subject_agent(subject: str) -> str | None:
    parts = subject.split(".")
    if len(parts) == 3 and parts[0] == "agents" and parts[2] == "changes":
        return parts[1]
    return None


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
        ack_wait: float = 5.0,
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
        self.ack_wait = ack_wait
        self.deliver_policy = deliver_policy
        self.opt_start_seq = opt_start_seq
        self.stats = ConsumerStats()
        self.blocked: dict[str, str] = {a: r.blocked for a, r in store.replicas.items() if r.blocked}
        self._relay_pruned = time.monotonic()
        self._parked: dict[str, set[int]] = defaultdict(set)  # stream seqs nak'ed behind a blocked agent's dead letter
        self.running = False
        self.max_stream_seq = 0
        self.last_error: str | None = None
        self.on_batch: Callable[[int], None] | None = None
        self._applied: dict[str, tuple[str | None, int]] = {
            a: (r.epoch, r.watermark) for a, r in store.replicas.items()
        }
        self._applied_changed = asyncio.Condition()
        self._held: dict[str, list[Msg]] = defaultdict(list)
        self._held_touched = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None

    # ------------------------------------------------------------ public
    def applied(self, agent_id: str) -> tuple[str | None, int]:
        """(epoch, watermark) committed for the agent."""
        return self._applied.get(agent_id, (None, 0))

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
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=self.deliver_policy,
            opt_start_seq=self.opt_start_seq,
            ack_wait=self.ack_wait,
            max_deliver=-1,
            max_ack_pending=max(20_000, self.batch * 8),
            filter_subject=STREAM_SUBJECTS[0],
        )
        return await self.js.pull_subscribe(STREAM_SUBJECTS[0], durable=self.durable, stream=STREAM_NAME, config=config)

    async def run(self, *, until_idle: bool = False) -> None:
        """Consume until stopped (or, with until_idle, until nothing is pending or unacked)."""
        self.running = True
        backoff = 0.2
        try:
            while not self._stopping:
                try:
                    if self._sub is None:
                        self._sub = await self._subscribe()
                    msgs = await self._fetch()
                    backoff = 0.2
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("consumer: %s; retrying in %.1fs", self.last_error, backoff)
                    self._sub = None
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
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
        parked = {seq for agent, seqs in self._parked.items() if agent in self.blocked for seq in seqs}
        return all(m.reply and m.metadata.sequence.stream in parked for m in msgs)

    async def _idle(self) -> bool:
        info = await self._sub.consumer_info()
        # Records waiting behind a dead letter stay unacked for good: they must not keep a rebuild from finishing.
        parked = sum(len(seqs) for agent, seqs in self._parked.items() if agent in self.blocked)
        return bool(info.num_pending == 0 and info.num_ack_pending <= parked and not self._held)

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
            for committed in result.committed:
                rep = self.store.replicas[committed]
                self._applied[committed] = (rep.epoch, rep.watermark)
            async with self._applied_changed:
                self._applied_changed.notify_all()
        acks: list[Any] = []
        for msg, (action, agent) in zip(msgs, result.actions, strict=True):
            if action == ACK:
                acks.append(msg.ack())
            elif action == NAK:
                acks.append(msg.nak(delay=self.nak_delay))
            elif action == TERM:
                acks.append(msg.term())
            elif action == HOLD and agent is not None:
                self._held[agent].append(msg)
        for agent in result.committed:
            acks.extend(m.ack() for m in self._held.pop(agent, []))
        for agent in result.abandoned + result.failed:
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
        stale = [
            a for a, r in self.store.replicas.items() if r.open_group and now - r.group_started > self.group_timeout
        ]
        if stale:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._rollback, stale)
            for agent in stale:
                log.warning(
                    "agent %s: multi-part transaction incomplete after %.0fs; retrying", agent, self.group_timeout
                )
                for m in self._held.pop(agent, []):
                    with contextlib.suppress(Exception):
                        await m.nak(delay=self.nak_delay)

    async def _abandon_open_groups(self) -> None:
        open_agents = [a for a, r in self.store.replicas.items() if r.in_txn]
        if open_agents:
            self._rollback(open_agents)
        for agent in open_agents:
            for m in self._held.pop(agent, []):
                with contextlib.suppress(Exception):
                    await m.nak()

    def _rollback(self, agents: list[str]) -> None:
        for agent in agents:
            self.store.replicas[agent].rollback()

    # ------------------------------------------------------------ apply thread
    def _process_batch(self, items: list[_Item]) -> _BatchResult:
        actions: list[tuple[str, str | None]] = []
        touched: dict[str, AgentReplica] = {}
        for item in items:
            actions.append(self._process_one(item, touched))
        result = _BatchResult(actions)
        for agent, rep in touched.items():
            if rep.in_txn and not rep.open_group:
                try:
                    rep.commit()
                    result.committed.append(agent)
                except Exception as exc:  # disk full, I/O error: nothing of this batch is lost, it is redelivered
                    self.stats.commit_failures += 1
                    self.last_error = f"commit for {agent} failed: {exc}"
                    log.error("%s", self.last_error)
                    rep.rollback()
                    result.failed.append(agent)
            elif not rep.in_txn:
                result.committed.append(agent)
        done = set(result.committed)
        for i, (action, owner) in enumerate(actions):
            if action == _APPLIED:
                if owner in done:
                    actions[i] = (ACK, owner)
                elif owner in result.failed:
                    actions[i] = (NAK, owner)
                else:
                    actions[i] = (HOLD, owner)  # inside a multi-part transaction still open
        self.store.publish_view()  # readers on the event loop see this batch's commits from now on
        return result

    def _dead(self, item: _Item, agent: str | None, reason: str) -> tuple[str, str | None]:
        self.dead_letters.add(
            agent_id=agent, subject=item.subject, stream_seq=item.stream_seq, reason=reason, payload=item.data
        )
        self.stats.dead_letters += 1
        log.warning("dead letter (agent %s, stream seq %s): %s", agent, item.stream_seq, reason)
        return TERM, agent

    def _process_one(self, item: _Item, touched: dict[str, AgentReplica]) -> tuple[str, str | None]:
        subject_agent = _subject_agent(item.subject)
        if subject_agent is None:
            return self._dead(item, None, f"unexpected subject {item.subject!r}")
        try:
            rec = decode_record(item.data)
        except RecordDecodeError as exc:
            return self._dead(item, subject_agent, str(exc))
        if rec.agent_id != subject_agent:
            return self._dead(
                item, subject_agent, f"record says agent {rec.agent_id!r} but was published on {item.subject!r}"
            )
        try:
            rep = self.store.replica(rec.agent_id)
        except RecordRejected as exc:
            return self._dead(item, subject_agent, str(exc))
        if isinstance(rec, ChangeRecord):
            outcome = rep.classify(rec)
            if outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
                return ACK, rec.agent_id
            if outcome is Outcome.STALE:
                self.stats.stale += 1
                return ACK, rec.agent_id
            if outcome is Outcome.GAP:
                self.stats.gaps += 1
                if rec.agent_id in self.blocked and item.stream_seq is not None:
                    self._parked[rec.agent_id].add(item.stream_seq)
                return NAK, rec.agent_id
        rep.begin()
        touched[rep.agent_id] = rep
        saved = rep.snapshot_state()
        rep.savepoint()
        try:
            outcome = rep.apply_relay(rec, item.stream_seq) if isinstance(rec, RelayRecord) else rep.apply_changes(rec)
            rep.release()
            if outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
                return _APPLIED, rep.agent_id
        except RecordRejected as exc:
            rep.rollback_savepoint(saved)
            if isinstance(rec, ChangeRecord):
                self.blocked[rep.agent_id] = (
                    f"changes {rec.first_seq}-{rec.last_seq} dead-lettered ({exc}); later changes wait behind them"
                )
                rep.set_blocked(self.blocked[rep.agent_id])  # survives a restart (committed with the batch)
            return self._dead(item, rep.agent_id, str(exc))
        except Exception as exc:  # unexpected (I/O): roll back and retry later rather than lose it
            rep.rollback_savepoint(saved)
            self.last_error = f"apply failed for {rep.agent_id}: {exc!r}"
            log.error("%s", self.last_error)
            return NAK, rep.agent_id
        self.stats.applied += 1
        if isinstance(rec, ChangeRecord) and self.blocked.pop(rep.agent_id, None) is not None:
            rep.set_blocked(None)  # the sequence moved on (e.g. a new epoch): no longer blocked
            self._parked.pop(rep.agent_id, None)
        return _APPLIED, rep.agent_id
