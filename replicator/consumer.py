"""The durable pull consumer that turns the change stream into central copies.

Messages stream in through pull requests kept outstanding (`_PullPipe`): they
arrive while the previous batch is applied, and a batch is whatever arrived
(up to `batch` messages or BATCH_BYTES). Per agent, records are applied in
sequence order: what becomes of each record
is the sequencer's verdict (replicator/sequencer.py), and this module carries
it out. A small batch (up to ON_LOOP_BYTES) is applied right on the event
loop, where a thread hop would cost more than the work; a larger one on the
apply thread, in one hop. Each record goes in a savepoint inside its agent's
transaction; each agent's transaction commits once per batch, and only then
are its messages acked. Duplicates are acked, gaps are nak'ed with a delay (the
publisher's retransmission or JetStream's redelivery fills them), and anything
that cannot be decoded or applied is written to the dead-letter store and
terminated, while the consumer carries on.

The central store's replicas are owned by whoever holds `_apply_lock` (the
loop for a small batch, the apply thread for everything else), never both at
once. After each batch (and after rolling back an expired multi-part
transaction) the owner publishes what readers on the event loop may use: the
store's view, the open groups and the parked messages.

A watchdog bounds the wait for messages: when nothing at all comes back on the
pull inbox (not even a request's expiry) for far too long, the subscription is
made again; a stalled consumer would otherwise look exactly like an idle one.

What will not heal by itself is handed to the resync coordinator (resync.py,
the `ResyncListener`): a change record dead-lettered in an agent's sequence, a
remembered record gone from the stream, an agent over --max-held-per-agent, a
missing change not arrived after --resync-after (a gap that will not fill,
also at the start of a new epoch or below a retention gap), an agent reporting
changes the stream no longer delivers, and a damaged central file. The
coordinator learns too when a resync record was applied or rejected.

Dead letters can be retried (applied again, on this apply thread) or
discarded (`retry_dead_letter`, `discard_dead_letter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import sqlite3
import time
from collections import defaultdict, deque
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from agent_client import (
    STREAM_NAME,
    AgentStatusRecord,
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
from .dead_letters import DeadLetter, DeadLetterStore, discard_consequence
from .errors import DeadLetterNotRetryable, RecordRejected
from .histogram import Histogram
from .resync import stuck_reason
from .sequencer import RecordHeader, Verdict, sequence

log = logging.getLogger("replicator.consumer")
_T = TypeVar("_T")

#: How often (seconds) the apply thread looks for agents stuck behind a change that will not come.
STUCK_CHECK_INTERVAL_S = 1.0


class ResyncListener(Protocol):
    """What the consumer tells the resync coordinator (called on the event loop, after the apply thread's work)."""

    def resync_wanted(self, agent_id: str, reason: str) -> None:
        """The agent's central copy cannot be continued from the stream: ask it for a fresh copy."""

    def resync_applied(self, agent_id: str, request_id: str | None) -> None:
        """A resync record of the agent was applied and committed: its central copy is the fresh one."""

    def resync_rejected(self, agent_id: str, request_id: str, reason: str) -> None:
        """A resync record of the agent could not be applied (dead-lettered)."""

    def agents_seen(self, agents: Collection[str]) -> None:
        """Records of these agents just arrived (they are online)."""

    async def request(self, agent_id: str, reason: str, *, by: str = "operator") -> dict[str, Any]:
        """Request a resync (see ResyncCoordinator.request)."""


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
        # Terminated only once the dead letter is stored (FAILED: it could not be, so it comes back).
        return _Action.NAK if applied is _Applied.FAILED else _Action.TERM
    if verdict in (Verdict.DUPLICATE, Verdict.STALE_EPOCH):
        return _Action.ACK
    if applied is not _Applied.WRITTEN:  # also a GAP / BLOCKED record that could not be remembered ahead
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
    msg_id: str | None = None  # its Nats-Msg-Id header
    ahead: bool = False  # read back from the stream: it was remembered as ahead of its turn (and acked then)
    gone: str | None = None  # remembered ahead for this agent, but no longer in the stream


_KIND_NAMES: dict[type, str] = {RelayRecord: "a relay record", AgentStatusRecord: "a status record"}


def _resolve(fut: asyncio.Future[None]) -> None:
    """Wake a `wait_applied` reader (it checks again whether what it waits for is there)."""
    if not fut.done():
        fut.set_result(None)


def _is_pub_ack(data: bytes) -> bool:
    """A JetStream publish acknowledgement (`{"stream": ..., "seq": ...}`) or API error stored as a message.

    A client publishing with its reply subject set to an agent's subject makes JetStream deliver its
    acknowledgement there, and the stream then stores it as if that agent had published it.
    """
    if not data.startswith(b"{") or len(data) > 4096:
        return False
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(body, dict) and (("stream" in body and "seq" in body) or set(body) <= {"error", "type"})


@dataclass(frozen=True)
class _Step:
    """One message's fate on the apply thread, before its agent's commit."""

    verdict: Verdict
    agent: str | None
    applied: _Applied | None = None


@dataclass
class _ResyncEvents:
    """What the apply thread found for the resync coordinator (delivered on the event loop)."""

    wanted: list[tuple[str, str]] = field(default_factory=list)  # (agent, why its copy cannot be continued)
    applied: list[tuple[str, str | None]] = field(default_factory=list)  # (agent, request id) committed
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (agent, request id, reason)
    seen: set[str] = field(default_factory=set)  # agents with a record in the batch


@dataclass
class _BatchResult:
    actions: list[tuple[_Action, str | None]]  # (action, agent id) per message
    committed: list[str] = field(default_factory=list)  # agents whose transaction committed
    failed: list[str] = field(default_factory=list)  # agents whose commit failed (nak everything of theirs)
    failing: set[str | None] = field(default_factory=set)  # agents with a failure of the machine in this batch
    steps: list[_Step] = field(default_factory=list)  # each message's fate (same order as actions)
    events: _ResyncEvents = field(default_factory=_ResyncEvents)


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
    apply_failures: int = 0  # records or commits that failed for the machine's sake (disk full, ...) and were retried
    over_cap: int = 0  # records of an agent beyond --max-held-per-agent: terminated, the agent blocked
    foreign: int = 0  # JetStream acknowledgements stored on an agent's subject (a reply= trick): dropped
    msg_id_alarms: int = 0  # messages whose id is not their subject's agent's (an attempt at id squatting)
    apply_seconds: float = 0.0
    #: agent commit -> central commit, observed per agent transaction that applied change records
    apply_delay: Histogram = field(default_factory=Histogram)
    statuses: int = 0  # agent status records kept
    last_fetch_at: float | None = None
    last_apply_at: float | None = None


#: Seconds a pull request waits on the server for messages before it expires (and is renewed).
PULL_EXPIRES_S = 5.0
#: Bytes of messages requested ahead (delivered and waiting, or due): bounds the memory a backlog of large
#: records takes while it streams in (at least one message is always requested).
PULL_AHEAD_BYTES = 8 * 1024 * 1024
#: Bytes of messages handed over as one batch (at least one message).
BATCH_BYTES = 4 * 1024 * 1024
#: A batch of at most this many bytes is applied on the event loop (tens of milliseconds of work at most); a
#: bigger one (a backlog of large records: fewer, bigger commits; a resync) on the apply thread.
ON_LOOP_BYTES = 512 * 1024


class _FetchStalled(Exception):
    """Nothing at all came back on the pull inbox (not even an expiry notice) for far too long."""


class _PullPipe:
    """Pull requests kept outstanding on the durable consumer, so that messages stream in as they are stored.

    A `fetch` sends one request and waits for its whole answer before the next: every batch paid a round trip,
    and nats-py's fetch awaits each message with a timer of its own. Here up to `window` messages are requested
    ahead (in requests of half a window, renewed as they are answered or expire), and a callback collects them
    while the previous batch is applied; `next_batch` hands over what has arrived. The consumer stays the same
    durable pull consumer (its position and configuration are untouched, nothing to migrate), and JetStream's
    max_ack_pending still bounds what is delivered and not yet acked.

    Requests are counted the way the server answers them: first come, first served. A delivered message uses
    up one of the oldest request's; a 408 (request expired) ends the oldest request; any 409 (consumer deleted,
    leadership change, too many waiting) ends them all. A request not answered within its expiry (plus a
    margin) is forgotten here as well, so a lost notice never stops the flow.

    Memory stays bounded by bytes as well: what is requested ahead shrinks with the average message size
    (about PULL_AHEAD_BYTES in all), and a batch ends at BATCH_BYTES.
    """

    def __init__(self, js: JetStreamContext, durable: str, *, window: int, watchdog: float) -> None:
        self._nc: Any = js._nc
        self._next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{STREAM_NAME}.{durable}"
        self._window = max(2, window)
        self._request_size = max(1, self._window // 2)
        self._watchdog = watchdog
        self._requests: deque[list[float]] = deque()  # [expires at (monotonic), messages still due]
        self._due = 0  # messages requested and not yet delivered or expired
        self._ready: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._sub: Any = None
        self._inbox = ""
        self._heard = time.monotonic()  # the last time anything came back on the inbox
        self._broken: str | None = None
        self._avg_bytes = 512.0  # running average of a message's size (payload and headers)
        self._reconnects = self._nc.stats.get("reconnects", 0)  # the connection the requests were sent on

    async def start(self) -> None:
        inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(
            inbox, cb=self._on_msg, pending_msgs_limit=4 * self._window + 1024, pending_bytes_limit=512 * 1024 * 1024
        )
        self._inbox = inbox
        self._heard = time.monotonic()

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        if msg.reply:  # a message of the stream (its reply subject is where it is acked)
            self._avg_bytes += (len(msg.data) + 256 - self._avg_bytes) / 64
            self._ready.append(msg)
            self._used(1)
            self._wake.set()
            return
        status = (msg.headers or {}).get("Status", "")
        if status == "408":  # the oldest request expired
            if self._requests:
                self._due -= int(self._requests.popleft()[1])
        elif status.startswith("409") or status in ("404", "503"):
            self._requests.clear()  # ended (or never started): request afresh
            self._due = 0
            if status == "503" or "Consumer Deleted" in (msg.headers or {}).get("Description", ""):
                self._broken = f"pull request answered {status} {(msg.headers or {}).get('Description', '')}"
                self._wake.set()
                return
        else:
            return  # 100 (heartbeat) and anything else: nothing to count
        # Renew at once: waiting for the next batch to do it would leave nothing requested meanwhile.
        with contextlib.suppress(nats.errors.Error, OSError):
            await self._top_up()

    def _used(self, n: int) -> None:
        self._due = max(0, self._due - n)
        while n and self._requests:
            head = self._requests[0]
            take = min(n, int(head[1]))
            head[1] -= take
            n -= take
            if head[1] <= 0:
                self._requests.popleft()

    async def _top_up(self) -> None:
        now = time.monotonic()
        reconnects = self._nc.stats.get("reconnects", 0)
        if reconnects != self._reconnects:
            # Pull requests live in the server they were sent to: after a reconnect (a restarted server, another
            # server of the cluster) none of them is waiting any more. Waiting for their expiry would stall.
            self._reconnects = reconnects
            self._requests.clear()
            self._due = 0
        while self._requests and self._requests[0][0] + 1.0 < now:  # expired, its notice lost: forget it
            self._due -= int(self._requests.popleft()[1])
        self._due = max(0, self._due)
        window = max(1, min(self._window, int(PULL_AHEAD_BYTES / self._avg_bytes)))
        size = max(1, min(self._request_size, window // 2))
        while self._due + len(self._ready) < window:
            await self._nc.publish(
                self._next_subject,
                b'{"batch":%d,"expires":%d}' % (size, int(PULL_EXPIRES_S * 1e9)),
                reply=self._inbox,
            )
            self._requests.append([now + PULL_EXPIRES_S, float(size)])
            self._due += size

    async def next_batch(self, limit: int, timeout: float) -> list[Msg]:
        """Up to `limit` delivered messages, waiting at most `timeout` for the first one ([] if none came)."""
        if self._sub is None:
            await self.start()
        if self._broken is not None:
            reason, self._broken = self._broken, None
            raise nats.errors.Error(reason)
        try:
            await self._top_up()
        except (nats.errors.Error, OSError):
            if not self._ready:
                raise
        if not self._ready:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if not self._ready:
                if self._due and time.monotonic() - self._heard > PULL_EXPIRES_S + self._watchdog:
                    raise _FetchStalled()
                return []
        ready = self._ready
        batch = [ready.popleft()]
        size = len(batch[0].data)
        while ready and len(batch) < limit and size < BATCH_BYTES:
            msg = ready.popleft()
            size += len(msg.data)
            batch.append(msg)
        return batch


class Consumer:
    def __init__(
        self,
        js: JetStreamContext,
        store: CentralStore,
        dead_letters: DeadLetterStore,
        *,
        durable: str = "replicator",
        batch: int = 1024,
        fetch_timeout: float = 0.5,
        fetch_watchdog: float = 10.0,
        nak_delay: float = 0.2,
        group_timeout: float = 20.0,
        deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
        opt_start_seq: int | None = None,
        max_held_per_agent: int = 100_000,
        resync_after: float = 60.0,
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
        self.max_held_per_agent = max_held_per_agent
        self.resync_after = resync_after  # a missing change not arrived after this long: resync the agent
        self.resyncs: ResyncListener | None = None  # the resync coordinator (None: rebuild, tests)
        self.stats = ConsumerStats()
        self.apply_failing_since: float | None = None  # wall time of the first failure in a row (None: applying)
        self._failure_backoff = Backoff(nak_delay, 5.0)
        self._failure_logged = 0.0
        self._relay_pruned = time.monotonic()
        self._relay_floor = 0  # the ack floor read at the previous relay dedup pruning
        self.running = False
        self.max_stream_seq = 0
        self.last_error: str | None = None
        self.on_batch: Callable[[int], None] | None = None
        # told (on the event loop) which agents' batches were committed, e.g. the change feed hub
        self.on_committed: Callable[[Collection[str]], None] | None = None
        # readers waiting for an agent's min_seq: agent -> futures resolved when a commit of that agent lands
        self._applied_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._held: dict[str, list[Msg]] = defaultdict(list)
        self._held_touched = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="apply")
        # Held while the replicas are worked on, on the apply thread or on the loop: one at a time.
        self._apply_lock = asyncio.Lock()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sub: _PullPipe | None = None
        # Owned by the apply thread; the event loop reads only the immutable snapshots published after each batch.
        # Agents with records ahead of their turn (snapshot).
        self._with_ahead = frozenset(a for a, rep in store.replicas.items() if rep.state.ahead)
        self._open_groups: Mapping[str, float] = MappingProxyType({})  # agent -> monotonic start (snapshot)
        # Owned by the apply thread: what the current batch found for the coordinator, the agents found stuck
        # (agent -> (what it is stuck at, since when, asked already)), a dead letter being retried.
        self._events = _ResyncEvents()
        self._stuck: dict[str, tuple[tuple[Any, ...], float, bool]] = {}
        self._stuck_checked = 0.0
        self._retrying: int | None = None
        self.idle = False  # the last fetch delivered nothing: everything the stream holds was delivered

    # ------------------------------------------------------------ public
    def applied(self, agent_id: str) -> tuple[str | None, int]:
        """(epoch, watermark) committed for the agent."""
        view = self.store.view.agent(agent_id)
        return (view.epoch, view.watermark) if view is not None else (None, 0)

    async def wait_applied(self, agent_id: str, min_seq: int, timeout: float, epoch: str | None = None) -> bool:
        """Whether the agent's (epoch and) watermark reached `min_seq` within `timeout`. Already there (a read
        after a write, usually): answered at once, with no waiter and no timer; else woken by the agent's
        commits (`_settle`)."""

        def ready() -> bool:
            ep, wm = self.applied(agent_id)
            if epoch is not None and ep != epoch:
                return False
            return wm >= min_seq

        if ready():
            return True
        deadline = time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ready()
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._applied_waiters.setdefault(agent_id, [])
            waiters.append(fut)
            timer = loop.call_later(remaining, _resolve, fut)
            try:
                await fut
            finally:
                timer.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
                if not waiters and self._applied_waiters.get(agent_id) is waiters:
                    del self._applied_waiters[agent_id]
            if ready():
                return True

    async def ack_floor(self) -> int | None:
        """The stream sequence up to which every message is acknowledged (committed centrally), None if unknown."""
        try:
            info = await self.js.consumer_info(STREAM_NAME, self.durable)
        except (nats.errors.Error, nats.js.errors.Error, OSError):
            return None
        return info.ack_floor.stream_seq if info.ack_floor is not None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="replicator-consumer")

    async def stop(self) -> None:
        """Finish the batch in hand (commit + ack), then stop."""
        self._stopping = True
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._task, 15)
        await self._abandon_open_groups()
        await self._drop_sub()
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------ loop
    async def _subscribe(self) -> _PullPipe:
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
        pipe = _PullPipe(self.js, self.durable, window=2 * self.batch, watchdog=self.fetch_watchdog)
        await pipe.start()
        return pipe

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
                    await self._drop_sub()
                    await asyncio.sleep(delay)
                    continue
                try:
                    await self._touch_held()
                    await self._expire_open_groups()  # also under load: other agents' traffic must not hide it
                    if msgs:
                        await self._handle(msgs)
                    else:
                        await self._forget_acked_relay()
                    await self._apply_due_ahead()
                    await self._check_stuck()
                    if not msgs and until_idle and await self._idle():
                        return
                except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    log.warning("consumer: %s; retrying", self.last_error)
                    await asyncio.sleep(backoff.next())
                except Exception as exc:  # never die: what was not acked is redelivered after ack_wait
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.apply_failing_since = self.apply_failing_since or time.time()
                    log.exception("consumer: unexpected failure; open transactions rolled back, retrying")
                    with contextlib.suppress(Exception):
                        await self._abandon_open_groups()
                    await asyncio.sleep(backoff.next())
        finally:
            self.running = False

    async def _idle(self) -> bool:
        info = await self.js.consumer_info(STREAM_NAME, self.durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0 and not self._held)

    async def _apply_due_ahead(self) -> None:
        """Apply the remembered records whose turn has come, reading them back from the stream by sequence."""
        for _round in range(1_000):  # bounded: each round applies at least one record or stops
            if not self._with_ahead:
                return
            due: list[tuple[str, int]] = await self._on_apply_thread(self._due_ahead)
            if not due:
                return
            items = await asyncio.gather(*(self._read_back(agent, seq) for agent, seq in due))
            result = await self._apply_batch(list(items))
            await self._settle(result)
            if result.failing or all(action is _Action.NAK for action, _agent in result.actions):
                return  # nothing moved (or it cannot, for now): the next fetch cycle tries again

    async def _read_back(self, agent: str, stream_seq: int) -> _Item:
        try:
            msg = await self.js.get_msg(STREAM_NAME, stream_seq)
        except nats.js.errors.NotFoundError:
            return _Item("", b"", stream_seq, None, ahead=True, gone=agent)  # aged out of the stream
        return _Item(msg.subject or "", msg.data or b"", stream_seq, (msg.headers or {}).get("Nats-Msg-Id"), True)

    def _due_ahead(self) -> list[tuple[str, int]]:
        due: list[tuple[str, int]] = []
        for agent in self._with_ahead:
            rep = self.store.replicas.get(agent)
            if rep is not None:
                due.extend((agent, seq) for seq in rep.due_ahead(self.batch - len(due)))
            if len(due) >= self.batch:
                break
        return due

    async def _on_apply_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn` on the apply thread, never alongside other work on the replicas."""
        async with self._apply_lock:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _apply_batch(self, items: list[_Item]) -> _BatchResult:
        """Apply a batch: on the event loop when it is small (a thread hop and the GIL passed back and forth
        cost more than the work), on the apply thread when it could hold the loop up for long."""
        if sum(len(i.data) for i in items) <= ON_LOOP_BYTES:
            async with self._apply_lock:
                return self._process_batch(items)
        return await self._on_apply_thread(self._process_batch, items)

    async def _fetch(self) -> list[Msg]:
        assert self._sub is not None
        try:
            msgs = await self._sub.next_batch(self.batch, self.fetch_timeout)
        except _FetchStalled:
            # Nothing came back at all, not even a request's expiry: drop the subscription and bind again.
            self.stats.fetch_stalls += 1
            log.warning("consumer: no answer to pull requests for %.0fs; resubscribing", self.fetch_watchdog)
            await self._drop_sub()
            self.stats.last_fetch_at = time.time()
            return []
        self.stats.last_fetch_at = time.time()
        self.idle = not msgs  # nothing came within fetch_timeout: everything the stream holds was delivered
        return msgs

    async def _drop_sub(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            await sub.close()

    async def _handle(self, msgs: list[Msg]) -> None:
        items = [
            _Item(
                m.subject,
                m.data,
                m.metadata.sequence.stream if m.reply else None,
                (m.headers or {}).get("Nats-Msg-Id"),
            )
            for m in msgs
        ]
        started = time.perf_counter()
        result = await self._apply_batch(items)
        self.stats.apply_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.messages += len(msgs)
        self.stats.last_apply_at = time.time()
        self.max_stream_seq = max([self.max_stream_seq, *(i.stream_seq or 0 for i in items)])
        retry_delay = await self._settle(result)
        acks: list[Any] = []
        for msg, (action, agent) in zip(msgs, result.actions, strict=True):
            if action is _Action.ACK:
                acks.append(msg.ack())
            elif action is _Action.NAK:
                acks.append(msg.nak(delay=retry_delay if agent in result.failing else self.nak_delay))
            elif action is _Action.TERM:
                acks.append(msg.term())
            elif action is _Action.HOLD and agent is not None:
                self._held[agent].append(msg)
        for agent in result.committed:
            acks.extend(m.ack() for m in self._held.pop(agent, []))
        for agent in result.failed:
            acks.extend(m.nak(delay=retry_delay) for m in self._held.pop(agent, []))
        for coro in acks:
            try:
                await coro
            except Exception as exc:  # a lost ack only causes a harmless redelivery
                log.debug("ack failed: %r", exc)
        if self.on_batch is not None:
            self.on_batch(len(msgs))

    async def _settle(self, result: _BatchResult) -> float:
        """After a batch on the apply thread: track failures, tell the resync coordinator, wake the readers
        waiting for min_seq (they may go as soon as the data is committed) and the change feeds
        (`on_committed`). The delay before a retry."""
        retry_delay = self._note_failures(result)
        self._deliver(result.events)
        for agent in result.committed:
            for fut in self._applied_waiters.get(agent, ()):
                _resolve(fut)
        if self.on_committed is not None and result.committed:
            try:
                self.on_committed(result.committed)
            except Exception:  # a listener's failure never stops the consumer
                log.exception("consumer: on_committed listener failed")
        return retry_delay

    def _note_failures(self, result: _BatchResult) -> float:
        """Track failures of the machine (disk full, no file descriptors): the delay before their retry.

        Logged when they start, at most every 30 s while they last, and when applying works again.
        """
        now = time.time()
        if not result.failing:
            if self.apply_failing_since is not None and result.committed:
                log.warning("consumer: applying works again after %.0fs of failures", now - self.apply_failing_since)
                self.apply_failing_since = None
                self._failure_backoff.reset()
            return self.nak_delay
        if self.apply_failing_since is None:
            self.apply_failing_since = now
            log.error("consumer: cannot apply (%s); retrying with backoff", self.last_error)
            self._failure_logged = now
        elif now - self._failure_logged > 30:
            log.error("consumer: still cannot apply after %.0fs (%s)", now - self.apply_failing_since, self.last_error)
            self._failure_logged = now
        return self._failure_backoff.next()

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
            info = await self.js.consumer_info(STREAM_NAME, self.durable)
        except Exception:  # only housekeeping: next time
            return
        if info.ack_floor is not None and info.ack_floor.stream_seq:
            # Forget only up to the floor read a round (60 s) ago: a snapshot copying the files now covers the
            # floor it read before copying, which is at least that one, so a restore never replays a relay
            # record whose dedup entry its copy no longer holds.
            previous, self._relay_floor = self._relay_floor, info.ack_floor.stream_seq
            if previous:
                await self._on_apply_thread(self.store.forget_relay_seen, previous)

    async def _expire_open_groups(self) -> None:
        now = time.monotonic()
        stale = [a for a, started in self._open_groups.items() if now - started > self.group_timeout]
        if not stale:
            return
        rolled_back = await self._on_apply_thread(self._rollback, stale)
        for agent in rolled_back:
            log.warning("agent %s: multi-part transaction incomplete after %.0fs; retrying", agent, self.group_timeout)
            for m in self._held.pop(agent, []):
                with contextlib.suppress(Exception):
                    await m.nak(delay=self.nak_delay)

    async def _abandon_open_groups(self) -> None:
        rolled_back = await self._on_apply_thread(self._rollback, None)
        for agent in rolled_back:
            for m in self._held.pop(agent, []):
                with contextlib.suppress(Exception):
                    await m.nak()

    # ------------------------------------------------------------ resync support (event loop)
    def _deliver(self, events: _ResyncEvents) -> None:
        """Hand what the apply thread found to the resync coordinator."""
        listener = self.resyncs
        if listener is None:
            return
        if events.seen:
            listener.agents_seen(frozenset(events.seen))
        for agent, request_id in events.applied:
            listener.resync_applied(agent, request_id)
        for agent, request_id, reason in events.rejected:
            listener.resync_rejected(agent, request_id, reason)
        for agent, reason in events.wanted:
            listener.resync_wanted(agent, reason)

    async def _check_stuck(self) -> None:
        """Now and then, look for agents stuck behind a change that will not come (see `_stuck_scan`)."""
        now = time.monotonic()
        if self.resyncs is None or now - self._stuck_checked < STUCK_CHECK_INTERVAL_S:
            return
        if self.apply_failing_since is not None:
            return  # the machine fails (disk full, ...): nothing moves, and a resync would not help
        self._stuck_checked = now
        events = await self._on_apply_thread(self._stuck_scan, now, self.idle)
        self._deliver(events)

    async def reopen_lost(self, agent_id: str) -> None:
        """The agent's central file was deleted or replaced under us: drop what we hold of it and open it again
        (a new, empty copy when it is gone). Its open transaction, if any, is rolled back and its held messages
        come again."""
        rolled_back = await self._on_apply_thread(self._reopen, agent_id)
        if rolled_back:
            for m in self._held.pop(agent_id, []):
                with contextlib.suppress(Exception):
                    await m.nak()

    async def mark_blocked(self, agent_id: str, reason: str) -> None:
        """Store that the agent is blocked and why (shown everywhere until a record or a resync moves it on)."""
        await self._on_apply_thread(self._mark_blocked, agent_id, reason)

    # ------------------------------------------------------------ dead letters (operator)
    async def retry_dead_letter(self, dead_letter_id: int) -> dict[str, Any]:
        """Apply a dead letter again, on the apply thread; removed when it applied, kept with the new reason when
        it failed again. DeadLetterNotFound (404) / DeadLetterNotRetryable (409)."""
        letter = self.dead_letters.get(dead_letter_id)
        data, msg_id, source = await self._letter_bytes(letter)
        if data is None:
            raise DeadLetterNotRetryable(
                f"dead letter {dead_letter_id}: only the first {len(letter.payload)} of its {letter.payload_bytes} "
                f"bytes were kept and stream seq {letter.stream_seq} is no longer in {STREAM_NAME}; "
                "it cannot be applied again (discard it; a change record's agent is then resynced)"
            )
        # Read back from the stream, it keeps its stream sequence (relay writes are deduplicated by it, a record
        # not yet due is remembered by it); from the stored payload it has none.
        item = _Item(letter.subject, data, letter.stream_seq if source == "stream" else None, msg_id)
        result = await self._on_apply_thread(self._retry, item, letter.id)
        await self._settle(result)
        return self._retry_answer(letter, result.steps[0], result, source)

    async def discard_dead_letter(self, dead_letter_id: int) -> dict[str, Any]:
        """Delete a dead letter for good, saying what that means; one in an agent's sequence (its changes are
        missing from the central copy) requests a resync of that agent."""
        letter = self.dead_letters.get(dead_letter_id)
        data, _msg_id, _source = await self._letter_bytes(letter)
        agent, consequence, resync_reason = discard_consequence(letter, data, self.store.view)
        resync: dict[str, Any] | None = None
        if resync_reason is not None and agent is not None:
            if self.resyncs is None:
                consequence += "; no resync coordinator runs here: request one with `replicator resync`"
            else:
                resync = await self.resyncs.request(agent, resync_reason, by="operator")
                consequence += f" (resync request {resync.get('request_id')}, {resync.get('state')})"
        self.dead_letters.delete(dead_letter_id)
        log.warning("dead letter %d discarded: %s", dead_letter_id, consequence)
        return {"discarded": dead_letter_id, "agent_id": agent, "resync": resync, "consequence": consequence}

    async def _letter_bytes(self, letter: DeadLetter) -> tuple[bytes | None, str | None, str]:
        """(payload, message id, "stream" | "stored") of a dead letter: from the stream while it is there (the
        whole message, even when the store kept only its start), else the stored payload if it was kept whole."""
        if letter.stream_seq is not None:
            try:
                msg = await self.js.get_msg(STREAM_NAME, letter.stream_seq)
            except nats.js.errors.NotFoundError:
                pass
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                if not letter.whole:
                    raise DeadLetterNotRetryable(
                        f"dead letter {letter.id}: cannot read stream seq {letter.stream_seq} now ({exc}); retry later"
                    ) from exc
            else:
                if (msg.subject or "") == letter.subject:
                    return msg.data or b"", (msg.headers or {}).get("Nats-Msg-Id"), "stream"
        return (letter.payload if letter.whole else None), None, "stored"

    def _retry_answer(self, letter: DeadLetter, step: _Step, result: _BatchResult, source: str) -> dict[str, Any]:
        base: dict[str, Any] = {"retried": letter.id, "agent_id": step.agent, "read_from": source}
        verdict, applied = step.verdict, step.applied
        if applied is _Applied.FAILED or (step.agent in result.failed):
            return {
                **base,
                "outcome": "failed",
                "dead_letter": letter.id,
                "reason": f"the HTPC could not write it now ({self.last_error}); it is kept, retry later",
            }
        if verdict is Verdict.DEAD_LETTER:
            reason = self.dead_letters.get(letter.id).reason
            return {**base, "outcome": "failed", "dead_letter": letter.id, "reason": reason}
        if verdict in (Verdict.GAP, Verdict.BLOCKED):
            if applied is _Applied.WRITTEN:
                self.dead_letters.delete(letter.id)
                return {
                    **base,
                    "outcome": "waiting",
                    "message": "kept for its turn: earlier changes of its agent are still missing",
                }
            raise DeadLetterNotRetryable(
                f"dead letter {letter.id} is not due: earlier changes of agent {step.agent} are missing and it is no "
                "longer in the stream to wait for them; resync the agent instead (discarding it does)"
            )
        self.dead_letters.delete(letter.id)
        if verdict in (Verdict.DUPLICATE, Verdict.STALE_EPOCH):
            what = "already applied" if verdict is Verdict.DUPLICATE else "from an agent database since replaced"
            return {**base, "outcome": "already_applied", "message": f"nothing to do: its changes are {what}"}
        return {**base, "outcome": "applied", "message": "applied; the dead letter is removed"}

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

    def _publish(self, seen: Collection[str], touched: Iterable[str]) -> None:
        """Publish what the event loop may read: the store view, open groups, agents with records ahead."""
        self.store.publish_view(seen)
        groups = dict(self._open_groups)
        for agent in touched:
            rep = self.store.replicas.get(agent)
            if rep is not None and rep.in_txn and rep.state.open_group:
                groups[agent] = rep.state.group_started
            else:
                groups.pop(agent, None)
        self._open_groups = MappingProxyType(groups)
        with_ahead = set(self._with_ahead)
        for agent in seen:
            rep = self.store.replicas.get(agent)
            if rep is not None and rep.state.ahead:
                with_ahead.add(agent)
            else:
                with_ahead.discard(agent)
        self._with_ahead = frozenset(with_ahead)

    def _process_batch(self, items: list[_Item]) -> _BatchResult:
        touched: dict[str, AgentReplica] = {}  # agents whose transaction this batch wrote into
        seen: set[str] = set()  # agents with any record in this batch
        events = self._events = _ResyncEvents()
        steps = [self._process_one(item, touched, seen) for item in items]
        commits: dict[str, _Commit] = {}
        failing: set[str | None] = {s.agent for s in steps if s.applied is _Applied.FAILED}
        for agent, rep in touched.items():
            if not rep.in_txn:
                commits[agent] = _Commit.COMMITTED
            elif rep.txn_lost:  # SQLite rolled it back itself (a full disk): all of it comes again
                self.stats.commit_failures += 1
                rep.rollback()
                commits[agent] = _Commit.FAILED
            elif rep.state.open_group:
                commits[agent] = _Commit.OPEN  # inside a multi-part transaction still open
            else:
                moved = rep.state.changes_moved()  # not for a commit of relay rows or reports only
                resynced = rep.state.resync_applied()
                try:
                    rep.commit()
                except Exception as exc:  # disk full, I/O error: nothing of this batch is lost, it is redelivered
                    self.stats.commit_failures += 1
                    self.last_error = f"commit for {agent} failed: {exc}"
                    rep.rollback()
                    commits[agent] = _Commit.FAILED
                else:
                    commits[agent] = _Commit.COMMITTED
                    state = rep.state
                    if moved and state.committed_at is not None and state.applied_at is not None:
                        self.stats.apply_delay.observe(max(0.0, state.applied_at - state.committed_at))
                    if resynced is not None:
                        events.applied.append((agent, resynced))
                        log.warning("agent %s: resync %s applied (its central copy is the fresh one)", agent, resynced)
            if commits[agent] is _Commit.FAILED:
                failing.add(agent)
        self.stats.apply_failures += len(failing)
        result = _BatchResult(
            [(_nats_action(s.verdict, s.applied, commits.get(s.agent) if s.agent else None), s.agent) for s in steps],
            committed=[a for a, c in commits.items() if c is _Commit.COMMITTED],
            failed=[a for a, c in commits.items() if c is _Commit.FAILED],
            failing=failing,
            steps=steps,
            events=events,
        )
        events.seen = seen
        if self.resyncs is not None:
            for found in self.store.take_quarantined():
                events.wanted.append(
                    (found.agent_id, f"its central file was damaged ({found.reason}); set aside as {found.moved_to}")
                )
        self._events = _ResyncEvents()
        self._publish(seen, touched)  # readers on the event loop see this batch's commits from now on
        return result

    def _dead(self, item: _Item, agent: str | None, reason: str) -> _Step:
        try:
            # A retried dead letter that fails again keeps its id, with the new reason.
            kept = self._retrying is not None and self.dead_letters.update_reason(self._retrying, reason)
            if not kept:
                self.dead_letters.add(
                    agent_id=agent, subject=item.subject, stream_seq=item.stream_seq, reason=reason, payload=item.data
                )
        except Exception as exc:  # it must be stored before the message is terminated: retry it later
            self.last_error = f"cannot store a dead letter of {agent}: {exc}"
            return _Step(Verdict.DEAD_LETTER, agent, _Applied.FAILED)
        self.stats.dead_letters += 1
        log.warning("dead letter (agent %s, stream seq %s): %s", agent, item.stream_seq, reason)
        return _Step(Verdict.DEAD_LETTER, agent)

    def _want_resync(self, agent: str, reason: str) -> None:
        self._events.wanted.append((agent, reason))

    def _retry(self, item: _Item, dead_letter_id: int) -> _BatchResult:
        """Apply a dead letter again (the apply thread): like a delivered message, but a new failure updates the
        dead letter instead of adding one."""
        self._retrying = dead_letter_id
        try:
            return self._process_batch([item])
        finally:
            self._retrying = None

    def _stuck_scan(self, now: float, idle: bool) -> _ResyncEvents:
        """Agents stuck in the same state (agent, epoch, watermark, resync.stuck_reason) for `resync_after`
        seconds: each such state is reported to the coordinator once (a multi-part transaction in progress is
        not stuck: it moves, or it times out and is retried)."""
        events = _ResyncEvents()
        for agent, rep in self.store.replicas.items():
            state = rep.state
            kind, why = stuck_reason(state, idle=idle) if not (rep.in_txn and state.open_group) else ("", "")
            if not kind:
                self._stuck.pop(agent, None)
                continue
            key = (state.epoch, state.watermark, kind)
            found = self._stuck.get(agent)
            if found is None or found[0] != key:
                self._stuck[agent] = (key, now, False)
                continue
            _key, since, asked = found
            if not asked and now - since >= self.resync_after:
                self._stuck[agent] = (key, since, True)
                events.wanted.append((agent, f"{why} for {now - since:.0f}s (--resync-after)"))
        for gone in set(self._stuck) - set(self.store.replicas):
            del self._stuck[gone]
        return events

    def _reopen(self, agent_id: str) -> bool:
        """Open the agent's file again (apply thread); True if an open transaction of it was rolled back."""
        rep = self.store.replicas.get(agent_id)
        rolled_back = rep is not None and rep.in_txn
        self._stuck.pop(agent_id, None)
        try:
            self.store.reopen(agent_id)
        except (sqlite3.Error, OSError) as exc:
            self.last_error = f"cannot open the central copy of {agent_id} again: {exc}"
            log.error("%s", self.last_error)
        self._publish([agent_id], [agent_id])
        return rolled_back

    def _mark_blocked(self, agent_id: str, reason: str) -> None:
        try:
            rep = self.store.replica(agent_id)
            if rep.in_txn:
                rep.set_blocked(reason)  # stored with its open transaction
            else:
                rep.begin()
                rep.set_blocked(reason)
                rep.commit()
        except (sqlite3.Error, OSError, RecordRejected) as exc:
            self.last_error = f"cannot mark {agent_id} blocked: {exc}"
            log.error("%s", self.last_error)
            rep2 = self.store.replicas.get(agent_id)
            if rep2 is not None and rep2.in_txn and not rep2.state.open_group:
                rep2.rollback()
        log.error("agent %s: %s", agent_id, reason)
        self._publish([agent_id], [agent_id])

    def _open_txn(self, rep: AgentReplica, touched: dict[str, AgentReplica], *, settle: int | None = None) -> bool:
        """Open (or join) the agent's transaction for this batch, forgetting remembered record `settle` in it.

        False when the machine refuses (disk full, I/O): the record is retried later, never lost.
        """
        try:
            rep.begin()
            if settle is not None:
                rep.settle_ahead(settle)
        except sqlite3.Error as exc:
            self.last_error = f"cannot write the central copy of {rep.agent_id}: {exc}"
            return False
        touched[rep.agent_id] = rep
        return True

    def _gone(self, item: _Item, agent: str, touched: dict[str, AgentReplica], seen: set[str]) -> _Step:
        """A record remembered ahead of its turn is no longer in the stream: forget it and block the agent."""
        rep = self.store.replicas.get(agent)
        if rep is None or item.stream_seq is None:
            return _Step(Verdict.DEAD_LETTER, agent)
        if not self._open_txn(rep, touched, settle=item.stream_seq):
            return _Step(Verdict.DEAD_LETTER, agent, _Applied.FAILED)
        seen.add(agent)
        reason = f"a record that came ahead of its turn (stream seq {item.stream_seq}) is gone from the stream"
        rep.set_blocked(reason)
        log.error("agent %s: %s", agent, reason)
        self._want_resync(agent, reason)
        return _Step(Verdict.DEAD_LETTER, agent)

    def _hold(self, item: _Item, rep: AgentReplica, header: RecordHeader, touched: dict[str, AgentReplica]) -> _Step:
        """A record that must wait for an earlier one: remember it and ack it, so it takes no room in the
        consumer's ack-pending window (a flood of out-of-order records from one agent cannot stop the others).

        At most `max_held_per_agent` records of one agent are remembered: past that the agent is blocked
        (stored, shown everywhere) and its excess is terminated.
        """
        owner = rep.agent_id
        self.stats.gaps += 1
        if item.ahead:
            return _Step(Verdict.GAP, owner)  # remembered already; still not its turn
        if item.stream_seq is None:
            return _Step(Verdict.GAP, owner)  # not from the durable consumer: nak'ed
        if not self._open_txn(rep, touched):
            return _Step(Verdict.GAP, owner, _Applied.FAILED)
        if rep.state.ahead >= self.max_held_per_agent:
            self.stats.over_cap += 1
            if rep.state.blocked is None or not rep.state.blocked.startswith("over "):
                reason = (
                    f"over {self.max_held_per_agent} records wait for a missing change after {rep.state.watermark} "
                    f"(--max-held-per-agent); later ones are dropped until this agent is resynced"
                )
                rep.set_blocked(reason)
                log.error("agent %s: %s", owner, reason)
                self._want_resync(owner, reason)
            return _Step(Verdict.DEAD_LETTER, owner)  # terminated, not redelivered
        try:
            rep.keep_ahead(header, item.stream_seq)
        except sqlite3.Error as exc:
            self.last_error = f"cannot remember a record of {owner}: {exc}"
            return _Step(Verdict.GAP, owner, _Applied.FAILED)
        return _Step(Verdict.GAP, owner, _Applied.WRITTEN)

    def _rejected(
        self, item: _Item, rep: AgentReplica, rec: ChangeRecord | RelayRecord, header: RecordHeader, reason: str
    ) -> _Step:
        """A record that cannot be applied: dead-lettered; one of the agent's sequence blocks it (stored at the
        batch's commit, so it survives a restart) and wants a resync, unless it was a resync record itself (its
        request then failed: the coordinator decides what next)."""
        owner = rep.agent_id
        if isinstance(rec, ChangeRecord):
            # A resync record, or a later part of one (the resync in the open multi-part transaction).
            resync = header.resync or (rep.state.resync_applied() if rep.state.in_group else None)
            if rep.state.in_group:
                # A part of a multi-part transaction: the whole of it is off (its earlier parts are undone and
                # their held messages acked with the commit; its later parts wait ahead, never due).
                rep.abandon_group()
            if resync is not None:
                blocked = f"resync {resync} (changes {rec.first_seq}-{rec.last_seq}) dead-lettered ({reason})"
                rep.set_blocked(blocked)
                self._events.rejected.append((owner, resync, reason))
            else:
                blocked = (
                    f"changes {rec.first_seq}-{rec.last_seq} dead-lettered ({reason}); later changes wait behind them"
                )
                rep.set_blocked(blocked)
                self._want_resync(owner, blocked)
        return self._dead(item, owner, reason)

    def _process_one(self, item: _Item, touched: dict[str, AgentReplica], seen: set[str]) -> _Step:
        if item.gone is not None:
            return self._gone(item, item.gone, touched, seen)
        relay_owner = relay_subject_agent(item.subject)
        owner = relay_owner or subject_agent(item.subject)
        if owner is None:
            return self._dead(item, None, f"unexpected subject {item.subject!r}")
        if item.msg_id is None and _is_pub_ack(item.data):
            self.stats.foreign += 1  # not a record of `owner` at all: drop it, never count it against them
            return _Step(Verdict.DUPLICATE, None)
        own_prefix = f"relay:{owner}:" if relay_owner is not None else f"{owner}:"
        if item.msg_id is not None and not item.msg_id.startswith(own_prefix):
            # Only agent X's publisher makes ids "X:..." (and only the HTPC "relay:X:..."): a message id of
            # another agent's form on X's subject is an attempt to make that agent's next record a duplicate.
            self.stats.msg_id_alarms += 1
            return self._dead(
                item, owner, f"message id {item.msg_id[:100]!r} on {item.subject!r} is not {owner}'s (id squatting)"
            )
        try:
            rec = decode_record(item.data)
        except RecordDecodeError as exc:
            return self._dead(item, owner, str(exc))
        if isinstance(rec, RelayRecord) != (relay_owner is not None):
            # Relay writes come only from the HTPC's own key (agents may not publish on relay subjects), and an
            # agent's key may not pass its records off as relay writes into its own or anyone's tables.
            what = _KIND_NAMES.get(type(rec), "a change record")
            return self._dead(item, owner, f"{what} may not be published on {item.subject!r}")
        header = RecordHeader.of(owner, rec)
        verdict = sequence(self.store.position(owner), header)
        if verdict is Verdict.DEAD_LETTER:
            return self._dead(item, owner, f"record says agent {rec.agent_id!r} but was published on {item.subject!r}")
        try:
            rep = self.store.replica(owner)
        except RecordRejected as exc:
            return self._dead(item, owner, str(exc))
        except (sqlite3.Error, OSError) as exc:  # e.g. no file descriptor left to open its database: retry
            self.last_error = f"cannot open the central copy of {owner}: {exc}"
            return _Step(verdict, owner, _Applied.FAILED)
        seen.add(owner)
        rep.observe(header, verdict)
        if isinstance(rec, AgentStatusRecord):
            if not self._open_txn(rep, touched):
                return _Step(verdict, owner, _Applied.FAILED)
            if rep.note_status(rec):
                self.stats.statuses += 1
            return _Step(verdict, owner, _Applied.WRITTEN)
        if verdict in (Verdict.GAP, Verdict.BLOCKED):
            return self._hold(item, rep, header, touched)
        # A remembered record whose turn came (or that is no longer needed) is forgotten in the same transaction.
        if item.ahead and not self._open_txn(rep, touched, settle=item.stream_seq):
            return _Step(verdict, owner, _Applied.FAILED)
        if verdict is Verdict.DUPLICATE:
            self.stats.duplicates += 1
            return _Step(verdict, owner)
        if verdict is Verdict.STALE_EPOCH:
            self.stats.stale += 1
            return _Step(verdict, owner)
        if not self._open_txn(rep, touched):
            return _Step(verdict, owner, _Applied.FAILED)
        try:
            if verdict is not Verdict.RESYNC:  # a resync is measured once the copy it replaces is dropped
                rep.check_quota(rec, len(item.data))
        except RecordRejected as exc:
            return self._rejected(item, rep, rec, header, str(exc))
        except sqlite3.Error as exc:
            self.last_error = f"cannot read the size of {owner}'s central copy: {exc}"
            return _Step(verdict, owner, _Applied.FAILED)
        try:
            if isinstance(rec, ChangeRecord) and not rec.final and not rep.state.open_group:
                rep.begin_group()  # its first part: a part that cannot be applied takes the whole of it back
            with rep.record_savepoint():
                if isinstance(rec, RelayRecord):
                    written = rep.apply_relay(rec, item.stream_seq)
                elif verdict is Verdict.RESYNC:
                    rep.reset_for_resync(rec)
                    rep.check_quota(rec, len(item.data))
                    rep.apply_changes(rec)
                    written = True
                else:
                    rep.apply_changes(rec)
                    written = True
            if not rep.state.open_group:
                rep.end_group()
        except RecordRejected as exc:
            return self._rejected(item, rep, rec, header, str(exc))
        except Exception as exc:  # the machine's fault (disk full, I/O): roll back and retry later, never lose it
            self.last_error = f"apply failed for {owner}: {exc}"
            log.debug("%s", self.last_error)
            return _Step(verdict, owner, _Applied.FAILED)
        if not written:
            self.stats.duplicates += 1  # a relay record applied before whose ack was lost
            return _Step(verdict, owner, _Applied.WRITTEN)
        self.stats.applied += 1
        if isinstance(rec, ChangeRecord) and rep.state.blocked is not None:
            rep.set_blocked(None)  # the sequence moved on (e.g. a new epoch): no longer blocked
        return _Step(verdict, owner, _Applied.WRITTEN)
