"""Publishes the local change log to JetStream, in order, without loss.

The writer never waits for this: commits only wake it. Each closed
transaction group of the log becomes one record (or, if it is larger than
`max_record_bytes`, consecutive parts flagged `final=False` that the HTPC
applies as one transaction). Record boundaries depend only on the log's
content, so a record re-sent after a crash gets the same `Nats-Msg-Id` and
JetStream drops the copy. Several records are in flight at once; on any
failure the publisher goes back to the first unacknowledged change. Log rows
are deleted only after their PubAck.

Message ids are keyed with the database's secret (change_record.msg_id), and
a PubAck saying `duplicate` is believed only when this publisher may itself
have stored that id before: a send of this process whose outcome it never
learnt, or a record already in the log when it started (a send made before a
crash). Any other duplicate is a collision, someone else's message holding
the id: the record is kept, published again under a fresh id (its nonce is
saved first, so a crash cannot lose it either), counted and reported by
`health_check()`. The HTPC drops a true copy by its sequence numbers.

Never stuck silently. A change that cannot be sent at all (its record is
larger than the stream accepts, or JetStream refuses it with an error) makes
the publisher `blocked`, with the reason and since when, in `health_check()`
and in the agent status record (change_record.AgentStatusRecord) it publishes
after it (re)connects, whenever `blocked` changes and every 30 s while it has
a backlog or is blocked; the change is retried with a long backoff. Publishing
that keeps failing without an answer while connected (no PubAck for
`stuck_after_s`) is reported as blocked too, but retried at the usual pace.
A resync (resync.py) deletes the unacknowledged changes it supersedes: the
publisher forgets what it read of them (`resynced`) and goes on from the
resync's R change, which is how a change that cannot be sent is healed once
its row was fixed.

After a large drain the pages the log held are given back to the file system
(disk_space.reclaim, a bounded step at a time through the writer queue).

It never polls. It sleeps until something happens: a local commit (`notify`, called by the writer, which has
closed the commit's transaction group itself), a PubAck, the NATS link (re)connecting, a resync, or one of its
own timers (a retry, an ack deadline, a due trim or status record). Writes made by another process (the
sqlite3 shell, another program) are noticed by a cheap change signal read on the event loop every
`change_check_s` (`PRAGMA data_version`, a few microseconds): only when it moved is the log read, and the
open group closed if it holds rows. Small reads run on the event loop on a plain sqlite3 connection (a thread
hop costs more than reading one record); a read that comes back full (a backlog) moves the next reads to a
reader thread, in large batches, so the loop is never held long.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import math
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.js.errors
import orjson
from nats.js import JetStreamContext
from nats.js.api import PubAck

from . import catalog, change_log, disk_space
from ._sqlite_thread import SQLiteThread
from .backoff import Backoff
from .change_record import (
    RESYNC_LAYOUT_ID,
    AgentStatusRecord,
    change_json,
    change_record_bytes,
    encode_record,
    encode_values,
    layout_json,
    msg_id,
    status_msg_id,
)
from .histogram import Histogram
from .local_store import LocalStore, connect, is_busy, reader_connection
from .nats_link import NatsLink
from .stream import STREAM_NAME, ensure_stream
from .subjects import changes_subject

#: Room kept in a record for what is not its changes (header, layouts with their schema SQL, msg id header).
_ENVELOPE_BYTES = 16 * 1024
#: A status record is sent at least this often while there is a backlog or a block.
STATUS_INTERVAL_S = 30.0
#: A status record that could not be sent is tried again after this.
_STATUS_RETRY_S = 5.0
#: With nothing to report, the log is read for a backlog at most this often (not on every round of the loop).
_STATUS_CHECK_S = 1.0
#: How often the change signal (`PRAGMA data_version`) is read for writes made by other processes.
CHANGE_CHECK_S = 0.5
#: The shortest sleep of the publisher's loop between rounds nobody woke it for.
_MIN_SLEEP_S = 0.001
#: Acknowledged rows are trimmed at least this often ...
_TRIM_INTERVAL_S = 1.0
#: ... or as soon as this many are waiting (the log stays bounded by about a second of writes plus this).
_TRIM_ROWS = 4096
#: A trim of at most this many rows is bounded work: it may run on the event loop (`small=True`).
_SMALL_TRIM_ROWS = 256
#: Value cells one read on the event loop takes at most (rows x columns): bounded work between other tasks.
_LOOP_READ_CELLS = 1024
#: Above this backlog a status record's log size (a `dbstat` scan of the log) is read on the reader thread.
_LOOP_LOG_BYTES_ROWS = 2000
#: A group of at most this many changes is packed with one `orjson.dumps` for the whole record.
_PACK_AT_ONCE = 1024

T = TypeVar("T")

log = logging.getLogger("agent_client.publisher")


@dataclass(slots=True)
class _Chunk:
    """The changes of one record being packed.

    While the chunk is small its changes are kept as plain lists (`items`) and the record is encoded with one
    `orjson.dumps`; a chunk that grows past `_PACK_AT_ONCE` changes is switched to per-change encoding (`parts`,
    `size`) so it can be cut exactly where the per-change rule cuts. Both give the same bytes and boundaries.
    """

    first: int
    tx: int
    last: int = 0
    items: list[list[Any]] = field(default_factory=list)
    ats: list[float] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    layouts: set[int] = field(default_factory=set)
    committed_at: float = 0.0


@dataclass(frozen=True)
class _Record:
    first: int
    last: int
    payload: bytes
    tables: tuple[str, ...]


@dataclass
class _InFlight:
    first: int
    last: int
    msg_id: str
    future: asyncio.Future[PubAck]
    deadline: float
    sent_at: float  # monotonic: when it was handed to NATS (its PubAck's latency is measured from it)


class _Width:
    """The widest layout's column count (catalog.WidestLayout), remembering the last answer: it sizes reads."""

    def __init__(self) -> None:
        self._widest = catalog.WidestLayout()
        self.last = 0

    def __call__(self, conn: sqlite3.Connection) -> int:
        self.last = self._widest(conn)
        return self.last


def next_tick(now: float, period: float) -> float:
    """The next multiple of `period` after `now` (monotonic seconds).

    Periodic checks of many agents in one process land on the same instants, so the event loop wakes once for
    all of them instead of once for each (an idle agent costs a few microseconds a check, a wake-up far more).
    """
    return (math.floor(now / period) + 1) * period


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    """A read ahead nobody will use: retrieve its outcome so asyncio does not report it."""
    if not fut.cancelled():
        fut.exception()


def _data_version(conn: sqlite3.Connection) -> int:
    """SQLite's count of commits by other connections (changes whenever anyone else commits)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


class PublishFailed(Exception):
    """Internal: a publish failed or timed out; rewind to the first unacknowledged change."""


class MsgIdCollision(PublishFailed):
    """Internal: JetStream called a record a duplicate of a message this publisher never stored."""


class AckTimeout(PublishFailed):
    """Internal: no PubAck in time. The next record is sent as a probe (see `_probe`)."""


class Unsendable(PublishFailed):
    """Internal: a record that cannot be sent as it is (too large, or refused by JetStream); `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Publisher:
    def __init__(
        self,
        *,
        store: LocalStore,
        db_path: Path,
        link: NatsLink,
        agent_id: str,
        epoch: str,
        max_record_bytes: int = 256 * 1024,
        max_record_changes: int = 5000,
        max_in_flight: int = 32,
        read_batch: int = 5000,
        ack_timeout: float = 5.0,
        poll_interval: float = 0.05,
        change_check_s: float = CHANGE_CHECK_S,
        status_interval: float = STATUS_INTERVAL_S,
        blocked_retry_initial: float = 5.0,
        blocked_retry_max: float = 60.0,
        stuck_after_s: float = 60.0,
    ) -> None:
        self.store = store
        self.db_path = db_path
        self.link = link
        self.agent_id = agent_id
        self.epoch = epoch
        self.subject = changes_subject(agent_id)
        self.max_record_bytes = max_record_bytes  # lowered to fit the stream's own bound (max_msg_size)
        self._configured_max_record_bytes = max_record_bytes
        self._limits_checked_at = 0.0
        self.max_record_changes = max_record_changes
        self.max_in_flight = max_in_flight
        self.read_batch = read_batch
        self.ack_timeout = ack_timeout
        self.poll_interval = poll_interval  # accepted for compatibility: nothing polls any more
        self.change_check_s = change_check_s
        self.status_interval = status_interval
        self.stuck_after_s = stuck_after_s

        self.acked_seq = 0
        self.last_publish_at: float | None = None
        self.last_error: str | None = None
        self.records_published = 0
        #: duplicate PubAcks believed (a resend of something this publisher may have stored before)
        self.duplicates_acked = 0
        #: duplicate PubAcks for ids this publisher never stored: someone else's message held the id
        self.msg_id_collisions = 0
        self.last_msg_id_collision: dict[str, Any] | None = None
        #: why the publisher cannot send (None while it can), and since when (unix time)
        self.blocked: str | None = None
        self.blocked_since: float | None = None
        #: status records JetStream acknowledged, and when the last one was made
        self.status_reports = 0
        self.last_status_at: float | None = None
        #: seconds from a record's send to its PubAck, per acknowledged record (observed on the event loop;
        #: readers take `publish_latency.snapshot()` from any thread)
        self.publish_latency = Histogram()
        self._backoff = Backoff()
        self._blocked_backoff = Backoff(blocked_retry_initial, blocked_retry_max)
        self._retry_at = 0.0  # monotonic: no publishing attempt before it (after a failure)
        self._failing_since: float | None = None  # first failure since the last acknowledged record
        self._resync_at: int | None = None  # a resync superseded the log below this seq: rewind first
        self._status_generation: int | None = None  # the connection the last status went out on
        self._status_blocked: str | None = None
        self._status_sent_at = -math.inf  # monotonic
        self._status_retry_at = 0.0
        self._status_check_at = 0.0  # monotonic: no backlog read for a status before it
        self._check_space = False  # a trim happened: maybe give free pages back
        self._probe = False  # a PubAck never came: send the next record alone and wait for its answer
        self._stream_max_msg = 0  # the stream's max_msg_size (0: unknown or unlimited)
        self._secret = b""
        self._open_last = 0  # newest seq in the log at start: records up to it may have been sent before
        self._maybe_stored: dict[str, int] = {}  # ids sent whose outcome is unknown -> the record's last seq
        self._fresh: dict[tuple[int, int], str] = {}  # (first, last) -> nonce of a record's fresh id
        self._unsaved: dict[tuple[int, int], str] = {}  # fresh-id nonces not yet in the database
        self._trimmed_seq = 0
        self._last_trim = 0.0
        self._reader: SQLiteThread = reader_connection(db_path)  # opened at the first large read
        self._conn: sqlite3.Connection | None = None  # reads on the event loop
        self._loop_width = _Width()  # for reads on self._conn
        self._dirty = True  # the log may hold closed rows after the cursor that were not read
        self._backlog = False  # the last read came back full: read the rest on the reader thread
        #: the next batch of a backlog, being read on the thread: (its cursor, the read)
        self._read_ahead: tuple[int, asyncio.Future[tuple[list[change_log.LogRow], bool]]] | None = None
        self._data_version: int | None = None
        self._signal_at = 0.0  # monotonic: next look at the change signal
        #: what the publisher did (counters, for tests and benchmarks): rounds of its loop, reads of the log
        #: on the event loop and on the reader thread, looks at the change signal, groups it closed
        self.rounds = 0
        self.loop_reads = 0
        self.thread_reads = 0
        self.signal_checks = 0
        self.groups_closed = 0
        self.trims = 0
        self._wake = asyncio.Event()
        self._acked_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._layouts: dict[int, catalog.Layout] = {}
        self._layout_json: dict[int, bytes] = {}
        #: (layout, op) -> the values of a log row of that change (see `_pack_rows` for the rule)
        self._slices: dict[tuple[int, str], slice] = {(RESYNC_LAYOUT_ID, "R"): slice(5, 6)}
        self._width = _Width()  # used on the reader's thread only
        self._stream_ready = False
        # publishing state, reset on failure
        self._cursor = 0
        self._carry: _Chunk | None = None
        self._in_flight: deque[_InFlight] = deque()
        self._generation = link.generation  # the connection the in-flight records were sent on

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        # A read on the event loop never waits for a lock: if SQLite says busy, the read goes to the thread.
        conn = self._conn = connect(self.db_path, busy_timeout_ms=0, setup=False)
        first, last = change_log.bounds(conn)
        self._secret = change_log.msg_id_secret(conn)
        self._fresh = change_log.msg_id_nonces(conn)
        self._data_version = _data_version(conn)
        self._open_last = last
        self.acked_seq = first - 1 if first else last
        self._trimmed_seq = self.acked_seq
        self._cursor = self.acked_seq
        self.link.add_listener(self._link_changed)
        self._task = asyncio.create_task(self._run(), name=f"publisher-{self.agent_id}")

    @property
    def running(self) -> bool:
        """The publishing loop is alive (False before `start`, after `close`, or if it died)."""
        return self._task is not None and not self._task.done()

    def notify(self) -> None:
        """Called after every local commit (its group is closed already): read the log now."""
        self._dirty = True
        self._wake.set()

    def resynced(self, at_seq: int) -> None:
        """A resync was committed at `at_seq`: the log below it is gone. Forget what was read of it, retry now."""
        self._resync_at = at_seq
        self._dirty = True
        self._wake.set()

    def _link_changed(self) -> None:
        """The NATS link connected, reconnected or went away: publish (or notice the failure) now."""
        self._dirty = True
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._drop_in_flight()
        if self._read_ahead is not None:
            self._read_ahead[1].cancel()
            self._read_ahead = None
        with contextlib.suppress(Exception):
            await self._reader.close()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    async def wait_acked(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked_seq < target:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._acked_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked_event.wait(), remaining)
        return True

    async def backlog(self) -> tuple[int, float | None]:
        """(changes not yet acknowledged, age in seconds of the oldest of them). Two index lookups, on the loop."""
        acked = self.acked_seq
        last, oldest_at = await self._read_small(lambda c: change_log.backlog(c, acked))
        age = (time.time() - oldest_at) if oldest_at is not None else None
        return max(0, last - acked), age

    # ----------------------------------------------------------------- main loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            if not self._wake.is_set():
                # Never a busy loop, whatever a timer says: a due timer waits a millisecond at most. (The loop's
                # clock is time.monotonic, asyncio's and uvloop's alike: call_at takes the same instants.)
                timer = loop.call_at(max(self._next_timer(), time.monotonic() + _MIN_SLEEP_S), self._wake.set)
                try:
                    await self._wake.wait()
                finally:
                    timer.cancel()
            self._wake.clear()
            self.rounds += 1
            now = time.monotonic()
            if now >= self._signal_at:
                self._check_signal(now)
            if self._resync_at is not None:
                at_seq, self._resync_at = self._resync_at, None
                log.info("agent %s: resync at change %d; publishing from there", self.agent_id, at_seq)
                self._rewind()
                self._fresh = {key: nonce for key, nonce in self._fresh.items() if key[0] >= at_seq}
                self._retry_at = 0.0
                self._blocked_backoff.reset()
                self._backoff.reset()
            if time.monotonic() >= self._retry_at:
                await self._attempt()
            await self._report_status()

    def _next_timer(self) -> float:
        """When the loop must look again by itself (monotonic): the change signal, or an earlier timer."""
        at = self._signal_at
        now = time.monotonic()
        if self._retry_at > now:
            at = min(at, self._retry_at)
        if self._in_flight:
            at = min(at, self._in_flight[0].deadline)
        if self.acked_seq > self._trimmed_seq:
            at = min(at, self._last_trim + _TRIM_INTERVAL_S)
        if self.link.connected:
            if self._status_retry_at > now:
                at = min(at, self._status_retry_at)
            elif self.blocked is not None:
                at = min(at, self._status_sent_at + self.status_interval)
            elif not self._quiet():
                at = min(at, max(self._status_sent_at + self.status_interval, self._status_check_at))
        return at

    def _check_signal(self, now: float) -> None:
        """Has any other connection committed since the last look? Then the log is read (a few microseconds)."""
        # On a grid shared by every publisher of the process: many idle agents wake in one turn of the loop.
        self._signal_at = next_tick(now, self.change_check_s)
        self.signal_checks += 1
        assert self._conn is not None
        try:
            version = _data_version(self._conn)
        except sqlite3.Error:
            version = None  # cannot tell: read the log
        if version is None or version != self._data_version:
            self._data_version = version
            self._dirty = True

    def _quiet(self) -> bool:
        """Nothing to read nor to wait for: everything read is acknowledged and no commit was seen since."""
        return not self._dirty and not self._in_flight and self._carry is None and self._cursor == self.acked_seq

    async def _attempt(self) -> None:
        """One round: publish what is closed (closing a group another process left open), trim; a failure
        rewinds and sets the backoff."""
        try:
            if self.link.connected and self.link.js is not None:
                if not self._stream_ready:
                    await ensure_stream(self.link.js)
                    self._stream_ready = True
                await self._fit_stream_limits()
                await self._pump()
                self._backoff.reset()
            else:
                self._failing_since = None  # not a publishing failure: health shows the link down
            await self._maybe_trim()
            await self._maybe_reclaim()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # PublishFailed, NATS errors, a locked database
            self._failed(exc)
            return
        if not self._in_flight and self._carry is None and self._cursor == self.acked_seq:
            self._failing_since = None  # everything read is acknowledged: no failure is going on

    def _failed(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.debug("publisher rewinding after: %s", self.last_error)
        self._rewind()
        now = time.time()
        if self._failing_since is None:
            self._failing_since = now
        if isinstance(exc, AckTimeout):
            self._probe = True
        if isinstance(exc, Unsendable):
            self._set_blocked(exc.reason)
            delay = self._blocked_backoff.next()
            log.error("agent %s: publishing is blocked: %s (next try in %.0f s)", self.agent_id, exc.reason, delay)
        else:
            if self.link.connected and now - self._failing_since >= self.stuck_after_s:
                self._set_blocked(
                    f"nothing acknowledged by JetStream after change {self.acked_seq} for "
                    f"{now - self._failing_since:.0f} s while connected; last error: {self.last_error}"
                )
            delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay

    def _set_blocked(self, reason: str) -> None:
        if self.blocked is None:
            self.blocked_since = time.time()
        self.blocked = reason

    def _progress(self) -> None:
        """A record was acknowledged: whatever blocked the publisher is behind it."""
        self._failing_since = None
        if self.blocked is not None:
            log.warning("agent %s: publishing resumed (was blocked: %s)", self.agent_id, self.blocked)
            self.blocked = None
            self.blocked_since = None
            self._blocked_backoff.reset()

    # ----------------------------------------------------------------- status records
    async def _report_status(self) -> None:
        """Send an agent status record when one is due: (re)connected, `blocked` changed, or every
        `status_interval` while there is a backlog or a block. Never raises; a failed send is retried later."""
        js = self.link.js
        if js is None or not self.link.connected or self._conn is None:
            return
        now = time.monotonic()
        if now < self._status_retry_at:
            return
        due = self._status_generation != self.link.generation or self._status_blocked != self.blocked
        last: int | None = None
        try:
            if not due and now - self._status_sent_at >= self.status_interval:
                if self.blocked is not None:
                    due = True
                elif self._quiet():
                    due = False  # everything read is acknowledged and nothing was committed since
                elif now >= self._status_check_at:
                    last = await self._read_small(change_log.last_committed_seq)
                    due = last > self.acked_seq
                    if not due:
                        self._status_check_at = now + min(_STATUS_CHECK_S, self.status_interval)
            if not due:
                return
            generation, blocked = self.link.generation, self.blocked
            if last is None:
                last = await self._read_small(change_log.last_committed_seq)
            if last - self.acked_seq <= _LOOP_LOG_BYTES_ROWS:
                log_bytes = await self._read_small(disk_space.log_bytes)
            else:  # dbstat walks every page of the log: not on the event loop
                log_bytes = await self._read_on_thread(disk_space.log_bytes)
            record = AgentStatusRecord(
                agent_id=self.agent_id,
                epoch=self.epoch,
                last_seq=last,
                acked_seq=max(0, self.acked_seq),
                blocked=blocked,
                log_bytes=log_bytes,
                at=time.time(),
            )
            mid = status_msg_id(self.agent_id, self.epoch, secret=self._secret, nonce=secrets.token_hex(16))
            headers = {"Nats-Msg-Id": mid}
            await js.publish(self.subject, encode_record(record), headers=headers, timeout=self.ack_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # NATS down or slow, a locked database: the next round tries again
            log.debug("agent %s: status record not sent: %r", self.agent_id, exc)
            self._status_retry_at = time.monotonic() + _STATUS_RETRY_S
            return
        self._status_generation, self._status_blocked = generation, blocked
        self._status_sent_at = time.monotonic()
        self.status_reports += 1
        self.last_status_at = record.at

    def _rewind(self) -> None:
        self._dirty = True
        if self._read_ahead is not None:  # read before the failure (or the resync): not to be trusted
            self._read_ahead[1].cancel()
            self._read_ahead = None
        self._generation = self.link.generation
        self._drop_in_flight()
        self._cursor = self.acked_seq
        self._carry = None
        acked = self.acked_seq
        self._maybe_stored = {mid: last for mid, last in self._maybe_stored.items() if last > acked}

    def _drop_in_flight(self) -> None:
        """Forget the records in flight; remember which of them JetStream may have stored under their id."""
        for item in self._in_flight:
            if not item.future.done():
                item.future.cancel()
                self._maybe_stored[item.msg_id] = item.last
                continue
            ack = None if item.future.cancelled() or item.future.exception() is not None else item.future.result()
            if ack is not None and ack.duplicate and not self._may_have_stored(item):
                self._collision(item, ack)
            else:
                self._maybe_stored[item.msg_id] = item.last
        self._in_flight.clear()

    def _may_have_stored(self, item: _InFlight) -> bool:
        """Could JetStream hold `item`'s id because of a send of ours (so a duplicate PubAck is the truth)?"""
        return item.msg_id in self._maybe_stored or item.last <= self._open_last

    def _collision(self, item: _InFlight, ack: PubAck) -> None:
        """A duplicate PubAck for an id we never stored: give the record a fresh id, count and report it."""
        nonce = secrets.token_hex(16)
        self._fresh[(item.first, item.last)] = nonce
        self._unsaved[(item.first, item.last)] = nonce
        self.msg_id_collisions += 1
        self.last_msg_id_collision = {
            "first_seq": item.first,
            "last_seq": item.last,
            "msg_id": item.msg_id,
            "stream_seq": ack.seq,
            "at": time.time(),
        }
        log.warning(
            "agent %s: JetStream reports changes %d-%d (id %s) as a duplicate of stream message %s, which this "
            "agent never published: the record is kept and sent again under a fresh id (collision %d)",
            self.agent_id,
            item.first,
            item.last,
            item.msg_id,
            ack.seq,
            self.msg_id_collisions,
        )

    async def _fit_stream_limits(self) -> None:
        """Keep records within the stream's bound on one message (the HTPC sets it: `--max-record-bytes`).

        Read once a minute: a record over it would be refused by JetStream on every attempt.
        """
        now = time.monotonic()
        if now - self._limits_checked_at < 60.0 or self.link.js is None:
            return
        self._limits_checked_at = now
        try:
            info = await self.link.js.stream_info(STREAM_NAME)
        except Exception as exc:  # only an optimisation of the record size: the next check tries again
            log.debug("cannot read the stream's limits: %r", exc)
            return
        limit = info.config.max_msg_size or 0
        self._stream_max_msg = max(0, limit)
        wanted = self._configured_max_record_bytes
        if limit > 0:
            wanted = max(1024, min(wanted, limit - _ENVELOPE_BYTES))
        if wanted != self.max_record_bytes:
            log.info("agent %s: records of at most %d bytes (stream limit %d)", self.agent_id, wanted, limit)
            self.max_record_bytes = wanted

    # ----------------------------------------------------------------- the database
    async def _read_small(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a short read on the event loop's connection (the reader thread if SQLite is busy right now)."""
        assert self._conn is not None
        try:
            return fn(self._conn)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            return await self._read_on_thread(fn)

    async def _read_on_thread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on the reader thread (nothing is opened before the first use: an idle agent never needs it)."""
        return await self._reader.call(fn)

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], *, small: bool) -> Any:
        """A bookkeeping write through the writer (`small`: bounded work that may run on the event loop)."""
        return await self.store.write(fn, single_statement=True, small=small)

    async def _close_group(self) -> None:
        """Close the open group (rows another process wrote): a transaction holding only that."""
        await self.store.close_group()
        self.groups_closed += 1
        self._dirty = True

    async def _read_log(self) -> tuple[list[change_log.LogRow], int, bool]:
        """The next closed rows after the cursor: (rows, the limit asked, does the open group hold rows).

        A small read on the event loop (about `_LOOP_READ_CELLS` values, tens of microseconds); when one comes
        back full there is a backlog, and reads go to the reader thread in `read_batch` rows until one is short.
        """
        self._dirty = False
        cursor = self._cursor
        if not self._backlog:
            assert self._conn is not None
            limit = max(8, _LOOP_READ_CELLS // (self._loop_width.last + 5))
            try:
                rows, has_open = change_log.read_log(self._conn, cursor, limit, self._loop_width)
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                self._backlog = True  # SQLite is busy: this read waits on the reader thread
            else:
                self.loop_reads += 1
                self._backlog = len(rows) >= limit
                if self._backlog:
                    self._dirty = True
                return rows, limit, has_open
        limit = self.read_batch
        ahead, self._read_ahead = self._read_ahead, None
        if ahead is not None and ahead[0] == cursor:
            rows, has_open = await ahead[1]
        else:
            if ahead is not None:
                ahead[1].cancel()
            rows, has_open = await self._read_on_thread(self._thread_read(cursor))
        self.thread_reads += 1
        self._backlog = len(rows) >= limit
        if self._backlog:
            self._dirty = True
            # Read the next batch on the thread while this one is packed and sent (SQLite lets go of the GIL).
            task = asyncio.ensure_future(self._read_on_thread(self._thread_read(rows[-1][0])))
            task.add_done_callback(_ignore_outcome)
            self._read_ahead = (rows[-1][0], task)
        return rows, limit, has_open

    def _thread_read(self, cursor: int) -> Callable[[sqlite3.Connection], tuple[list[change_log.LogRow], bool]]:
        return functools.partial(change_log.read_log, cursor=cursor, limit=self.read_batch, width=self._width)

    async def _pump(self) -> None:
        """Publish whatever closed groups are available, keeping up to max_in_flight records unacked."""
        if self._unsaved:  # a fresh id is used only once it survives a crash
            nonces = dict(self._unsaved)
            await self._write(lambda c: change_log.save_msg_id_nonces(c, nonces), small=True)
            for key in nonces:
                self._unsaved.pop(key, None)
        while True:
            self._collect_acks()
            if not self._dirty:
                break
            if len(self._in_flight) >= self.max_in_flight:
                await self._await_head()
                continue
            rows, limit, has_open = await self._read_log()
            if rows:
                await self._load_layouts({int(r[2]) for r in rows} - {RESYNC_LAYOUT_ID})
                for record in self._pack(rows, complete=len(rows) < limit):
                    await self._send(record)
                self._cursor = rows[-1][0]
            elif self._carry is not None:
                # The last read ended exactly where its group did: nothing closed follows, so the
                # carried part is that group's end.
                carry, self._carry = self._carry, None
                for record in self._close_chunk(carry):
                    await self._send(record)
            if has_open:
                await self._close_group()  # rows another process wrote: read once their group is closed
        self._collect_acks()

    def _check_size(self, record: _Record) -> None:
        """A record over what the server or the stream accepts would be refused on every attempt."""
        nc = self.link.nc
        limits = [n for n in (self._stream_max_msg, nc.max_payload if nc is not None else 0) if n and n > 0]
        limit = min(limits, default=0)
        size = len(record.payload)
        if not limit or size <= limit:
            return
        if record.last > record.first:  # several changes: cut smaller records
            self.max_record_bytes = max(1024, min(self.max_record_bytes, limit - _ENVELOPE_BYTES))
            raise PublishFailed(f"a record of {size} bytes is over the limit of {limit}; cutting smaller records")
        raise Unsendable(
            f"change {record.first} (table {', '.join(record.tables) or '?'}) makes a record of {size} bytes; "
            f"NATS/JetStream accept at most {limit} (the stream's max_msg_size, the server's max_payload). Make the "
            f"row smaller, or raise the limit (HTPC --max-record-bytes); after fixing the row, resync the agent "
            f"(`replicator resync {self.agent_id}`)"
        )

    async def _send(self, record: _Record) -> None:
        first, last, payload = record.first, record.last, record.payload
        js = self.link.js
        if js is None:
            raise PublishFailed("not connected")
        if self._generation != self.link.generation:
            # Records in flight on the lost connection may never be stored: publishing later ones now
            # would put them on the stream ahead of those. Resend from the first unacknowledged change.
            raise PublishFailed("the NATS connection was lost while records were in flight")
        while len(self._in_flight) >= self.max_in_flight:
            await self._await_head()
        self._check_size(record)
        nonce = self._fresh.get((first, last))
        mid = msg_id(self.agent_id, self.epoch, first, last, secret=self._secret, nonce=nonce)
        sent_at = time.monotonic()
        if self._probe:
            fut = await self._send_probe(js, record, mid)
        else:
            fut = await js.publish_async(self.subject, payload, headers={"Nats-Msg-Id": mid})
            fut.add_done_callback(lambda _f: self._wake.set())
        self._in_flight.append(_InFlight(first, last, mid, fut, time.monotonic() + self.ack_timeout, sent_at))

    async def _send_probe(self, js: JetStreamContext, record: _Record, mid: str) -> asyncio.Future[PubAck]:
        """Publish one record and wait for its answer (after a PubAck never came).

        nats-py never resolves a `publish_async` future whose answer is a JetStream error (it raises inside its
        reply handler instead): a refused record looks like a lost PubAck. A plain publish gets the refusal as
        an exception, so the publisher can say why it is blocked. Its outcome goes in flight like any other.
        """
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        try:
            ack = await js.publish(self.subject, record.payload, headers={"Nats-Msg-Id": mid}, timeout=self.ack_timeout)
        except nats.js.errors.APIError as exc:
            if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                self._maybe_stored[mid] = record.last
                raise AckTimeout(f"JetStream unavailable for changes {record.first}-{record.last}: {exc}") from None
            raise self._refused(record.first, record.last, exc) from None
        except Exception as exc:  # timeout, connection lost: the record may have been stored
            self._maybe_stored[mid] = record.last
            raise AckTimeout(f"no PubAck for changes {record.first}-{record.last}: {exc!r}") from None
        self._probe = False
        fut.set_result(ack)
        return fut

    def _refused(self, first: int, last: int, exc: nats.js.errors.APIError) -> Unsendable:
        """JetStream answered changes `first`-`last` with an error: blocked until it stores them (or a resync)."""
        return Unsendable(
            f"JetStream refused changes {first}-{last}: {exc.description or exc} "
            f"(code {exc.code}, err_code {exc.err_code}); retried on a long backoff. If it can never be stored, "
            f"fix the row, then `replicator resync {self.agent_id}`"
        )

    async def _await_head(self) -> None:
        head = self._in_flight[0]
        remaining = head.deadline - time.monotonic()
        if not head.future.done():
            done, _ = await asyncio.wait({head.future}, timeout=max(0.0, remaining))
            if not done:
                raise AckTimeout(f"no PubAck for changes {head.first}-{head.last} within {self.ack_timeout}s")
        self._collect_acks()

    def _collect_acks(self) -> None:
        advanced = False
        now = time.monotonic()
        try:
            while self._in_flight:
                head = self._in_flight[0]
                if not head.future.done():
                    if now > head.deadline:
                        raise AckTimeout(f"no PubAck for changes {head.first}-{head.last} within {self.ack_timeout}s")
                    break
                exc = head.future.exception() if not head.future.cancelled() else PublishFailed("cancelled")
                if isinstance(exc, nats.js.errors.APIError) and not isinstance(
                    exc, nats.js.errors.ServiceUnavailableError
                ):
                    raise self._refused(head.first, head.last, exc)
                if exc is not None:
                    raise PublishFailed(f"publish of changes {head.first}-{head.last} failed: {exc!r}")
                ack = head.future.result()
                if ack.stream != STREAM_NAME:
                    raise PublishFailed(f"changes were stored in stream {ack.stream!r}, expected {STREAM_NAME}")
                self._in_flight.popleft()
                if ack.duplicate:
                    if not self._may_have_stored(head):
                        self._collision(head, ack)
                        raise MsgIdCollision(
                            f"changes {head.first}-{head.last}: JetStream called them a duplicate of stream "
                            f"message {ack.seq}, which this agent never published; resending under a fresh id"
                        )
                    self.duplicates_acked += 1
                self._maybe_stored.pop(head.msg_id, None)
                self.acked_seq = head.last
                self.records_published += 1
                self.publish_latency.observe(max(0.0, now - head.sent_at))
                advanced = True
        finally:
            if advanced:  # also when a later head failed: waiters see what was acknowledged before it
                self.last_publish_at = time.time()
                self.last_error = None
                self._progress()
                self._acked_event.set()

    async def _maybe_trim(self) -> None:
        """Delete acknowledged rows: about once a second (or every `_TRIM_ROWS` rows), not after every PubAck.

        Each trim is a transaction of the writer; batching them keeps the publisher's share of the writer far
        below one transaction per write, and the log bounded by about a second of writes. A trim of a few
        hundred rows is bounded and may run on the event loop; a larger one runs on the writer thread.
        """
        acked = self.acked_seq
        pending = acked - self._trimmed_seq
        if pending <= 0:
            return
        if pending < _TRIM_ROWS and time.monotonic() - self._last_trim < _TRIM_INTERVAL_S:
            return
        small = pending <= _SMALL_TRIM_ROWS
        await self._write(lambda c: change_log.trim(c, acked), small=small)
        if any(last <= acked for _first, last in self._fresh):
            await self._write(lambda c: change_log.forget_msg_id_nonces(c, acked), small=True)
            self._fresh = {key: nonce for key, nonce in self._fresh.items() if key[1] > acked}
        self._trimmed_seq = acked
        self._last_trim = time.monotonic()
        self.trims += 1
        if not small:
            self._check_space = True  # a few hundred rows free too little to be worth a look

    async def _maybe_reclaim(self) -> None:
        """Once everything sent is acknowledged, give the pages a large trim freed back (a bounded step a round)."""
        if not self._check_space or self._in_flight or self._carry is not None:
            return
        space = await self._read_small(disk_space.space)
        if not space.reclaimable:
            self._check_space = False
            return
        left = await self.store.write(disk_space.reclaim)
        log.debug("agent %s: gave free pages back (%d of %d left)", self.agent_id, left, space.free_pages)

    # ----------------------------------------------------------------- packing
    async def _load_layouts(self, ids: set[int]) -> None:
        missing = ids - self._layouts.keys()
        if missing:
            loaded = await self._read_small(lambda c: catalog.load_layouts(c, missing))
            self._layouts.update(loaded)
            for lid, layout in loaded.items():
                for op, width in (("U", len(layout.columns)), ("D", len(layout.pk)), ("S", 0), ("X", 0), ("V", 1)):
                    self._slices[lid, op] = slice(5, 5 + width)
                self._layout_json[lid] = layout_json(
                    table=layout.table,
                    columns=layout.columns,
                    types=layout.types,
                    pk=layout.pk,
                    sql=layout.sql,
                    visibility=layout.visibility,
                )

    def _pack(self, rows: list[change_log.LogRow], *, complete: bool) -> list[_Record]:
        """Cut rows into records; a trailing open chunk is carried to the next read unless complete.

        A record is one closed group, cut into parts (`final=False` but the last) only where adding a change
        would pass `max_record_bytes` or `max_record_changes`: boundaries depend on the log's content alone.
        A group's changes are kept as plain lists and encoded with one `orjson.dumps` when the group ends
        (`_close_chunk`); only a group too large for that is encoded change by change (`_add_part`), which
        gives the same bytes and cuts.
        """
        out: list[_Record] = []
        chunk = self._carry
        n = len(rows)
        if n and (rows[-1][0] - rows[0][0] != n - 1 or (chunk is not None and rows[0][0] != chunk.last + 1)):
            chunk = self._pack_rows(rows, chunk, out)  # a gap: raises where it is
        elif n:
            # Runs of one group at a time (tx never decreases along seq: a run ends where bisect says).
            txs = [r[1] for r in rows]
            slices = self._slices
            i = 0
            while i < n:
                tx = txs[i]
                j = n if tx == txs[-1] else bisect.bisect_right(txs, tx, i)
                run = rows[i:j] if i or j < n else rows
                i = j
                if chunk is not None and chunk.tx != tx:
                    out.extend(self._close_chunk(chunk))
                    chunk = None
                if chunk is not None and (chunk.parts or len(chunk.items) + len(run) > _PACK_AT_ONCE):
                    chunk = self._pack_rows(run, chunk, out)
                    continue
                try:
                    items = [[r[0], r[3], r[2], encode_values(r[slices[r[2], r[3]]])] for r in run]
                except KeyError:  # an op or layout the table of slices does not know: the general path
                    chunk = self._pack_rows(run, chunk, out)
                    continue
                if chunk is None:
                    chunk = _Chunk(first=run[0][0], tx=tx)
                chunk.items.extend(items)
                chunk.ats.extend([r[4] for r in run])
                chunk.layouts.update({r[2] for r in run})
                chunk.layouts.discard(RESYNC_LAYOUT_ID)
                chunk.last = run[-1][0]
                chunk.committed_at = run[-1][4]
        if chunk is not None and complete:
            out.extend(self._close_chunk(chunk))
            chunk = None
        self._carry = chunk
        return out

    def _pack_rows(self, rows: list[change_log.LogRow], chunk: _Chunk | None, out: list[_Record]) -> _Chunk | None:
        """`_pack`'s general path, row by row: gaps, unknown ops, groups too large for one dumps."""
        layouts = self._layouts
        for row in rows:
            seq, tx, layout_id, op, at = row[0], row[1], row[2], row[3], row[4]
            if chunk is not None:
                if seq != chunk.last + 1:
                    # Only a resync deletes log rows that were not acknowledged: what was read of them is void.
                    raise PublishFailed(
                        f"changes after {chunk.last} left the log (a resync superseded them); rewinding"
                    )
                if tx != chunk.tx:
                    out.extend(self._close_chunk(chunk))
                    chunk = None
            if op == "U":
                values = row[5 : 5 + len(layouts[layout_id].columns)]
            elif op == "D":
                values = row[5 : 5 + len(layouts[layout_id].pk)]
            elif op == "V" or op == "R":
                values = row[5:6]
            else:
                values = ()
            if chunk is None:
                chunk = _Chunk(first=seq, tx=tx)
            if chunk.parts or len(chunk.items) >= _PACK_AT_ONCE:  # a large group: encode change by change
                if chunk.items:
                    chunk = self._to_parts(chunk, out)
                chunk = self._add_part(chunk, out, tx, seq, layout_id, at, change_json(seq, op, layout_id, values))
                continue
            chunk.items.append([seq, op, layout_id, encode_values(values)])
            chunk.ats.append(at)
            chunk.last = seq
            if layout_id != RESYNC_LAYOUT_ID:
                chunk.layouts.add(layout_id)
            chunk.committed_at = at
        return chunk

    def _add_part(
        self, chunk: _Chunk | None, out: list[_Record], tx: int, seq: int, layout_id: int, at: float, part: bytes
    ) -> _Chunk:
        """Add one encoded change to a chunk, first cutting the chunk (a part, `final=False`) if it is full."""
        if chunk is not None and (
            chunk.size + len(part) + 1 > self.max_record_bytes or len(chunk.parts) >= self.max_record_changes
        ):
            out.append(self._finish(chunk, final=False))
            chunk = None
        if chunk is None:
            chunk = _Chunk(first=seq, tx=tx)
        chunk.parts.append(part)
        chunk.size += len(part) + 1
        chunk.last = seq
        if layout_id != RESYNC_LAYOUT_ID:
            chunk.layouts.add(layout_id)
        chunk.committed_at = at
        return chunk

    def _to_parts(self, chunk: _Chunk, out: list[_Record]) -> _Chunk:
        """Re-pack a chunk's plain changes change by change (the group is larger than one dumps is worth)."""
        parts: _Chunk | None = None
        for item, at in zip(chunk.items, chunk.ats, strict=True):
            parts = self._add_part(parts, out, chunk.tx, item[0], item[2], at, orjson.dumps(item))
        assert parts is not None
        return parts

    def _close_chunk(self, chunk: _Chunk) -> list[_Record]:
        """The records of a chunk whose group ended: one dumps for the whole record when it fits."""
        items = chunk.items
        if items:
            if len(items) <= self.max_record_changes:
                body = orjson.dumps(items)
                # the per-change rule keeps sum(len(change) + 1) <= max_record_bytes; the array is that + 1
                if len(items) == 1 or len(body) - 1 <= self.max_record_bytes:
                    return [self._finish(chunk, final=True, changes=body[1:-1])]
            out: list[_Record] = []
            chunk = self._to_parts(chunk, out)
            out.append(self._finish(chunk, final=True))
            return out
        return [self._finish(chunk, final=True)]

    def _finish(self, chunk: _Chunk, *, final: bool, changes: bytes | None = None) -> _Record:
        payload = change_record_bytes(
            agent_id=self.agent_id,
            epoch=self.epoch,
            first_seq=chunk.first,
            last_seq=chunk.last,
            final=final,
            committed_at=chunk.committed_at,
            layouts_json={lid: self._layout_json[lid] for lid in chunk.layouts},
            changes_json=chunk.parts if changes is None else (changes,),
        )
        tables = tuple(sorted({self._layouts[lid].table for lid in chunk.layouts}))
        return _Record(chunk.first, chunk.last, payload, tables)
