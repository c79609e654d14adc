"""Follower copies: a local, read-only copy of other agents' `always` tables, fed by their change feeds.

`<data_dir>/<own_agent_id>.follow/<agent_id>.db` is one SQLite file (WAL) per followed agent. It holds the
followed tables (created from each feed's `FeedSchema`: columns, declared types, primary key) and
`_cr_follow` (one row per followed table: the declaration, the feed offset the copy is at, its row count, when
it was last up to date, the last error). The agent's reader connection ATTACHes each file read-only under the
followed agent's id, so `query_local` reads `"<agent_id>".<table>` and joins it with the agent's own tables;
nothing the agent runs can write there, and nothing there is ever captured or published (it is not the
agent's database).

One task per followed table consumes `FeedSubscription`. Every remote transaction (changes up to `last`) is
applied in ONE local transaction together with its offset, so a restart resumes exactly where the copy is;
under load, the whole transactions that arrived while the previous commit ran share the next one (the feed
is read on a second task), so the copy keeps up with a fast writer.
A snapshot (the first one, or after `MustRefetch`) is staged in `_cr_stage_<table>` in short transactions
and swapped in with the offset in one transaction: readers see the old copy until the new one is complete.
Writes run on the file's own SQLite thread (which ends while idle). While the HTPC is down the copy answers
from its last state and the task reconnects with backoff; a refusal (e.g. 403 `table_not_visible`) is retried
slowly and shown in `health()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._sqlite_thread import SQLiteThread
from .agent_id import is_valid_agent_id
from .backoff import Backoff
from .change_feed import Change, FeedProtocolError, FeedSchema, UpToDate
from .change_record import InvalidText, SQLiteValue, sqlite_text
from .errors import FeedError, FollowError
from .identifiers import is_valid_identifier, quote_identifier, safe_declared_type
from .subscription import FeedSubscription

log = logging.getLogger("agent_client.follower")

__all__ = ["MAX_FOLLOWED_AGENTS", "Followers", "attach_followed", "follow_dir"]

#: SQLite attaches at most 10 databases to one connection (MAX_ATTACHED here); one stays free.
MAX_FOLLOWED_AGENTS = 9
#: Snapshot rows staged per short transaction.
STAGE_BATCH_ROWS = 2000
#: Feed steps read ahead of the follower file's commits (bounds memory when the disk is slower than the feed).
QUEUE_OPS = 1024
#: `_cr_follow.up_to_date_at` is written again after this long up to date without a change (health after a
#: restart with the HTPC down tells how old the copy is).
UP_TO_DATE_WRITE_S = 60.0
#: The pace of retries after the HTPC refused the feed (403, 404: the table may become visible later).
REFUSED_BACKOFF = (5.0, 120.0)
IDLE_THREAD_EXIT_S = 2.0
_STAGE = "_cr_stage_"
_RESERVED_SCHEMAS = frozenset({"main", "temp"})
_STAGED_SQL = "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, 10) = '_cr_stage_'"

_FOLLOW_SQL = """CREATE TABLE IF NOT EXISTS _cr_follow (
    "table" TEXT PRIMARY KEY,
    "offset" TEXT,
    rows INTEGER NOT NULL DEFAULT 0,
    up_to_date_at REAL,
    last_error TEXT,
    followed_at REAL NOT NULL
)"""

Subscribe = Callable[[str, str, str | None], FeedSubscription]


def follow_dir(data_dir: Path, own_agent_id: str) -> Path:
    """Where an agent's follower files are."""
    return Path(data_dir) / f"{own_agent_id}.follow"


# ---------------------------------------------------------------------- the reader side
def attach_followed(conn: sqlite3.Connection, wanted: Mapping[str, Path]) -> dict[str, str]:
    """Make the attached follower files of `conn` exactly `wanted` (schema name -> file), read-only.

    Returns the ones that could not be attached (name -> why); the others are attached all the same.
    """
    current = {row[1]: row[2] for row in conn.execute("PRAGMA database_list") if row[1] not in _RESERVED_SCHEMAS}
    for name in current:
        if name not in wanted:
            conn.execute(f"DETACH DATABASE {quote_identifier(name)}")
    failed: dict[str, str] = {}
    for name, path in wanted.items():
        if name in current:
            continue
        uri = "file:" + urllib.parse.quote(str(Path(path).absolute())) + "?mode=ro"
        try:
            conn.execute(f"ATTACH DATABASE ? AS {quote_identifier(name)}", (uri,))
        except sqlite3.Error as exc:
            failed[name] = f"cannot attach {path}: {exc}"
            continue
        files = {row[1]: row[2] for row in conn.execute("PRAGMA database_list")}
        if Path(files.get(name) or "").name != Path(path).name:  # SQLite built without URI file names
            conn.execute(f"DETACH DATABASE {quote_identifier(name)}")
            failed[name] = f"cannot attach {path} read-only (this SQLite does not take URI file names)"
    return failed


# ---------------------------------------------------------------------- the follower file
@dataclass(frozen=True)
class _Layout:
    columns: tuple[str, ...]
    key: tuple[str, ...]  # the primary key, or ("rowid",) for a table without one

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """The names a change may set: the columns and rowid."""
        return frozenset((*self.columns, "rowid"))


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.text_factory = sqlite_text
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(_FOLLOW_SQL)
    except BaseException:
        conn.close()
        raise
    return conn


def _table_ddl(name: str, schema: FeedSchema) -> str:
    if len(schema.types) != len(schema.columns) or not schema.columns:
        raise FeedProtocolError(f"schema of {schema.table}: columns and types do not match")
    cols = []
    for col, decl in zip(schema.columns, schema.types, strict=True):
        if not is_valid_identifier(col):
            raise FeedProtocolError(f"schema of {schema.table}: invalid column name {col!r}")
        typ = safe_declared_type(decl)
        cols.append(f"{quote_identifier(col)} {typ}".rstrip())
    if schema.pk:
        if not set(schema.pk) <= set(schema.columns):
            raise FeedProtocolError(f"schema of {schema.table}: primary key {schema.pk} not among its columns")
        cols.append(f"PRIMARY KEY ({', '.join(quote_identifier(c) for c in schema.pk)})")
    return f"CREATE TABLE {quote_identifier(name)} ({', '.join(cols)})"


def _layout(conn: sqlite3.Connection, table: str) -> _Layout | None:
    info = conn.execute(f"PRAGMA table_info({quote_identifier(table)})").fetchall()
    if not info:
        return None
    columns = tuple(r[1] for r in info)
    pk = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
    return _Layout(columns, pk or ("rowid",))


def _bound(values: Sequence[SQLiteValue]) -> tuple[tuple[int, ...], list[Any]]:
    """The positions of TEXT that is not UTF-8 (bound as its bytes, cast back to TEXT), and the values as bound."""
    casts = tuple(i for i, v in enumerate(values) if type(v) is InvalidText)
    if not casts:
        return casts, list(values)
    return casts, [bytes(v) if type(v) is InvalidText else v for v in values]


def _column(name: str) -> str:
    return "rowid" if name == "rowid" else quote_identifier(name)


@functools.lru_cache(maxsize=512)
def _upsert_sql(table: str, names: tuple[str, ...], casts: tuple[int, ...]) -> tuple[str, str]:
    cols = ", ".join(_column(n) for n in names)
    marks = ", ".join("CAST(? AS TEXT)" if i in casts else "?" for i in range(len(names)))
    qt = quote_identifier(table)
    return (
        f"INSERT OR IGNORE INTO {qt} ({cols}) VALUES ({marks})",
        f"INSERT OR REPLACE INTO {qt} ({cols}) VALUES ({marks})",
    )


@functools.lru_cache(maxsize=512)
def _delete_sql(table: str, names: tuple[str, ...], casts: tuple[int, ...]) -> str:
    where = " AND ".join(f"{_column(n)} IS {'CAST(? AS TEXT)' if i in casts else '?'}" for i, n in enumerate(names))
    return f"DELETE FROM {quote_identifier(table)} WHERE {where}"


class _SchemaMismatch(Exception):
    """A change does not fit the local table (its schema changed without a must-refetch): refetch."""


def _upsert(conn: sqlite3.Connection, table: str, layout: _Layout, change: Change) -> int:
    """Insert or replace one row; +1 if its key was new."""
    row = dict(change.row or {})
    for k, v in change.key.items():
        row.setdefault(k, v)
    if not row.keys() <= layout.names:
        raise _SchemaMismatch(f"columns {sorted(row.keys() - layout.names)} are not in {table}")
    names = tuple(row)
    casts, values = _bound(list(row.values()))
    insert, replace = _upsert_sql(table, names, casts)
    if conn.execute(insert, values).rowcount == 1:
        return 1
    conn.execute(replace, values)
    return 0


def _delete(conn: sqlite3.Connection, table: str, layout: _Layout, change: Change) -> int:
    if not change.key.keys() <= layout.names:
        raise _SchemaMismatch(f"key {sorted(change.key)} does not fit {table}")
    casts, values = _bound(list(change.key.values()))
    return -conn.execute(_delete_sql(table, tuple(change.key), casts), values).rowcount


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[], Any]) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


class FollowerFile:
    """One followed agent's SQLite file and the thread that writes it."""

    def __init__(self, agent_id: str, path: Path) -> None:
        self.agent_id = agent_id
        self.path = path
        self.conn = SQLiteThread(
            lambda: _connect(path), name=f"follow:{agent_id}", idle_exit_s=IDLE_THREAD_EXIT_S
        ).lazy_connection()
        self._layouts: dict[str, _Layout | None] = {}

    async def declared(self) -> dict[str, dict[str, Any]]:
        """The `_cr_follow` rows: table -> {offset, rows, up_to_date_at, last_error}. Drops stale staging."""

        def read(c: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            for (name,) in c.execute(_STAGED_SQL).fetchall():
                c.execute(f"DROP TABLE IF EXISTS {quote_identifier(name)}")
            rows = c.execute('SELECT "table", "offset", rows, up_to_date_at, last_error FROM _cr_follow').fetchall()
            return {r[0]: {"offset": r[1], "rows": r[2], "up_to_date_at": r[3], "last_error": r[4]} for r in rows}

        return await self.conn.call(read)

    async def declare(self, tables: Sequence[str]) -> None:
        now = time.time()

        def write(c: sqlite3.Connection) -> None:
            _in_transaction(
                c,
                lambda: c.executemany(
                    'INSERT OR IGNORE INTO _cr_follow ("table", followed_at) VALUES (?, ?)', [(t, now) for t in tables]
                ),
            )

        await self.conn.call(write)

    async def remove(self, tables: Sequence[str]) -> int:
        """Forget these tables (their rows too); returns how many tables stay declared."""

        def write(c: sqlite3.Connection) -> int:
            def body() -> int:
                for t in tables:
                    c.execute('DELETE FROM _cr_follow WHERE "table" = ?', (t,))
                    c.execute(f"DROP TABLE IF EXISTS {quote_identifier(t)}")
                    c.execute(f"DROP TABLE IF EXISTS {quote_identifier(_STAGE + t)}")
                return int(c.execute("SELECT count(*) FROM _cr_follow").fetchone()[0])

            return int(_in_transaction(c, body))

        for t in tables:
            self._layouts.pop(t, None)
        return await self.conn.call(write)

    async def apply(self, table: str, changes: Sequence[Change], offset: str) -> int:
        """One remote transaction and its offset in one local transaction; returns the change in row count."""

        def write(c: sqlite3.Connection) -> int:
            layout = self._layouts.get(table) or _layout(c, table)
            if layout is None:
                raise _SchemaMismatch(f"{table} has no local copy yet")
            self._layouts[table] = layout

            def body() -> int:
                delta = 0
                for ch in changes:
                    delta += _delete(c, table, layout, ch) if ch.op == "delete" else _upsert(c, table, layout, ch)
                c.execute(
                    'UPDATE _cr_follow SET "offset" = ?, rows = rows + ?, last_error = NULL WHERE "table" = ?',
                    (offset, delta, table),
                )
                return delta

            return int(_in_transaction(c, body))

        return await self.conn.call(write)

    async def stage_begin(self, schema: FeedSchema) -> None:
        stage = _STAGE + schema.table
        ddl = _table_ddl(stage, schema)

        def write(c: sqlite3.Connection) -> None:
            def body() -> None:
                c.execute(f"DROP TABLE IF EXISTS {quote_identifier(stage)}")
                c.execute(ddl)

            _in_transaction(c, body)

        await self.conn.call(write)

    async def stage_rows(self, table: str, changes: Sequence[Change]) -> None:
        stage = _STAGE + table

        def write(c: sqlite3.Connection) -> None:
            layout = _layout(c, stage)
            assert layout is not None
            _in_transaction(c, lambda: [_upsert(c, stage, layout, ch) for ch in changes])

        await self.conn.call(write)

    async def stage_swap(self, table: str, offset: str, at: float) -> int:
        """The staged snapshot becomes the table, with its offset, in one transaction; returns its row count."""
        stage = _STAGE + table

        def write(c: sqlite3.Connection) -> int:
            def body() -> int:
                c.execute(f"DROP TABLE IF EXISTS {quote_identifier(table)}")
                c.execute(f"ALTER TABLE {quote_identifier(stage)} RENAME TO {quote_identifier(table)}")
                rows = int(c.execute(f"SELECT count(*) FROM {quote_identifier(table)}").fetchone()[0])
                c.execute(
                    'UPDATE _cr_follow SET "offset" = ?, rows = ?, up_to_date_at = ?, last_error = NULL '
                    'WHERE "table" = ?',
                    (offset, rows, at, table),
                )
                return rows

            return int(_in_transaction(c, body))

        self._layouts.pop(table, None)
        return await self.conn.call(write)

    async def save_state(self, table: str, offset: str | None, up_to_date_at: float | None, error: str | None) -> None:
        def write(c: sqlite3.Connection) -> None:
            c.execute(
                'UPDATE _cr_follow SET "offset" = ?, up_to_date_at = ?, last_error = ? WHERE "table" = ?',
                (offset, up_to_date_at, error, table),
            )

        await self.conn.call(write)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.conn.close()


# ---------------------------------------------------------------------- one followed table
@dataclass(frozen=True)
class _Op:
    """One step for the follower file, from the feed: apply a transaction, stage snapshot rows, swap the
    snapshot in, up-to-date, a new snapshot's schema, a must-refetch."""

    kind: str
    changes: Sequence[Change] = ()
    offset: str = ""
    schema: FeedSchema | None = None
    reason: str = ""


@dataclass
class FollowedTable:
    """One followed table's state (what health reports) and the task feeding it."""

    agent_id: str
    table: str
    offset: str | None = None
    rows: int = 0
    up_to_date_at: float | None = None
    saved_up_to_date_at: float | None = None
    last_error: str | None = None
    refused: bool = False
    refetches: int = 0
    task: asyncio.Task[None] | None = None
    subscription: FeedSubscription | None = None
    applied: int = 0  # remote transactions applied since open
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    def health(self, now: float) -> dict[str, Any]:
        sub = self.subscription
        if self.refused:
            state = "refused"
        elif sub is None:
            state = "stopped"
        else:
            state = sub.state
        if state == "live":
            behind: float | None = 0.0
        elif self.up_to_date_at is not None:
            behind = max(0.0, now - self.up_to_date_at)
        else:
            behind = None
        error = self.last_error or (sub.last_error if sub is not None and state != "live" else None)
        return {
            "offset": self.offset,
            "rows": self.rows,
            "seconds_behind": behind,
            "state": state,
            "last_error": error,
            "refetches": self.refetches,
        }


# ---------------------------------------------------------------------- every follow of one agent storage
class Followers:
    """The follows of one agent: follower files, their tasks, what the reader attaches, health."""

    def __init__(self, own_agent_id: str, directory: Path, subscribe: Subscribe | None) -> None:
        self.own_agent_id = own_agent_id
        self.directory = directory
        self._subscribe = subscribe  # None: no htpc_url (copies stay readable, nothing is fed)
        self._files: dict[str, FollowerFile] = {}
        self._tables: dict[tuple[str, str], FollowedTable] = {}
        # replaced, never changed in place: the reader's thread reads it while the loop may declare a follow
        self._attached: Mapping[str, Path] = {}
        self._closed = False
        #: called (agent_id, table, offset) on the loop each time a copy reaches a new offset (benchmarks, tools)
        self.on_applied: Callable[[str, str, str], None] | None = None

    # ---------------------------------------------------------------- declaration
    def check(self, agent_id: str, tables: Sequence[str]) -> list[str]:
        """Refuse what cannot be followed; returns the tables as a list."""
        if isinstance(tables, str):
            raise FollowError("tables must be a list of table names, not one string")
        names = list(dict.fromkeys(tables))
        if agent_id == self.own_agent_id:
            raise FollowError(f"agent {agent_id} cannot follow itself: its own tables are in its own database")
        if agent_id in _RESERVED_SCHEMAS:
            raise FollowError(f"agent {agent_id!r} cannot be followed: its name is one of SQLite's schema names")
        if not names:
            raise FollowError("follow() needs at least one table")
        for t in names:
            if not is_valid_identifier(t):
                raise FollowError(f"invalid table name {t!r}")
        if agent_id not in self._files and len(self._files) >= MAX_FOLLOWED_AGENTS:
            raise FollowError(
                f"an agent can follow at most {MAX_FOLLOWED_AGENTS} agents (SQLite attaches at most 10 databases "
                f"to a connection); already following {sorted(self._files)}"
            )
        return names

    async def restore(self) -> None:
        """Open every declared follower file and start feeding its tables (AgentStorage.open)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*.db")):
            agent_id = path.stem
            if (
                not is_valid_agent_id(agent_id)
                or agent_id in (self.own_agent_id, *_RESERVED_SCHEMAS)
                or len(self._files) >= MAX_FOLLOWED_AGENTS
            ):
                log.warning("ignoring follower file %s", path)
                continue
            file = FollowerFile(agent_id, path)
            try:
                declared = await file.declared()
            except sqlite3.Error as exc:
                log.warning("follower file %s unreadable, not restored: %s", path, exc)
                await file.close()
                continue
            if not declared:
                await file.close()
                continue
            self._files[agent_id] = file
            self._attached = {**self._attached, agent_id: path}
            for table, state in declared.items():
                ft = FollowedTable(
                    agent_id,
                    table,
                    offset=state["offset"],
                    rows=state["rows"],
                    up_to_date_at=state["up_to_date_at"],
                    saved_up_to_date_at=state["up_to_date_at"],
                    last_error=state["last_error"],
                )
                self._tables[(agent_id, table)] = ft
                self._start(ft)

    async def follow(self, agent_id: str, tables: Sequence[str]) -> None:
        names = self.check(agent_id, tables)
        file = self._files.get(agent_id)
        if file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            file = FollowerFile(agent_id, self.directory / f"{agent_id}.db")
            await file.declared()  # creates the file and _cr_follow
            self._files[agent_id] = file
            self._attached = {**self._attached, agent_id: file.path}
        await file.declare(names)
        for t in names:
            if (agent_id, t) not in self._tables:
                ft = FollowedTable(agent_id, t)
                self._tables[(agent_id, t)] = ft
                self._start(ft)

    async def unfollow(self, agent_id: str, tables: Sequence[str] | None) -> bool:
        """Stop following; returns True when the agent's file is gone (the reader must detach it first)."""
        file = self._files.get(agent_id)
        if file is None:
            return False
        names = [t for (a, t) in self._tables if a == agent_id] if tables is None else list(tables)
        for t in names:
            ft = self._tables.pop((agent_id, t), None)
            if ft is not None:
                await self._stop(ft)
        left = await file.remove(names)
        if left:
            return False
        self._attached = {k: v for k, v in self._attached.items() if k != agent_id}
        return True

    async def forget_file(self, agent_id: str) -> None:
        """Close and delete an agent's follower file (after the reader detached it)."""
        file = self._files.pop(agent_id, None)
        if file is None:
            return
        await file.close()
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(file.path) + suffix).unlink()

    def attachments(self) -> Mapping[str, Path]:
        """Schema name -> follower file, for the reader connection (safe to call from another thread)."""
        return self._attached

    def health(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {f"{a}.{t}": ft.health(now) for (a, t), ft in sorted(self._tables.items())}

    async def wait_applied(self, agent_id: str, table: str, offset: str, timeout: float) -> bool:
        """Wait until the copy of agent_id.table is at `offset` (tests and tools); False at the timeout."""
        ft = self._tables.get((agent_id, table))
        if ft is None:
            raise FollowError(f"{agent_id}.{table} is not followed")
        deadline = time.monotonic() + timeout
        while ft.offset != offset:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ft.waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, left)
        return True

    async def close(self) -> None:
        self._closed = True
        await asyncio.gather(*(self._stop(ft) for ft in self._tables.values()))
        for file in self._files.values():
            await file.close()
        self._files.clear()

    # ---------------------------------------------------------------- the feed tasks
    def _start(self, ft: FollowedTable) -> None:
        if self._subscribe is None:
            ft.last_error = "no htpc_url: the copy is not fed (it stays readable)"
            return
        ft.task = asyncio.create_task(self._run(ft), name=f"follow:{ft.agent_id}.{ft.table}")

    async def _stop(self, ft: FollowedTable) -> None:
        task, ft.task = ft.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        ft.subscription = None

    async def _run(self, ft: FollowedTable) -> None:
        assert self._subscribe is not None
        file = self._files[ft.agent_id]
        refused = Backoff(*REFUSED_BACKOFF)
        errors = Backoff(1.0, 30.0)
        progress = ft.applied
        while not self._closed:
            sub = self._subscribe(ft.agent_id, ft.table, ft.offset)
            ft.subscription = sub
            try:
                try:
                    await self._consume(ft, file, sub)
                finally:
                    if ft.applied > progress:  # this run got somewhere: a failure now retries at the first pace
                        progress = ft.applied
                        refused.reset()
                        errors.reset()
            except FeedError as exc:
                ft.refused = True
                ft.last_error = str(exc)
                log.warning("follow %s.%s refused: %s", ft.agent_id, ft.table, exc)
                await self._save_error(file, ft)
                await asyncio.sleep(refused.next())
                continue
            except (_SchemaMismatch, FeedProtocolError) as exc:
                log.warning("follow %s.%s: %s; starting over from a snapshot", ft.agent_id, ft.table, exc)
                ft.last_error = f"{exc}; refetching"
                ft.offset = None  # the stored offset stays until the new snapshot is in
                ft.refetches += 1
                await asyncio.sleep(errors.next())
            except sqlite3.Error as exc:
                ft.last_error = f"local follower file error: {exc}"
                log.warning("follow %s.%s: %s", ft.agent_id, ft.table, ft.last_error)
                await asyncio.sleep(errors.next())
            except Exception as exc:  # never let the copy stop for good: report, wait, go on
                ft.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("follow %s.%s failed; retrying", ft.agent_id, ft.table)
                await asyncio.sleep(errors.next())
            finally:
                await sub.aclose()

    async def _save_error(self, file: FollowerFile, ft: FollowedTable) -> None:
        with contextlib.suppress(sqlite3.Error):
            await file.save_state(ft.table, ft.offset, ft.saved_up_to_date_at, ft.last_error)

    async def _consume(self, ft: FollowedTable, file: FollowerFile, sub: FeedSubscription) -> None:
        """Read the feed on one task and apply on this one: whatever has arrived while the last local commit
        ran is applied in the next one (whole remote transactions only, with the offset of the last), so the
        copy keeps up with a fast writer while an idle feed is applied at once."""
        ops: asyncio.Queue[_Op | BaseException] = asyncio.Queue(maxsize=QUEUE_OPS)
        reader = asyncio.create_task(self._read_feed(sub, ops), name=f"follow-read:{ft.agent_id}.{ft.table}")
        try:
            while True:
                batch = [await ops.get()]
                while not ops.empty() and len(batch) < QUEUE_OPS:
                    batch.append(ops.get_nowait())
                await self._apply_ops(ft, file, batch)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @staticmethod
    async def _read_feed(sub: FeedSubscription, ops: asyncio.Queue[_Op | BaseException]) -> None:
        """Feed events -> ops: live transactions whole, snapshot rows in batches; an error ends the queue."""
        pending: list[Change] = []
        staging = False
        try:
            async for event in sub:
                if isinstance(event, Change):
                    pending.append(event)
                    if staging:
                        if len(pending) >= STAGE_BATCH_ROWS or event.last:
                            await ops.put(_Op("stage", pending))
                            pending = []
                        if event.last:
                            staging = False
                            await ops.put(_Op("swap", offset=event.offset))
                    elif event.last:
                        await ops.put(_Op("apply", pending, event.offset))
                        pending = []
                elif isinstance(event, UpToDate):
                    if staging:
                        if pending:
                            await ops.put(_Op("stage", pending))
                        staging = False
                        await ops.put(_Op("swap", offset=event.offset))
                    pending = []
                    await ops.put(_Op("up-to-date", offset=event.offset))
                elif isinstance(event, FeedSchema):
                    staging, pending = True, []
                    await ops.put(_Op("schema", schema=event))
                else:
                    staging, pending = False, []
                    await ops.put(_Op("refetch", reason=event.reason))
            raise FeedProtocolError("the feed ended")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await ops.put(exc)

    async def _apply_ops(self, ft: FollowedTable, file: FollowerFile, batch: list[_Op | BaseException]) -> None:
        i = 0
        while i < len(batch):
            op = batch[i]
            i += 1
            if isinstance(op, BaseException):
                raise op
            if op.kind == "apply":  # this and the transactions queued right after it: one local commit
                changes, offset = list(op.changes), op.offset
                while i < len(batch) and isinstance(nxt := batch[i], _Op) and nxt.kind == "apply":
                    changes += nxt.changes
                    offset = nxt.offset
                    i += 1
                ft.rows += await file.apply(ft.table, changes, offset)
                self._at(ft, offset)
            elif op.kind == "stage":
                await file.stage_rows(ft.table, op.changes)
            elif op.kind == "swap":
                ft.rows = await file.stage_swap(ft.table, op.offset, time.time())
                self._at(ft, op.offset)
            elif op.kind == "up-to-date":
                ft.refused = False
                ft.last_error = None
                now = time.time()
                ft.up_to_date_at = now
                if ft.offset != op.offset or now - (ft.saved_up_to_date_at or 0.0) > UP_TO_DATE_WRITE_S:
                    await file.save_state(ft.table, op.offset, now, None)
                    ft.saved_up_to_date_at = now
                self._at(ft, op.offset)
            elif op.kind == "schema":
                assert op.schema is not None
                await file.stage_begin(op.schema)
            else:
                ft.refetches += 1
                log.info("follow %s.%s: must-refetch (%s)", ft.agent_id, ft.table, op.reason)

    def _at(self, ft: FollowedTable, offset: str) -> None:
        if self.on_applied is not None and offset != ft.offset:
            try:
                self.on_applied(ft.agent_id, ft.table, offset)
            except Exception:
                log.exception("on_follow_applied hook failed")
        ft.offset = offset
        ft.applied += 1
        waiters, ft.waiters = ft.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
