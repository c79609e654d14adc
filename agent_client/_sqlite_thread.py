"""One thread owning one sqlite3.Connection, driven from asyncio.

`await conn.call(fn)` runs `fn(connection)` on that thread as one unit (a
group commit, a migration, a read snapshot run without yielding between
statements) and delivers its result or exception to the caller's event loop.
Only that thread ever touches the connection while it runs.

`idle_exit_s`: the thread ends after that long without a job and a new one is started by the next call (the
connection must then be opened with `check_same_thread=False`; still only one thread uses it at a time). An
idle agent then holds no thread at all: hundreds of idle agents on one box cost no threads, and a busy one
pays a thread start only after a quiet spell. `lazy_connection()` goes further: neither connection nor
thread exists before the first call.
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

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], *, name: str = "sqlite", idle_exit_s: float | None = None
    ) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._lazy = False  # open the connection at the first call (lazy_connection)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._name = name
        self._idle_exit_s = idle_exit_s
        self._lock = threading.Lock()  # guards _running against a thread ending while a job arrives
        self._running = False
        self._closed = False
        #: threads started so far (1 without idle exit; one more after every idle spell with it)
        self.threads_started = 0

    async def open(self) -> SQLiteThread:
        """Start the thread and open the connection on it (its errors are raised here)."""
        try:
            await self._submit(self._open)
        except BaseException:
            self._closed = True
            self._jobs.put(None)
            raise
        return self

    def _open(self, _unused: Any) -> None:
        self._conn = self._connect()

    def lazy_connection(self) -> SQLiteThread:
        """Open nothing now: the first `call` opens the connection (and its errors go to that call)."""
        self._lazy = True
        return self

    @property
    def thread_alive(self) -> bool:
        """Whether the thread is running now (it is not while idle, with `idle_exit_s`)."""
        with self._lock:
            return self._running

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread; returns its result or raises its exception."""
        if self._closed:
            raise ValueError("Connection closed")
        result: T = await self._submit(fn)
        return result

    async def _submit(self, fn: Callable[[Any], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        with self._lock:
            self._jobs.put((fn, fut, loop))
            if not self._running:
                self._running = True
                self.threads_started += 1
                threading.Thread(target=self._serve, name=self._name, daemon=True).start()
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

    def _next_job(self) -> _Job | None:
        """The next job; None when the thread should end (closed, or idle for `idle_exit_s`)."""
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_exit_s)
            except queue.Empty:
                with self._lock:  # a job put under the lock after this check starts a new thread
                    if self._jobs.empty():
                        self._running = False
                        return None
                continue
            if job is None:  # closed: the last job. `_running` is cleared here only, under the lock, so a
                with self._lock:  # thread that ends can never clear the flag of one started after it
                    self._running = False
            return job

    def _serve(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                return
            fn, fut, loop = job
            try:
                if self._conn is None and self._lazy and fn != self._close:
                    self._conn = self._connect()
                ok, value = True, fn(self._conn)
            except BaseException as exc:  # delivered to the caller, like any other outcome
                ok, value = False, exc
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, fut, ok, value)
