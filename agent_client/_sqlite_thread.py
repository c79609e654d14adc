"""One thread owning one sqlite3.Connection, driven from asyncio.

`await conn.call(fn)` runs `fn(connection)` on that thread as one unit (a
group commit, a migration, a read snapshot run without yielding between
statements) and delivers its result or exception to the caller's event loop.
The thread is the only one that ever touches the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Job = tuple[Callable[[Any], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # the caller was cancelled; the job ran anyway
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class SQLiteThread:
    """A sqlite3.Connection opened, used and closed on its own thread."""

    def __init__(self, connect: Callable[[], sqlite3.Connection], *, name: str = "sqlite") -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._closed = False

    async def open(self) -> SQLiteThread:
        """Start the thread and open the connection on it (its errors are raised here)."""
        self._thread.start()
        try:
            await self._submit(self._open)
        except BaseException:
            self._closed = True
            self._jobs.put(None)
            raise
        return self

    def _open(self, _unused: Any) -> None:
        self._conn = self._connect()

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread; returns its result or raises its exception."""
        if self._closed:
            raise ValueError("Connection closed")
        result: T = await self._submit(fn)
        return result

    async def _submit(self, fn: Callable[[Any], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return await fut

    async def close(self) -> None:
        """Close the connection (on its thread) and let the thread end. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._submit(self._close)
        finally:
            self._jobs.put(None)

    def _close(self, _unused: Any) -> None:
        if self._conn is not None:
            self._conn.close()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut, loop = job
            try:
                ok, value = True, fn(self._conn)
            except BaseException as exc:  # delivered to the caller, like any other outcome
                ok, value = False, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, fut, ok, value)
