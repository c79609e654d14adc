"""Live change feeds: the reads behind `GET /relay/changes`, and live subscribers that wait for free.

Every agent's central file carries its feed log (feed_log.py). This module
reads it for the relay API and turns what it reads into feed messages (the
wire format of agent_client/change_feed.py, written with orjson straight from
the log's wire values: no decode/encode round trip):

- `FeedHub.snapshot` (a table's rows and the offset they were read at) and
  `FeedHub.catch_up` (the units after an offset) run on the hub's reader
  threads, each on a read-only connection of its own, never on the event loop.
- A live subscriber is a `FeedCursor`. An idle one is a coroutine awaiting an
  `asyncio.Event`: no thread, no SQLite connection, no timer beyond its own
  wait. The hub keeps one entry per agent with live subscribers; after every
  commit of that agent (`committed`, called by the consumer) the entry reads
  the new units ONCE (all tables, on a reader thread, on one read-only
  connection kept while the agent has subscribers), keeps the recent ones in
  memory and wakes its subscribers, which take their table's units from
  there (the messages of a unit are encoded once per table, whoever reads
  them). A subscriber that fell behind what the entry keeps catches up with a
  read of its own, as a new subscriber does.

A unit (one agent transaction) is always delivered whole. A unit that changed
the table's schema ends a subscriber's feed with must-refetch, after the
units before it; an offset that cannot be continued (`FeedGone`: another feed
of the agent, trimmed, unknown) does too.

`end_streams` (the service stops) wakes every live subscriber with
`FeedClosed`, so open streams end and the HTTP server can shut down.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import sqlite3
from collections.abc import AsyncGenerator, Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from agent_client import FeedOffset, FeedProtocolError, encode_feed_message, is_valid_agent_id

from . import feed_log
from .errors import (
    BadRequest,
    FeedUnavailable,
    InvalidAgent,
    InvalidOffset,
    ReplicatorError,
    TableNotVisible,
    TooManySubscribers,
    UnknownAgent,
    UnknownTable,
)
from .feed_log import FeedGone, FeedUnit
from .store_view import AgentView, StoreView

log = logging.getLogger("replicator.feed")
_T = TypeVar("_T")

#: Reader threads of the hub (catch-up reads, snapshots and the live reads of agents with subscribers).
FEED_THREADS = 4
#: Snapshots read and encoded at once (each is held whole in memory while built: about 3x the table's size).
SNAPSHOTS_AT_ONCE = 2
#: Changes one batch holds at most (whole units: the unit that reaches it is the batch's last).
BATCH_MAX_CHANGES = 5000
#: Units one read returns at most, and their log bytes (a unit is never split: at least one comes).
READ_MAX_UNITS = 1000
READ_MAX_BYTES = 4 << 20
#: What an agent's entry keeps of the units it read (every table), for subscribers a little behind.
BUFFER_UNITS = 2048
BUFFER_CHANGES = 100_000
#: Reads one refresh of an entry makes at most before it lets its subscribers have what it has.
REFRESH_READS = 16
#: Catch-up reads that found nothing of the table before a read gives back what it reached.
CATCH_UP_READS = 64
#: Bytes of SSE events sent in one write while streaming a snapshot.
SSE_CHUNK_BYTES = 64 << 10
#: A live read of at most this many log rows and body bytes runs on the event loop (else on a reader thread).
LOOP_READ_ROWS = 32
LOOP_READ_BYTES = 64 << 10
#: How long closing waits for the live reads in flight.
CLOSE_WAIT_S = 10.0
#: A reader waits this long for a lock of the central file (the apply thread checkpoints it).
BUSY_TIMEOUT_S = 5.0


class FeedClosed(Exception):
    """The hub is closing (the service stops): live subscribers end."""


@dataclass(frozen=True)
class FeedBatch:
    """Whole units of one table, as encoded change messages, in commit order."""

    units: list[tuple[str, list[bytes]]]  # per unit: its offset, its change messages (the last one has `last`)
    offset: FeedOffset  # the position after them (the subscriber continues from here)
    complete: bool  # everything known up to `offset` was read: an up-to-date may follow
    refetch: str | None = None  # after the units: the table's schema changed, the subscriber must refetch

    @property
    def empty(self) -> bool:
        return not self.units and self.refetch is None

    @property
    def messages(self) -> list[bytes]:
        return [m for _offset, messages in self.units for m in messages]


@dataclass(frozen=True)
class FeedSnapshot:
    """A table as it is at `offset`, framed for the answer: its schema message, its rows as insert messages
    (the last one with `last`), then up-to-date; one JSON array, or SSE events in chunks."""

    offset: FeedOffset
    rows: int
    chunks: list[bytes]


@dataclass
class FeedStats:
    """What the hub did since the service started (for /metrics and /health)."""

    snapshots: int = 0
    catch_up_reads: int = 0
    live_reads: int = 0
    loop_reads: int = 0  # of which small enough to run on the event loop
    units_delivered: int = 0
    must_refetch: int = 0
    refused: int = 0  # subscribers refused at the cap


def change_message(op: str, table: str, key: Any, row: Any, offset: str, last: bool) -> bytes:
    """One change message, exactly as `encode_feed_message` writes it, from wire values."""
    return orjson.dumps({"op": op, "table": table, "key": key, "row": row, "offset": offset, "last": last})


def _sse(kind: bytes, body: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event, framed as agent_client's `sse_event` frames it."""
    out = b"event: " + kind + b"\ndata: " + body + b"\n"
    if event_id is not None:
        out += b"id: " + event_id.encode("ascii") + b"\n"
    return out + b"\n"


def _up_to_date(offset: FeedOffset) -> bytes:
    return orjson.dumps({"control": "up-to-date", "offset": str(offset)})


def _must_refetch(reason: str) -> bytes:
    return orjson.dumps({"control": "must-refetch", "reason": reason})


def _unit_messages(unit: FeedUnit, feed_id: str, table: str) -> list[bytes] | None:
    """The unit's changes of `table` as messages ([] when it has none); None when it changed the table's schema."""
    if table in unit.schema_changed:
        return None
    mine = [c for c in unit.changes if c.table == table]
    offset = f"{feed_id}_{unit.n}"
    last = len(mine) - 1
    return [change_message(c.op, table, c.key, c.row, offset, i == last) for i, c in enumerate(mine)]


def _schema_reason(table: str) -> str:
    return f"the schema of table {table!r} changed"


def _collect(
    units: Iterable[FeedUnit],
    after: FeedOffset,
    table: str,
    end: FeedOffset,
    complete: bool,
    max_units: int,
    encode: Callable[[FeedUnit], list[bytes] | None] | None = None,
) -> FeedBatch:
    """The messages of `table` in `units` (those after `after`, read up to `end`): at most `max_units` units
    with some, and no unit past the one that reaches `BATCH_MAX_CHANGES` changes (live batches are encoded on
    the event loop: a burst of large transactions goes out in several batches, the loop turning between them).
    A unit that changed the table's schema ends the batch before it, with a must-refetch reason.
    """
    feed_id = end.feed_id
    out: list[tuple[str, list[bytes]]] = []
    position = after
    messages = 0
    for unit in units:
        found = encode(unit) if encode is not None else _unit_messages(unit, feed_id, table)
        if found is None:
            return FeedBatch(out, position, False, _schema_reason(table))
        position = FeedOffset(feed_id, unit.n)
        if not found:
            continue
        out.append((str(position), found))
        messages += len(found)
        if len(out) >= max_units or messages >= BATCH_MAX_CHANGES:
            return FeedBatch(out, position, False)
    return FeedBatch(out, end, complete)


# ---------------------------------------------------------------------- reads on a reader thread
def _connect(path: Path) -> sqlite3.Connection:
    if not path.exists():
        raise FeedUnavailable(f"the central file {path.name} is not there (the agent's copy is being replaced?)")
    return sqlite3.connect(
        f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None
    )


def _catch_up(path: Path, after: FeedOffset, table: str, max_units: int) -> tuple[FeedBatch, bool]:
    """Units of `table` after `after` (the batch, and whether it reached the head). Raises FeedGone."""
    conn = _connect(path)
    try:
        position = after
        for _attempt in range(CATCH_UP_READS):
            read = feed_log.read_after(conn, position, table=table, max_units=max_units, max_bytes=READ_MAX_BYTES)
            batch = _collect(read.units, position, table, read.head, read.caught_up, max_units)
            if not batch.empty or read.caught_up or read.head == position:
                return batch, read.caught_up and batch.complete
            position = read.head  # only other tables' units so far (or none of this table's): read on
        return FeedBatch([], position, False), False
    finally:
        conn.close()


def _snapshot(path: Path, table: str, sse: bool) -> FeedSnapshot:
    conn = _connect(path)
    try:
        try:
            snap = feed_log.snapshot(conn, table)
        except LookupError:
            raise UnknownTable(f"table {table!r} is not in this agent's central copy") from None
        offset = FeedOffset.parse(snap.schema.offset)
        rows = list(snap.rows)
    finally:
        conn.close()
    text = str(offset)
    last = len(rows) - 1
    messages = [change_message("insert", table, key, row, text, i == last) for i, (key, row) in enumerate(rows)]
    schema, done = encode_feed_message(snap.schema), _up_to_date(offset)
    if not sse:
        return FeedSnapshot(offset, len(rows), [b"[" + b",".join([schema, *messages, done]) + b"]"])
    chunks: list[bytes] = []
    chunk = [_sse(b"control", schema)]
    size = 0
    for i, message in enumerate(messages):
        event = _sse(b"change", message, text if i == last else None)
        chunk.append(event)
        size += len(event)
        if size >= SSE_CHUNK_BYTES:
            chunks.append(b"".join(chunk))
            chunk, size = [], 0
    chunk.append(_sse(b"control", done, text))
    chunks.append(b"".join(chunk))
    return FeedSnapshot(offset, len(rows), chunks)


def _small_read(conn: sqlite3.Connection, after: FeedOffset | None, view: AgentView | None) -> _LiveRead | None:
    """The live read right on the event loop when it is small (the common case: one commit of a few rows): no
    thread hop, no wait for the GIL. None when it is not small, or would wait for a lock: read on a thread."""
    if after is None or view is None or view.feed_id != after.feed_id:
        return None
    if not 0 < view.feed_n - after.n <= LOOP_READ_ROWS:
        return None
    try:
        conn.execute("PRAGMA busy_timeout = 0")
        try:
            conn.execute("BEGIN")  # the size checked is the size read (read_after reads in this transaction)
            try:
                # `length()` of a BLOB reads no content: the size of what is new, before reading it.
                rows, size = conn.execute(
                    "SELECT count(*), total(length(body)) FROM _cr_feed WHERE n > ?", (after.n,)
                ).fetchone()
                if rows > LOOP_READ_ROWS or size > LOOP_READ_BYTES:
                    return None
                read = feed_log.read_after(conn, after, table=None, max_units=READ_MAX_UNITS, max_bytes=READ_MAX_BYTES)
            finally:
                conn.execute("COMMIT")
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    except (sqlite3.Error, FeedGone, LookupError):
        return None  # a lock, another feed, a file being replaced: the thread's read tells which
    return _LiveRead(conn, view.file_id, False, read.units, read.head)


@dataclass(frozen=True)
class _LiveRead:
    conn: sqlite3.Connection
    file_id: tuple[int, int] | None
    reset: bool  # a new feed (or the entry's position could not be continued): start over at `head`
    units: list[FeedUnit]
    head: FeedOffset


def _live_read(
    conn: sqlite3.Connection | None, path: Path, file_id: tuple[int, int] | None, after: FeedOffset | None
) -> _LiveRead:
    """An entry's read: every table's units after `after` on its kept connection (opened here when None)."""
    if conn is None:
        conn = _connect(path)
    try:
        if after is not None:
            try:
                read = feed_log.read_after(conn, after, table=None, max_units=READ_MAX_UNITS, max_bytes=READ_MAX_BYTES)
            except FeedGone:
                pass
            else:
                return _LiveRead(conn, file_id, False, read.units, read.head)
        return _LiveRead(conn, file_id, True, [], feed_log.head(conn))
    except BaseException:
        conn.close()
        raise


# ---------------------------------------------------------------------- one agent's live subscribers
class _Signal(asyncio.Event):
    """What a table's subscribers wait on; `quiet_until`: when set by new units, the position before them (the
    subscribers had nothing of their table up to there)."""

    quiet_until: FeedOffset | None = None


@dataclass(eq=False)
class _AgentFeed:
    agent_id: str
    cursors: int = 0
    conn: sqlite3.Connection | None = None
    file_id: tuple[int, int] | None = None
    head: FeedOffset | None = None  # where the entry has read to
    start: FeedOffset | None = None  # it keeps every unit after `start` up to `head`
    units: list[FeedUnit] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)  # units' n, for bisect
    changes: int = 0
    encoded: dict[tuple[int, str], list[bytes] | None] = field(default_factory=dict)
    # Per table, what its subscribers wait on: set (and replaced) when units of that table (or a reset) come.
    events: dict[str, _Signal] = field(default_factory=dict)
    refreshing: asyncio.Task[None] | None = None
    failure: str | None = None  # the last live read's failure (subscribers then read on their own)

    def stale(self, view: AgentView | None) -> bool:
        """Whether the published view says the agent committed past what this entry read."""
        if self.head is None:
            return True
        if view is None:
            return False
        if view.file_id is not None and self.file_id is not None and view.file_id != self.file_id:
            return True
        if view.feed_id is None:
            return False
        return view.feed_id != self.head.feed_id or view.feed_n > self.head.n

    def changed(self, table: str) -> _Signal:
        """The event the table's subscribers wait on (set when something of that table comes)."""
        event = self.events.get(table)
        if event is None:
            event = self.events[table] = _Signal()
        return event

    def wake(self, tables: Iterable[str] | None = None, quiet_until: FeedOffset | None = None) -> None:
        """Wake the subscribers of `tables` (None: of every table); `quiet_until`: see _Signal."""
        for table in list(self.events) if tables is None else tables:
            event = self.events.pop(table, None)
            if event is not None:
                event.quiet_until = quiet_until
                event.set()

    def take(self, read: _LiveRead) -> None:
        """The result of a live read (on the loop)."""
        self.conn, self.file_id, self.failure = read.conn, read.file_id, None
        if read.reset:
            moved = read.head != self.head
            self.head = self.start = read.head
            self.units, self.ns, self.changes = [], [], 0
            self.encoded.clear()
            if moved:
                self.wake()
            return
        if not read.units and read.head == self.head:
            return
        touched: set[str] = set()
        before = self.head
        for unit in read.units:
            self.units.append(unit)
            self.ns.append(unit.n)
            self.changes += len(unit.changes)
            touched.update(c.table for c in unit.changes)
            touched.update(unit.schema_changed)
        self.head = read.head
        self._trim()
        self.wake(touched, before)  # subscribers of other tables sleep on (their offset moves when they next look)

    def _trim(self) -> None:
        if len(self.units) <= BUFFER_UNITS and self.changes <= BUFFER_CHANGES:
            return
        keep = len(self.units)
        kept_changes = self.changes
        while keep > 1 and (keep > BUFFER_UNITS // 2 or kept_changes > BUFFER_CHANGES // 2):
            kept_changes -= len(self.units[len(self.units) - keep].changes)
            keep -= 1
        drop = len(self.units) - keep
        dropped = self.units[:drop]
        assert self.head is not None
        self.start = FeedOffset(self.head.feed_id, dropped[-1].n)
        self.units, self.ns, self.changes = self.units[drop:], self.ns[drop:], kept_changes
        floor = self.start.n
        for key in [k for k in self.encoded if k[0] <= floor]:
            del self.encoded[key]

    def covers(self, offset: FeedOffset) -> bool:
        """Whether this entry can serve a subscriber at `offset` from memory (or by waiting)."""
        return (
            self.head is not None
            and self.start is not None
            and offset.feed_id == self.head.feed_id
            and offset.n >= self.start.n
        )

    def collect(self, offset: FeedOffset, table: str, max_units: int) -> FeedBatch:
        assert self.head is not None
        feed_id = self.head.feed_id
        first = bisect.bisect_right(self.ns, offset.n)

        def encode(unit: FeedUnit) -> list[bytes] | None:
            key = (unit.n, table)
            try:
                return self.encoded[key]
            except KeyError:
                found = self.encoded[key] = _unit_messages(unit, feed_id, table)
                return found

        return _collect(self.units[first:], offset, table, self.head, True, max_units, encode)

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class FeedCursor:
    """One live subscriber of one agent's table, from `offset` on. Use as a context manager (it holds a place
    under the hub's subscriber cap until closed)."""

    def __init__(self, hub: FeedHub, entry: _AgentFeed, table: str, offset: FeedOffset) -> None:
        self._hub = hub
        self._entry = entry
        self.table = table
        self.offset = offset
        self._closed = False

    @property
    def agent_id(self) -> str:
        return self._entry.agent_id

    async def next(self, timeout: float, *, max_units: int = READ_MAX_UNITS) -> FeedBatch | None:
        """The table's next whole units after `offset` (and `offset` moves past them), or None when `timeout`
        passes first (`offset` may still have moved, past other tables' units).

        Raises FeedGone (the offset cannot be continued: must refetch) and FeedClosed (the hub is closing).
        """
        hub, entry = self._hub, self._entry
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            hub.check_open()
            event = entry.changed(self.table)  # before anything that awaits: a wake-up in between is not missed
            if not (entry.covers(self.offset) and entry.failure is None and self._behind()):
                await hub.fresh(entry)  # nothing in memory for it yet: see whether the agent committed more
                hub.check_open()
            if entry.covers(self.offset) and entry.failure is None:
                assert entry.head is not None
                if self.offset.n >= entry.head.n:
                    if not await self._wait(event, deadline):
                        return None
                    continue
                batch = entry.collect(self.offset, self.table, max_units)
            else:  # behind what the entry keeps, on another feed, or the entry cannot read: a read of its own
                batch, caught_up = await hub.catch_up(self.agent_id, self.offset, self.table, max_units=max_units)
                if batch.empty and caught_up:
                    self.offset = batch.offset
                    if not await self._wait(event, deadline):
                        return None
                    continue
            self.offset = batch.offset
            if not batch.empty:
                hub.stats.units_delivered += len(batch.units)
                return batch

    def _behind(self) -> bool:
        head = self._entry.head
        return head is not None and self.offset.n < head.n

    def _skip_to(self, position: FeedOffset | None) -> None:
        if position is not None and position.feed_id == self.offset.feed_id and position.n > self.offset.n:
            self.offset = position

    async def _wait(self, event: _Signal, deadline: float) -> bool:
        """Wait for the table's event (captured before this subscriber last looked at the entry); False at the
        deadline.

        Whatever the entry read after that look and that did not set the event held nothing of this table, so
        the offset moves past it (to the entry's head after a quiet wait, to just before the new units when they
        woke it): a subscriber of a quiet table on a busy agent never falls behind the feed log's retention.
        """
        remaining = deadline - asyncio.get_running_loop().time()
        woke = False
        if remaining > 0:
            try:
                async with asyncio.timeout(remaining):  # no extra task (wait_for makes one on 3.11): a prompter wake
                    await event.wait()
                woke = True
            except TimeoutError:
                woke = event.is_set()
        self._hub.check_open()
        entry = self._entry
        if entry.failure is None:
            self._skip_to(event.quiet_until if woke else entry.head)
        return woke

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._hub.detach(self._entry)

    def __enter__(self) -> FeedCursor:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class FeedHub:
    """Feed reads and live subscribers of every agent (one hub per service)."""

    def __init__(
        self,
        view: Callable[[], StoreView],
        path_for: Callable[[str], Path],
        *,
        max_subscribers: int = 600,
        threads: int = FEED_THREADS,
    ) -> None:
        self._view = view
        self._path_for = path_for
        self.max_subscribers = max_subscribers
        self.subscribers = 0  # places taken under the cap (SSE streams and live long-polls)
        self.stats = FeedStats()
        self._agents: dict[str, _AgentFeed] = {}
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="feed")
        # Bounds the memory of snapshots being built, and leaves reader threads for live and catch-up reads.
        self._snapshots = asyncio.Semaphore(SNAPSHOTS_AT_ONCE)
        self._closed = False

    # ------------------------------------------------------------------ reads
    async def _on_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        self.check_open()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except RuntimeError as exc:  # the executor shut down under us
            if self._closed:
                raise FeedClosed("the feed hub is closed") from None
            raise FeedUnavailable(f"feed read failed: {exc}") from None
        except sqlite3.Error as exc:
            raise FeedUnavailable(f"feed read failed: {exc}") from None
        except LookupError as exc:  # the file has no feed (yet): never opened by this version of the replicator
            raise FeedUnavailable(f"no change feed: {exc}") from None

    async def snapshot(self, agent_id: str, table: str, *, sse: bool = False) -> FeedSnapshot:
        """The table's rows and the offset they were read at (one read transaction), framed as a JSON array or
        as SSE events; read and encoded on a reader thread."""
        self.stats.snapshots += 1
        async with self._snapshots:
            return await self._on_thread(_snapshot, self._path_for(agent_id), table, sse)

    async def catch_up(
        self, agent_id: str, after: FeedOffset, table: str, *, max_units: int = READ_MAX_UNITS
    ) -> tuple[FeedBatch, bool]:
        """The table's units after `after` (bounded), and whether they reach the head. Raises FeedGone."""
        self.stats.catch_up_reads += 1
        try:
            return await self._on_thread(_catch_up, self._path_for(agent_id), after, table, max_units)
        except FeedGone:
            self.stats.must_refetch += 1
            raise

    # ------------------------------------------------------------------ live subscribers
    def check_open(self) -> None:
        if self._closed:
            raise FeedClosed("the replicator is stopping")

    def admit(self) -> None:
        """Take a place under the subscriber cap (release it with `release`)."""
        self.check_open()
        if self.subscribers >= self.max_subscribers:
            self.stats.refused += 1
            raise TooManySubscribers(
                f"{self.subscribers} live feed subscribers already (--feed-max-subscribers); retry later"
            )
        self.subscribers += 1

    def release(self) -> None:
        self.subscribers = max(0, self.subscribers - 1)

    def subscribe(self, agent_id: str, table: str, offset: FeedOffset) -> FeedCursor:
        """A live cursor on the agent's table from `offset` (the caller holds a place: `admit`)."""
        self.check_open()
        entry = self._agents.get(agent_id)
        if entry is None:
            entry = self._agents[agent_id] = _AgentFeed(agent_id)
        entry.cursors += 1
        return FeedCursor(self, entry, table, offset)

    def detach(self, entry: _AgentFeed) -> None:
        entry.cursors -= 1
        if entry.cursors <= 0 and (entry.refreshing is None or entry.refreshing.done()):
            self._forget(entry)

    def _forget(self, entry: _AgentFeed) -> None:
        if self._agents.get(entry.agent_id) is entry:
            del self._agents[entry.agent_id]
        entry.close()

    def committed(self, agents: Collection[str]) -> None:
        """The consumer committed these agents' batches (on the event loop): refresh the ones with
        subscribers. Cheap for agents without any."""
        if self._closed:
            return
        for agent in agents:
            entry = self._agents.get(agent)
            if entry is not None and (entry.refreshing is None or entry.refreshing.done()):
                entry.refreshing = asyncio.get_running_loop().create_task(
                    self._refresh(entry), name=f"feed-refresh-{agent}"
                )

    async def fresh(self, entry: _AgentFeed) -> None:
        """Bring the entry up to what the published view says was committed (one refresh at a time). After a
        failed live read only the next commit tries again (`committed`): its subscribers read on their own."""
        if entry.failure is not None or not entry.stale(self._view().agent(entry.agent_id)):
            return
        if entry.refreshing is None or entry.refreshing.done():
            entry.refreshing = asyncio.get_running_loop().create_task(
                self._refresh(entry), name=f"feed-refresh-{entry.agent_id}"
            )
        await asyncio.shield(entry.refreshing)

    async def _refresh(self, entry: _AgentFeed) -> None:
        try:
            for _read in range(REFRESH_READS):
                if self._closed or entry.cursors <= 0:
                    return
                view = self._view().agent(entry.agent_id)
                if not entry.stale(view):
                    return
                file_id = view.file_id if view is not None else None
                conn = entry.conn
                if file_id is not None and entry.file_id is not None and file_id != entry.file_id:
                    entry.close()  # the central file was replaced: the kept connection reads the old one
                    entry.head = entry.start = None
                    conn = None
                before = entry.head
                self.stats.live_reads += 1
                read = _small_read(conn, entry.head, view) if conn is not None else None
                if read is None:
                    read = await self._on_thread(_live_read, conn, self._path_for(entry.agent_id), file_id, entry.head)
                else:
                    self.stats.loop_reads += 1
                entry.take(read)
                if entry.head == before and not read.units:
                    return  # no progress (the view is ahead of nothing this connection sees): do not spin
        except FeedClosed:
            return
        except Exception as exc:  # never leave subscribers hanging: they read on their own until this works again
            entry.failure = f"{type(exc).__name__}: {exc}"
            log.warning("feed of agent %s: live read failed: %s", entry.agent_id, entry.failure)
            entry.close()
            entry.wake()
        finally:
            if entry.cursors <= 0 or self._closed:
                self._forget(entry)

    # ------------------------------------------------------------------ shutdown
    def end_streams(self) -> None:
        """End every live subscriber now (the service stops; the HTTP server waits for open responses)."""
        if self._closed:
            return
        self._closed = True
        for entry in list(self._agents.values()):
            entry.wake()

    async def close(self) -> None:
        """End the streams, wait for reads in flight, close the kept connections."""
        self.end_streams()
        tasks = [e.refreshing for e in self._agents.values() if e.refreshing is not None and not e.refreshing.done()]
        if tasks:  # each stops after the read in hand (bounded); cancelled only if that takes far too long
            _done, late = await asyncio.wait(tasks, timeout=CLOSE_WAIT_S)
            for task in late:
                task.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        for entry in list(self._agents.values()):
            entry.close()
        self._agents.clear()

    # ------------------------------------------------------------------ status
    def figures(self) -> dict[str, Any]:
        """For /health and /metrics."""
        return {
            "subscribers": self.subscribers,
            "max_subscribers": self.max_subscribers,
            "agents_followed": len(self._agents),
            "snapshots": self.stats.snapshots,
            "catch_up_reads": self.stats.catch_up_reads,
            "live_reads": self.stats.live_reads,
            "loop_reads": self.stats.loop_reads,
            "units_delivered": self.stats.units_delivered,
            "must_refetch": self.stats.must_refetch,
            "refused": self.stats.refused,
        }


# ---------------------------------------------------------------------- HTTP answers of GET /relay/changes
#: Long-poll wait without `timeout_ms`, and the most a request may ask for.
DEFAULT_WAIT_MS = 20_000
MAX_WAIT_MS = 60_000
#: An open SSE stream with nothing to say sends a comment (or an up-to-date, when its offset moved) this often.
KEEP_ALIVE_S = 15.0
_KEEP_ALIVE = b": keep-alive\n\n"
_TRUE = frozenset(("true", "1", "yes"))
_FALSE = frozenset(("false", "0", "no", ""))


@dataclass(frozen=True)
class FeedRequest:
    """A checked `GET /relay/changes` request."""

    agent_id: str
    table: str
    offset: FeedOffset | None  # None: start with a snapshot
    live: bool
    wait_s: float  # long-poll wait (JSON mode)
    sse: bool


def parse_request(
    view: StoreView,
    *,
    agent: str | None,
    table: str | None,
    offset: str | None,
    live: str | None,
    timeout_ms: str | None,
    last_event_id: str | None,
    accept: str | None,
) -> FeedRequest:
    """Check the parameters against the published view; raise the API's named errors."""
    if not agent or not is_valid_agent_id(agent):
        raise InvalidAgent(f"invalid agent id {(agent or '')[:80]!r} (give ?agent=<agent id>)")
    if not table:
        raise BadRequest("give the table: ?table=<table>")
    if offset is None and last_event_id and last_event_id.strip():
        offset = last_event_id.strip()
    position: FeedOffset | None = None
    if offset is not None:
        try:
            position = FeedOffset.parse(offset)
        except FeedProtocolError as exc:
            raise InvalidOffset(str(exc)) from None
    flag = (live or "").strip().lower()
    if flag not in _TRUE and flag not in _FALSE:
        raise BadRequest(f"live must be true or false, not {live[:20]!r}" if live else "live must be true or false")
    wait_ms = DEFAULT_WAIT_MS
    if timeout_ms is not None:
        try:
            wait_ms = int(timeout_ms)
        except ValueError:
            raise BadRequest(f"timeout_ms must be a whole number of milliseconds, not {timeout_ms[:20]!r}") from None
        if not 0 <= wait_ms <= MAX_WAIT_MS:
            raise BadRequest(f"timeout_ms must be between 0 and {MAX_WAIT_MS}")
    found = view.agent(agent)
    if found is None:
        raise UnknownAgent(f"no data from agent {agent!r} yet")
    meta = found.tables.get(table)
    if meta is None or table.startswith("_cr_"):
        raise UnknownTable(f"agent {agent!r} has no table {table[:80]!r} at the HTPC (private, or never written)")
    if meta.visibility != "always":
        raise TableNotVisible(
            f"table {table!r} of agent {agent!r} is {meta.visibility}: its rows stay with the agent, "
            "so it has no change feed"
        )
    sse = "text/event-stream" in (accept or "").lower()
    return FeedRequest(agent, table, position, flag in _TRUE, wait_ms / 1000, sse)


def _sse_units(batch: FeedBatch) -> bytes:
    out: list[bytes] = []
    for offset, messages in batch.units:
        last = len(messages) - 1
        out.extend(_sse(b"change", m, offset if i == last else None) for i, m in enumerate(messages))
    return b"".join(out)


def _json(messages: Iterable[bytes], status: int = 200) -> Response:
    return Response(b"[" + b",".join(messages) + b"]", status_code=status, media_type="application/json")


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _EventStream(StreamingResponse):
    """An SSE response that gives its place under the subscriber cap back however it ends."""

    def __init__(self, events: AsyncGenerator[bytes, None], release: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._events = events
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
            with contextlib.suppress(Exception):
                await self._events.aclose()


async def feed_response(hub: FeedHub, req: FeedRequest) -> Response:
    """The answer to a checked request: JSON (long-poll when live) or an SSE stream."""
    try:
        return await _answer(hub, req)
    except FeedClosed:
        raise FeedUnavailable("the replicator is stopping; retry in a moment") from None


async def _answer(hub: FeedHub, req: FeedRequest) -> Response:
    if req.sse:
        hub.admit()  # before the 200: a refused stream gets a real 503
        return _EventStream(_events(hub, req), hub.release)
    if req.offset is None:
        snap = await hub.snapshot(req.agent_id, req.table)
        return Response(snap.chunks[0], media_type="application/json")
    try:
        batch, caught_up = await hub.catch_up(req.agent_id, req.offset, req.table)
        if batch.empty and caught_up and req.live and req.wait_s > 0:
            return await _long_poll(hub, req, batch.offset)
    except FeedGone as exc:
        return _json([_must_refetch(str(exc))], status=409)
    return _json_batch(hub, batch, caught_up)


def _json_batch(hub: FeedHub, batch: FeedBatch, caught_up: bool) -> Response:
    if batch.refetch is not None and not batch.units:
        hub.stats.must_refetch += 1
        return _json([_must_refetch(batch.refetch)], status=409)
    messages = batch.messages  # a schema change after them: the next request gets its must-refetch
    if batch.refetch is None and (caught_up or not batch.units):
        # Caught up; or only other tables' units were read so far: say where to go on from.
        messages.append(_up_to_date(batch.offset))
    return _json(messages)


async def _long_poll(hub: FeedHub, req: FeedRequest, offset: FeedOffset) -> Response:
    hub.admit()
    try:
        with hub.subscribe(req.agent_id, req.table, offset) as cursor:
            try:
                batch = await cursor.next(req.wait_s)
            except FeedClosed:
                batch = None
            if batch is None:
                return _json([_up_to_date(cursor.offset)])
            return _json_batch(hub, batch, batch.complete)
    finally:
        hub.release()


async def _events(hub: FeedHub, req: FeedRequest) -> AsyncGenerator[bytes, None]:
    """The SSE stream: snapshot or catch-up, up-to-date, then (live) each new batch and its up-to-date."""
    try:
        if req.offset is None:
            snap = await hub.snapshot(req.agent_id, req.table, sse=True)
            position = snap.offset
            chunks = snap.chunks
            del snap
            chunks.reverse()
            while chunks:  # each chunk is let go once sent: a live stream does not keep its snapshot
                yield chunks.pop()
        else:
            position = req.offset
            while True:
                batch, caught_up = await hub.catch_up(req.agent_id, position, req.table)
                if batch.units:
                    yield _sse_units(batch)
                position = batch.offset
                if batch.refetch is not None:
                    hub.stats.must_refetch += 1
                    yield _sse(b"control", _must_refetch(batch.refetch))
                    return
                if caught_up:
                    break
            yield _sse(b"control", _up_to_date(position), str(position))
        if not req.live:
            return
        with hub.subscribe(req.agent_id, req.table, position) as cursor:
            said = position
            while True:
                found = await cursor.next(KEEP_ALIVE_S)
                if found is None:
                    if cursor.offset != said:  # moved past other tables' units: say where it is
                        said = cursor.offset
                        yield _sse(b"control", _up_to_date(said), str(said))
                    else:
                        yield _KEEP_ALIVE
                    continue
                # One chunk per batch: each goes through the whole ASGI send chain (most of a fan-out's cost).
                chunk = _sse_units(found) if found.units else b""
                if found.refetch is not None:
                    hub.stats.must_refetch += 1
                    yield chunk + _sse(b"control", _must_refetch(found.refetch))
                    return
                if found.complete:
                    said = found.offset
                    chunk += _sse(b"control", _up_to_date(said), str(said))
                if chunk:
                    yield chunk
    except FeedGone as exc:
        yield _sse(b"control", _must_refetch(str(exc)))
    except FeedClosed:
        return
    except ReplicatorError as exc:  # after the 200: the stream just ends (the client reconnects from its offset)
        log.warning("feed of %s.%s ended: %s", req.agent_id, req.table, exc)
