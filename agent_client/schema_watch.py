"""Notices schema changes made by other processes and keeps the capture in step with them.

DDL run through agent_client re-captures in its own transaction (schema_change.py). A schema change made by
another connection (the sqlite3 shell, another program) is noticed here: SQLite bumps `PRAGMA
schema_version` on every schema change, the watch reads it every `interval` seconds (a few microseconds on the
store's event-loop connection: no thread hop, so an idle agent costs next to nothing) and,
when it moved, runs catalog.resync_schema through the writer queue: a renamed
`always` table is followed (X for the old name, S + snapshot for the new), a changed one re-captured, a
dropped one forgotten. It also runs at every open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time

from . import catalog
from ._sqlite_thread import SQLiteThread
from .errors import AgentStorageError
from .local_store import LocalStore
from .publisher import next_tick
from .schema_change import schema_version

log = logging.getLogger("agent_client.schema_watch")

#: How often the schema version is read.
SCHEMA_CHECK_INTERVAL_S = 1.0


def _resync(conn: sqlite3.Connection) -> tuple[list[str], int]:
    return catalog.resync_schema(conn), schema_version(conn)


class SchemaWatch:
    def __init__(self, store: LocalStore, reader: SQLiteThread, *, interval: float = SCHEMA_CHECK_INTERVAL_S) -> None:
        self.store = store
        self.reader = reader
        self.interval = interval
        #: schema changes noticed (and followed) since start
        self.resyncs = 0
        self.last_error: str | None = None
        self._seen: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._seen = await self._version()
        self._task = asyncio.create_task(self._run(), name="schema-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _version(self) -> int:
        """The schema version, read on the store's event-loop connection (on the reader thread if SQLite is busy
        right now, or this is not the loop's thread)."""
        with contextlib.suppress(AgentStorageError):
            done, version = self.store.try_read(schema_version)
            if done:
                assert version is not None
                return version
        return await self.reader.call(schema_version)

    async def check(self) -> list[str]:
        """Follow a schema change made since the last check (if any); returns the tables touched."""
        version = await self._version()
        if version == self._seen:
            return []
        try:
            result: tuple[list[str], int] = await self.store.write(_resync)
        except (AgentStorageError, sqlite3.Error) as exc:
            self._seen = version  # tried for this version; the next schema change tries again
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("cannot follow a schema change: %s", self.last_error)
            return []
        touched, self._seen = result
        self.last_error = None
        if touched:
            self.resyncs += 1
            log.info("schema changed outside agent_client: re-captured %s", ", ".join(touched))
        return touched

    async def _run(self) -> None:
        while True:
            # On a grid shared by every agent of the process (publisher.next_tick): one wake-up for all of them.
            await asyncio.sleep(next_tick(time.monotonic(), self.interval) - time.monotonic())
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a closed or locked database: try again next round
                log.debug("schema check failed: %r", exc)
