"""The agent's SQLite database: one writer connection with group commit.

All writes go through one aiosqlite connection. Concurrent callers are
gathered into one transaction (each in its own SAVEPOINT, so one caller's
error never undoes another's write) and committed together: the commit cost
is shared, and a caller's future resolves only after its data is committed.
The publisher's bookkeeping writes (closing a transaction group, trimming the
log) take the same queue, so they are never starved by a busy writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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


async def open_connection(path: Path, *, read_only: bool = False) -> aiosqlite.Connection:
    if read_only:
        conn = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    else:
        conn = await aiosqlite.connect(path, isolation_level=None)
    await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if not read_only:
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA recursive_triggers = ON")
    return conn


async def call_in_thread(conn: aiosqlite.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """Run `fn(sqlite3_connection)` on the aiosqlite connection's own thread, in one hop.

    aiosqlite executes one statement per hop; a multi-statement unit (a group
    commit, a migration) must run without yielding between statements, which
    its queue-a-callable method provides.
    """
    return await conn._execute(lambda: fn(conn._conn))  # type: ignore[no-any-return,no-untyped-call]


class LocalStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: aiosqlite.Connection | None = None
        self._pending: list[tuple[WriteFn, bool, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._exclusive = asyncio.Lock()
        self._closed = False
        self.on_commit: Callable[[], None] | None = None

    async def open(self) -> None:
        try:
            self._conn = await open_connection(self.path)
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from None

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None or self._closed:
            raise StorageClosed("storage is closed")
        return self._conn

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the writer connection outside any group (it manages its own transaction)."""
        async with self._exclusive:
            try:
                return await call_in_thread(self.conn, fn)
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from None

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
                    outcomes = await call_in_thread(self.conn, lambda c: _run_group(c, fns))  # noqa: B023
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
    async def exclusive_transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Hold the writer for a caller-driven transaction (BEGIN IMMEDIATE ... COMMIT)."""
        async with self._exclusive:
            conn = self.conn
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise translate_sqlite_error(exc) from None
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise
            try:
                await conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await conn.execute("ROLLBACK")
                raise translate_sqlite_error(exc) from None
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
