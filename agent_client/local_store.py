"""The agent's SQLite database: one writer connection with group commit.

All writes go through one connection, owned by a thread of its own
(`_sqlite_thread`). Concurrent callers are gathered into one transaction
(each in its own SAVEPOINT, so one caller's error never undoes another's
write) and committed together: the commit cost is shared, and a caller's
future resolves only after its data is committed. The publisher's
bookkeeping writes (closing a transaction group, trimming the log) take the
same queue, so they are never starved by a busy writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

from . import disk_space
from ._sqlite_thread import SQLiteThread
from .change_record import sqlite_text
from .errors import ConstraintViolation, LocalDatabaseError, StorageClosed, StorageFull

T = TypeVar("T")
WriteFn = Callable[[sqlite3.Connection], Any]

BUSY_TIMEOUT_MS = 5000
_MAX_GROUP = 512


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


def connect(path: Path) -> sqlite3.Connection:
    """A connection to an agent database with the agent's policy (also used by `python -m agent_client`).

    WAL, busy timeout, foreign keys, recursive triggers; TEXT that is not UTF-8 reads as `InvalidText`; a new
    database gets incremental auto-vacuum (disk_space.py).
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.text_factory = sqlite_text
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        disk_space.prepare_new(conn)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA recursive_triggers = ON")
    except BaseException:
        conn.close()
        raise
    return conn


async def open_connection(path: Path) -> SQLiteThread:
    """Open `path` (see `connect`) on a thread of its own."""
    return await SQLiteThread(lambda: connect(path), name=f"sqlite:{path.name}").open()


class LocalStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: SQLiteThread | None = None
        self._pending: list[tuple[WriteFn, bool, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._exclusive = asyncio.Lock()
        self._closed = False
        self.on_commit: Callable[[], None] | None = None

    async def open(self) -> None:
        try:
            self._conn = await open_connection(self.path)
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from exc

    @property
    def conn(self) -> SQLiteThread:
        if self._conn is None or self._closed:
            raise StorageClosed("storage is closed")
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer connection outside any group (it manages its own transaction)."""
        async with self._exclusive:
            try:
                return await self.conn.call(fn)
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from exc

    async def write(self, fn: WriteFn, *, single_statement: bool = False) -> Any:
        """Run `fn` inside a group-committed transaction; returns its result once committed.

        `single_statement`: fn makes at most one modifying statement, which SQLite
        already undoes by itself on error, so it needs no savepoint of its own.
        """
        if self._closed or self._conn is None:
            raise StorageClosed("storage is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((fn, single_statement, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        return await fut

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
        """Hold the writer for a caller-driven transaction (BEGIN IMMEDIATE ... COMMIT)."""
        async with self._exclusive:
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
        if self.on_commit is not None:
            self.on_commit()

    async def close(self) -> None:
        if self._closed:
            return
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(Exception):
                await self._flusher
        self._closed = True
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        for _, _, fut in self._pending:
            if not fut.done():
                fut.set_exception(StorageClosed("storage closed before the write ran"))
        self._pending = []


def _begin_immediate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")


def _commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


def _rollback(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")


def _run_group(conn: sqlite3.Connection, fns: list[tuple[WriteFn, bool]]) -> list[tuple[bool, Any]]:
    """One transaction for many writes; each multi-statement write in its own savepoint."""
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
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes
