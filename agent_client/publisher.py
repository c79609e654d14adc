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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.js.api import PubAck

from . import catalog, change_log
from ._sqlite_thread import SQLiteThread
from .backoff import Backoff
from .change_record import change_json, change_record_bytes, layout_json, msg_id
from .local_store import LocalStore, open_connection
from .nats_link import NatsLink
from .stream import STREAM_NAME, ensure_stream
from .subjects import changes_subject

#: Room kept in a record for what is not its changes (header, layouts with their schema SQL, msg id header).
_ENVELOPE_BYTES = 16 * 1024

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

        self.acked_seq = 0
        self.last_publish_at: float | None = None
        self.last_error: str | None = None
        self.records_published = 0
        #: duplicate PubAcks believed (a resend of something this publisher may have stored before)
        self.duplicates_acked = 0
        #: duplicate PubAcks for ids this publisher never stored: someone else's message held the id
        self.msg_id_collisions = 0
        self.last_msg_id_collision: dict[str, Any] | None = None
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
        backoff = Backoff()
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()
            try:
                await self._close_open_group()
                if self.link.connected and self.link.js is not None:
                    if not self._stream_ready:
                        await ensure_stream(self.link.js)
                        self._stream_ready = True
                    await self._fit_stream_limits()
                    await self._pump()
                    backoff.reset()
                await self._maybe_trim()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # PublishFailed, NATS errors, a locked database
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.debug("publisher rewinding after: %s", self.last_error)
                self._rewind()
                await asyncio.sleep(backoff.next())

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
                    await self._send(*self._finish(carry, final=True))
                break
            await self._load_layouts({int(r[2]) for r in rows})
            for record_first, record_last, payload in self._pack(rows, complete=len(rows) < limit):
                await self._send(record_first, record_last, payload)
            self._cursor = rows[-1][0]
            if len(rows) < limit:
                break
        self._collect_acks()

    async def _send(self, first: int, last: int, payload: bytes) -> None:
        js = self.link.js
        if js is None:
            raise PublishFailed("not connected")
        if self._generation != self.link.generation:
            # Records in flight on the lost connection may never be stored: publishing later ones now
            # would put them on the stream ahead of those. Resend from the first unacknowledged change.
            raise PublishFailed("the NATS connection was lost while records were in flight")
        while len(self._in_flight) >= self.max_in_flight:
            await self._await_head()
        nonce = self._fresh.get((first, last))
        mid = msg_id(self.agent_id, self.epoch, first, last, secret=self._secret, nonce=nonce)
        fut = await js.publish_async(self.subject, payload, headers={"Nats-Msg-Id": mid})
        fut.add_done_callback(lambda _f: self._wake.set())
        self._in_flight.append(_InFlight(first, last, mid, fut, time.monotonic() + self.ack_timeout))

    async def _await_head(self) -> None:
        head = self._in_flight[0]
        remaining = head.deadline - time.monotonic()
        if not head.future.done():
            done, _ = await asyncio.wait({head.future}, timeout=max(0.0, remaining))
            if not done:
                raise PublishFailed(f"no PubAck for changes {head.first}-{head.last} within {self.ack_timeout}s")
        self._collect_acks()

    def _collect_acks(self) -> None:
        advanced = False
        now = time.monotonic()
        try:
            while self._in_flight:
                head = self._in_flight[0]
                if not head.future.done():
                    if now > head.deadline:
                        raise PublishFailed(
                            f"no PubAck for changes {head.first}-{head.last} within {self.ack_timeout}s"
                        )
                    break
                exc = head.future.exception() if not head.future.cancelled() else PublishFailed("cancelled")
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

    def _pack(self, rows: list[change_log.LogRow], *, complete: bool) -> list[tuple[int, int, bytes]]:
        """Cut rows into records; a trailing open chunk is carried to the next read unless complete."""
        out: list[tuple[int, int, bytes]] = []
        chunk = self._carry
        for row in rows:
            seq, tx, layout_id, op, at = row[0], row[1], row[2], row[3], row[4]
            layout = self._layouts[layout_id]
            if op == "U":
                values = row[5 : 5 + len(layout.columns)]
            elif op == "D":
                values = row[5 : 5 + len(layout.pk)]
            elif op == "V":
                values = row[5:6]
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
            chunk.layouts.add(layout_id)
            chunk.committed_at = at
        if chunk is not None and complete:
            out.append(self._finish(chunk, final=True))
            chunk = None
        self._carry = chunk
        return out

    def _finish(self, chunk: _Chunk, *, final: bool) -> tuple[int, int, bytes]:
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
        return chunk.first, chunk.last, payload
