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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats.js.errors
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
    layout_json,
    msg_id,
    status_msg_id,
)
from .local_store import LocalStore, open_connection
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

log = logging.getLogger("agent_client.publisher")


@dataclass
class _Chunk:
    first: int
    tx: int
    last: int = 0
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
        self.poll_interval = poll_interval
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
        self._reader: SQLiteThread | None = None
        self._wake = asyncio.Event()
        self._acked_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._layouts: dict[int, catalog.Layout] = {}
        self._layout_json: dict[int, bytes] = {}
        self._width = catalog.WidestLayout()  # used on the reader's thread only
        self._stream_ready = False
        # publishing state, reset on failure
        self._cursor = 0
        self._carry: _Chunk | None = None
        self._in_flight: deque[_InFlight] = deque()
        self._generation = link.generation  # the connection the in-flight records were sent on

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._reader = await open_connection(self.db_path)
        first, last = await self._reader.call(change_log.bounds)
        self._secret = await self._reader.call(change_log.msg_id_secret)
        self._fresh = await self._reader.call(change_log.msg_id_nonces)
        self._open_last = last
        self.acked_seq = first - 1 if first else last
        self._trimmed_seq = self.acked_seq
        self._cursor = self.acked_seq
        self._task = asyncio.create_task(self._run(), name=f"publisher-{self.agent_id}")

    def notify(self) -> None:
        """Called after every local commit: wake up and look at the log."""
        self._wake.set()

    def resynced(self, at_seq: int) -> None:
        """A resync was committed at `at_seq`: the log below it is gone. Forget what was read of it, retry now."""
        self._resync_at = at_seq
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._drop_in_flight()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()

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
        """(changes not yet acknowledged, age in seconds of the oldest of them)."""
        assert self._reader is not None
        acked = self.acked_seq
        last, oldest_at = await self._reader.call(lambda c: change_log.backlog(c, acked))
        age = (time.time() - oldest_at) if oldest_at is not None else None
        return max(0, last - acked), age

    # ----------------------------------------------------------------- main loop
    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
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

    async def _attempt(self) -> None:
        """One round: close the open group, publish what is closed, trim; a failure rewinds and sets the backoff."""
        try:
            await self._close_open_group()
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
        if js is None or not self.link.connected or self._reader is None:
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
                elif now >= self._status_check_at:
                    last = await self._reader.call(change_log.last_committed_seq)
                    due = last > self.acked_seq
                    if not due:
                        self._status_check_at = now + min(_STATUS_CHECK_S, self.status_interval)
            if not due:
                return
            generation, blocked = self.link.generation, self.blocked
            if last is None:
                last = await self._reader.call(change_log.last_committed_seq)
            record = AgentStatusRecord(
                agent_id=self.agent_id,
                epoch=self.epoch,
                last_seq=last,
                acked_seq=max(0, self.acked_seq),
                blocked=blocked,
                log_bytes=await self._reader.call(disk_space.log_bytes),
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

    async def _close_open_group(self) -> None:
        assert self._reader is not None
        if await self._reader.call(change_log.open_group_has_rows):
            await self.store.write(change_log.close_group, single_statement=True)

    async def _pump(self) -> None:
        """Publish whatever closed groups are available, keeping up to max_in_flight records unacked."""
        assert self._reader is not None
        if self._unsaved:  # a fresh id is used only once it survives a crash
            nonces = dict(self._unsaved)
            await self.store.write(lambda c: change_log.save_msg_id_nonces(c, nonces))
            for key in nonces:
                self._unsaved.pop(key, None)
        while True:
            self._collect_acks()
            if len(self._in_flight) >= self.max_in_flight:
                await self._await_head()
                continue
            limit = self.read_batch
            read = functools.partial(change_log.read_closed, cursor=self._cursor, limit=limit, width=self._width)
            rows = await self._reader.call(read)
            if not rows:
                if self._carry is not None:
                    # The last read ended exactly where its group did: nothing closed follows, so the
                    # carried part is that group's end.
                    carry, self._carry = self._carry, None
                    await self._send(self._finish(carry, final=True))
                break
            await self._load_layouts({int(r[2]) for r in rows} - {RESYNC_LAYOUT_ID})
            for record in self._pack(rows, complete=len(rows) < limit):
                await self._send(record)
            self._cursor = rows[-1][0]
            if len(rows) < limit:
                break
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
        if self._probe:
            fut = await self._send_probe(js, record, mid)
        else:
            fut = await js.publish_async(self.subject, payload, headers={"Nats-Msg-Id": mid})
            fut.add_done_callback(lambda _f: self._wake.set())
        self._in_flight.append(_InFlight(first, last, mid, fut, time.monotonic() + self.ack_timeout))

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
                advanced = True
        finally:
            if advanced:  # also when a later head failed: waiters see what was acknowledged before it
                self.last_publish_at = time.time()
                self.last_error = None
                self._progress()
                self._acked_event.set()

    async def _maybe_trim(self) -> None:
        acked = self.acked_seq
        if acked <= self._trimmed_seq:
            return
        if acked - self._trimmed_seq < 2000 and time.monotonic() - self._last_trim < 0.25:
            return
        await self.store.write(lambda c: change_log.trim(c, acked), single_statement=True)
        if any(last <= acked for _first, last in self._fresh):
            await self.store.write(lambda c: change_log.forget_msg_id_nonces(c, acked), single_statement=True)
            self._fresh = {key: nonce for key, nonce in self._fresh.items() if key[1] > acked}
        self._trimmed_seq = acked
        self._last_trim = time.monotonic()
        self._check_space = True

    async def _maybe_reclaim(self) -> None:
        """Once everything sent is acknowledged, give the pages a large trim freed back (a bounded step a round)."""
        if not self._check_space or self._in_flight or self._carry is not None:
            return
        assert self._reader is not None
        space = await self._reader.call(disk_space.space)
        if not space.reclaimable:
            self._check_space = False
            return
        left = await self.store.write(disk_space.reclaim)
        log.debug("agent %s: gave free pages back (%d of %d left)", self.agent_id, left, space.free_pages)

    # ----------------------------------------------------------------- packing
    async def _load_layouts(self, ids: set[int]) -> None:
        assert self._reader is not None
        missing = ids - self._layouts.keys()
        if missing:
            loaded = await self._reader.call(lambda c: catalog.load_layouts(c, missing))
            self._layouts.update(loaded)
            for lid, layout in loaded.items():
                self._layout_json[lid] = layout_json(
                    table=layout.table,
                    columns=layout.columns,
                    types=layout.types,
                    pk=layout.pk,
                    sql=layout.sql,
                    visibility=layout.visibility,
                )

    def _pack(self, rows: list[change_log.LogRow], *, complete: bool) -> list[_Record]:
        """Cut rows into records; a trailing open chunk is carried to the next read unless complete."""
        out: list[_Record] = []
        chunk = self._carry
        for row in rows:
            seq, tx, layout_id, op, at = row[0], row[1], row[2], row[3], row[4]
            if chunk is not None and seq != chunk.last + 1:
                # Only a resync deletes log rows that were not acknowledged: what was read of them is void.
                raise PublishFailed(f"changes after {chunk.last} left the log (a resync superseded them); rewinding")
            if op == "V" or op == "R":
                values = row[5:6]
            else:
                layout = self._layouts[layout_id]
                if op == "U":
                    values = row[5 : 5 + len(layout.columns)]
                elif op == "D":
                    values = row[5 : 5 + len(layout.pk)]
                else:
                    values = ()
            part = change_json(seq, op, layout_id, values)
            if chunk is not None and (
                tx != chunk.tx
                or chunk.size + len(part) + 1 > self.max_record_bytes
                or len(chunk.parts) >= self.max_record_changes
            ):
                out.append(self._finish(chunk, final=tx != chunk.tx))
                chunk = None
            if chunk is None:
                chunk = _Chunk(first=seq, tx=tx)
            chunk.parts.append(part)
            chunk.size += len(part) + 1
            chunk.last = seq
            if layout_id != RESYNC_LAYOUT_ID:
                chunk.layouts.add(layout_id)
            chunk.committed_at = at
        if chunk is not None and complete:
            out.append(self._finish(chunk, final=True))
            chunk = None
        self._carry = chunk
        return out

    def _finish(self, chunk: _Chunk, *, final: bool) -> _Record:
        payload = change_record_bytes(
            agent_id=self.agent_id,
            epoch=self.epoch,
            first_seq=chunk.first,
            last_seq=chunk.last,
            final=final,
            committed_at=chunk.committed_at,
            layouts_json={lid: self._layout_json[lid] for lid in chunk.layouts},
            changes_json=chunk.parts,
        )
        tables = tuple(sorted({self._layouts[lid].table for lid in chunk.layouts}))
        return _Record(chunk.first, chunk.last, payload, tables)
