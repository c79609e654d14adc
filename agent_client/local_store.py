"""The agent's SQLite database: small writes commit on the caller's loop, the rest through one writer thread.

A commit takes SQLite ~25 µs; handing it to a thread and back costs more than that. So a *small* write
(`write(fn, small=True)`: one row, a bounded batch, a handful of statements) runs right on the caller's
event-loop thread, on a plain sqlite3 connection opened on that thread: `BEGIN IMMEDIATE` without any busy
wait, fn, COMMIT. If the database is busy (another process, the sqlite3 shell, or our own writer thread holds
the write lock), or the caller is not on the thread that opened that connection, the write falls back to the
writer thread, which may wait for the lock (busy timeout) without blocking the loop.

Everything else goes through the writer thread (`_sqlite_thread`) with group commit: concurrent callers are
gathered into one transaction (each in its own SAVEPOINT, so one caller's error never undoes another's
write) and committed together; a caller's future resolves only after its data is committed.

Transaction groups (change_log.py): every transaction committed here ends with `CLOSE_GROUP_SQL` as its last
statement, so after any in-process commit every logged row is in a closed group and the publisher never has
to add a commit of its own. `run(fn)` is the exception: fn manages its own transaction.

Checkpoints: the loop connection never checkpoints (`wal_autocheckpoint = 0`: a checkpoint writes and syncs
the database file, far too long for the loop). Every `CHECKPOINT_EVERY` fast commits a checkpoint runs on the
writer thread (`_run_checkpoint`), so the WAL stays bounded under sustained fast writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from . import disk_space
from ._sqlite_thread import SQLiteThread
from .change_log import CLOSE_GROUP_SQL
from .change_record import sqlite_text
from .errors import ConstraintViolation, LocalDatabaseError, StorageClosed, StorageFull

log = logging.getLogger("agent_client.local_store")

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]

BUSY_TIMEOUT_MS = 5000
_MAX_GROUP = 512

#: A PASSIVE checkpoint on the writer thread after this many commits on the loop connection (a one-row commit
#: adds ~4 pages to the WAL, so this is about SQLite's own default of 1,000 pages between checkpoints).
CHECKPOINT_EVERY = 256
#: A task committing fast writes back to back lets the event loop run at least this often (seconds): the fast
#: path never awaits, so without it a write loop would starve every other task (the publisher included).
#: The write that yields waits for whatever the loop runs meanwhile (the publisher's turn: reading, packing and
#: sending what those writes logged). Measured (bench/write_speed.py, back-to-back writes, publisher running):
#: 0.2 ms -> p99 0.97 ms, 0.5 ms -> p99 0.64-0.67 ms, 2 ms -> p99 0.42 ms, at the same p50; the yielding writes
#: (about 1 in 60 at 2 ms) are the p99.9. A paced writer awaits between writes and never reaches this bound.
YIELD_EVERY_S = 0.002
#: Prepared statements kept per connection (Python's default is 128; each table x column set is one upsert).
CACHED_STATEMENTS = 256


def translate_sqlite_error(exc: BaseException) -> BaseException:
    """Map a sqlite3 exception to the named error a caller should see."""
    if not isinstance(exc, sqlite3.Error):
        return exc
    code = getattr(exc, "sqlite_errorcode", None)
    msg = str(exc)
    if code == sqlite3.SQLITE_FULL or "database or disk is full" in msg:
        return StorageFull(f"local database is full, nothing was written: {msg}")
    if isinstance(exc, sqlite3.IntegrityError):
        return ConstraintViolation(f"write rejected by the schema: {msg}")
    return LocalDatabaseError(f"local database error: {msg}")


#: The WAL file is cut back to this after a checkpoint (a drained backlog leaves no giant WAL behind).
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024


def connect(
    path: Path,
    *,
    busy_timeout_ms: int = BUSY_TIMEOUT_MS,
    autocheckpoint: bool = True,
    setup: bool = True,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """A connection to an agent database with the agent's policy (also used by `python -m agent_client`).

    WAL, busy timeout, foreign keys, recursive triggers; TEXT that is not UTF-8 reads as `InvalidText`; a new
    database gets incremental auto-vacuum (disk_space.py). `setup=False` skips what is stored in the file
    (auto-vacuum, journal mode: already done by the first connection) so that opening takes no lock;
    `autocheckpoint=False` leaves checkpoints to another connection; `check_same_thread=False` lets successive
    threads use it (one at a time: `SQLiteThread` with `idle_exit_s`). A connection used on an event loop should
    pass `busy_timeout_ms=0` (a lock held by another process must never make the loop wait).
    """
    conn = sqlite3.connect(
        path, isolation_level=None, cached_statements=CACHED_STATEMENTS, check_same_thread=check_same_thread
    )
    try:
        conn.text_factory = sqlite_text
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if setup:
            disk_space.prepare_new(conn)
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA recursive_triggers = ON")
        if not autocheckpoint:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        conn.close()
        raise
    return conn


#: A connection's thread (open_connection) ends after this long without work; the next call starts another.
IDLE_THREAD_EXIT_S = 2.0


def reader_connection(path: Path) -> SQLiteThread:
    """Like `open_connection`, but nothing (no connection, no thread) exists before the first call."""
    return SQLiteThread(
        lambda: connect(path, check_same_thread=False, setup=False),
        name=f"sqlite:{path.name}",
        idle_exit_s=IDLE_THREAD_EXIT_S,
    ).lazy_connection()


async def open_connection(path: Path) -> SQLiteThread:
    """Open `path` (see `connect`) on a thread of its own, which ends while idle (see `IDLE_THREAD_EXIT_S`)."""
    return await SQLiteThread(
        lambda: connect(path, check_same_thread=False), name=f"sqlite:{path.name}", idle_exit_s=IDLE_THREAD_EXIT_S
    ).open()


class _Busy(Exception):
    """The loop connection could not take the write lock at once: the write goes to the writer thread."""


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLite said busy or locked: another connection holds the lock (try again, or on a thread that may wait)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "database is locked" in str(exc)


class LocalStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: SQLiteThread | None = None
        self._pending: list[tuple[WriteFn, bool, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._exclusive = asyncio.Lock()
        self._solo = 0  # run() / exclusive_transaction() sections in progress: no fast write meanwhile
        self._closed = False
        self.on_commit: Callable[[], None] | None = None
        # the loop connection: opened on, and only ever used from, the thread that opened the store
        self._fast: sqlite3.Connection | None = None
        self._fast_thread = 0
        self._fast_commits = 0  # since the last checkpoint was asked for
        self._checkpoint: asyncio.Task[None] | None = None
        self._turn_pending = False  # a call_soon marker is waiting for the loop to turn
        self._turn_since = 0.0
        self._turn_loop: asyncio.AbstractEventLoop | None = None
        #: commits made on the loop connection / writes that fell back to the writer thread (busy, other thread)
        self.fast_commits = 0
        self.fallbacks = 0

    async def open(self) -> None:
        try:
            self._conn = await open_connection(self.path)
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from exc
        try:
            self._fast = connect(self.path, busy_timeout_ms=0, autocheckpoint=False, setup=False)
            self._fast_thread = threading.get_ident()
        except sqlite3.Error as exc:  # only an optimisation: every write takes the writer thread
            log.warning("no loop connection to %s (writes go through the writer thread): %s", self.path, exc)
            self._fast = None

    @property
    def conn(self) -> SQLiteThread:
        if self._conn is None or self._closed:
            raise StorageClosed("storage is closed")
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer connection outside any group (it manages its own transaction)."""
        async with self._exclusive:
            self._solo += 1
            try:
                return await self.conn.call(fn)
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from exc
            finally:
                self._solo -= 1

    async def write(self, fn: WriteFn, *, single_statement: bool = False, small: bool = False) -> Any:
        """Run `fn` inside a committed transaction; returns its result once committed.

        `small`: fn's work is bounded and short (a row, a bounded batch, a few statements): it may run on the
        caller's event-loop thread (see the module doc). Otherwise, and whenever that is not possible, fn runs
        in a group commit on the writer thread.

        `single_statement`: fn makes at most one modifying statement, which SQLite
        already undoes by itself on error, so it needs no savepoint of its own.
        """
        if self._closed or self._conn is None:
            raise StorageClosed("storage is closed")
        if small and self._fast is not None and self._solo == 0 and threading.get_ident() == self._fast_thread:
            try:
                result = self._commit_here(self._fast, fn)
            except _Busy:
                self.fallbacks += 1
            else:
                await self._after_fast_commit()
                return result
        elif small:
            self.fallbacks += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, single_statement, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return await fut

    async def close_group(self) -> None:
        """Commit a transaction that only closes the open transaction group (rows another process logged)."""
        await self.write(_nothing, single_statement=True, small=True)

    def try_read(self, fn: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """`(True, fn(conn))` on the loop connection, right now; `(False, None)` if that is not possible here
        (another thread, no loop connection, SQLite busy): the caller reads on a thread instead.

        Only for bounded reads (a point lookup, a pragma); each statement reads the newest committed data.
        """
        conn = self._fast
        if conn is None or self._closed or threading.get_ident() != self._fast_thread:
            return False, None
        try:
            return True, fn(conn)
        except sqlite3.Error as exc:
            if is_busy(exc):
                return False, None
            raise translate_sqlite_error(exc) from exc

    def _commit_here(self, conn: sqlite3.Connection, fn: WriteFn) -> Any:
        """fn in a transaction of its own on the loop connection; raises `_Busy` if the write lock is taken.

        A failure rolls everything back (a single transaction: nothing of fn stays) and raises the named error.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if is_busy(exc):
                raise _Busy from None
            raise translate_sqlite_error(exc) from exc
        try:
            result = fn(conn)
            conn.execute(CLOSE_GROUP_SQL)
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise translate_sqlite_error(exc) from exc
            raise
        return result

    async def _after_fast_commit(self) -> None:
        self.fast_commits += 1
        if self.on_commit is not None:
            self.on_commit()
        self._fast_commits += 1
        if self._fast_commits >= CHECKPOINT_EVERY and (self._checkpoint is None or self._checkpoint.done()):
            self._fast_commits = 0
            self._checkpoint = asyncio.create_task(self._run_checkpoint())
        # The fast path never awaits: let the loop turn now and then, or a write loop would starve it.
        loop = asyncio.get_running_loop()
        if not self._turn_pending or loop is not self._turn_loop:
            self._turn_pending = True
            self._turn_loop = loop
            self._turn_since = loop.time()
            loop.call_soon(self._loop_turned)
        elif loop.time() - self._turn_since >= YIELD_EVERY_S:
            await asyncio.sleep(0)

    def _loop_turned(self) -> None:
        self._turn_pending = False

    async def _run_checkpoint(self) -> None:
        """Checkpoint on the writer thread, in two PASSIVE steps, never blocking the loop.

        SQLite starts the WAL file over only when a write begins after *every* frame was copied back. A
        checkpoint running beside a steady stream of fast commits never gets there (frames keep arriving while
        it copies), and the WAL would grow without bound. So: the first step copies the bulk while writes go
        on; the second copies the few frames written meanwhile while this process's writes wait (they fall
        back to the writer queue, which runs them right after it), so the next commit starts the WAL over.
        """
        try:
            await self.conn.call(_checkpoint_passive)
            async with self._exclusive:
                self._solo += 1
                try:
                    await self.conn.call(_checkpoint_passive)
                finally:
                    self._solo -= 1
        except Exception as exc:  # the next one tries again; a closed store needs none
            # the loop connection never checkpoints: a failure that lasts (disk full, I/O) lets the WAL grow
            (log.debug if self._closed else log.warning)("checkpoint of %s failed: %r", self.path, exc)

    async def _flush_loop(self) -> None:
        while self._pending:
            async with self._exclusive:
                batch, self._pending = self._pending[:_MAX_GROUP], self._pending[_MAX_GROUP:]
                fns = [(fn, single) for fn, single, _ in batch]
                try:
                    outcomes = await self.conn.call(lambda c: _run_group(c, fns))  # noqa: B023
                except BaseException as exc:  # commit failed: nothing in the group was written
                    err = translate_sqlite_error(exc)
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
            for (_, _, fut), (ok, value) in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(translate_sqlite_error(value))
            if self.on_commit is not None:
                self.on_commit()

    @contextlib.asynccontextmanager
    async def exclusive_transaction(self) -> AsyncIterator[SQLiteThread]:
        """Hold the writer for a caller-driven transaction (BEGIN IMMEDIATE ... close group, COMMIT)."""
        async with self._exclusive:
            self._solo += 1
            try:
                conn = self.conn
                try:
                    await conn.call(_begin_immediate)
                except sqlite3.Error as exc:
                    raise translate_sqlite_error(exc) from exc
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.call(_rollback)
                    raise
                try:
                    await conn.call(_commit)
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        await conn.call(_rollback)
                    raise translate_sqlite_error(exc) from exc
            finally:
                self._solo -= 1
        if self.on_commit is not None:
            self.on_commit()

    async def close(self) -> None:
        if self._closed:
            return
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await self._flusher
        if self._checkpoint is not None and not self._checkpoint.done():
            with contextlib.suppress(Exception):
                await self._checkpoint
        self._closed = True
        if self._fast is not None:  # before the writer's: the last connection to close checkpoints, not this one
            with contextlib.suppress(Exception):
                self._fast.close()
            self._fast = None
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_exception(StorageClosed("storage closed before the write ran"))
        self._pending = []


def _nothing(conn: sqlite3.Connection) -> None:
    """A write of nothing: its transaction only closes the group (close_group)."""


def _checkpoint_passive(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()


def _begin_immediate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def _commit(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:  # raw SQL may have ended the transaction already (its COMMIT closed no group)
        conn.execute(CLOSE_GROUP_SQL)
    conn.execute("COMMIT")


def _rollback(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")


def _run_group(conn: sqlite3.Connection, fns: list[tuple[WriteFn, bool]]) -> list[tuple[bool, Any]]:
    """One transaction for many writes; each multi-statement write in its own savepoint; closes the group."""
    outcomes: list[tuple[bool, Any]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        if len(fns) == 1:
            try:
                outcomes.append((True, fns[0][0](conn)))
            except Exception as exc:
                conn.execute("ROLLBACK")
                return [(False, exc)]
        else:
            for fn, single in fns:
                if single:
                    try:
                        outcomes.append((True, fn(conn)))
                    except Exception as exc:
                        outcomes.append((False, exc))
                    continue
                conn.execute("SAVEPOINT w")
                try:
                    outcomes.append((True, fn(conn)))
                    conn.execute("RELEASE w")
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    outcomes.append((False, exc))
        conn.execute(CLOSE_GROUP_SQL)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes
