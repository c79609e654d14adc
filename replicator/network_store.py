"""The network store: one table across every agent, for `"*".<table>` and queries naming many agents.

`<data_dir>/network.db` (derived, rebuildable, never in backups or snapshots) holds, for each table name
somebody queried as `"*".t`, one table `t` with the union of every agent's `always` table `t`:
`agent_id` (the owner) first, then every column any agent's `t` has (no declared type: each value is
exactly the agent's; an agent lacking a column gives NULL). It is fed from the agents' feed logs
(`feed_log.snapshot` once, then `feed_log.read_after`) and kept per (table, agent) at a stored offset:

- lazily: a table is created by the first query that needs it, and caught up before each query that reads
  it to at least every agent's committed feed head at that query's start (`AgentView.feed_n`), so its
  answers are as fresh as `/relay/query` on the agents' own files;
- on one writer thread of its own (queries read it read-only, in WAL mode), so the consumer's apply path
  never waits for it and tables nobody queries cost nothing;
- an offset the agent's feed cannot continue (a new epoch, a resync, a restore: `FeedGone`), or a schema
  change of the table, refills that agent's rows from a snapshot; an agent whose `t` is gone or no longer
  `always` loses its rows;
- a table not queried for `idle_drop_s` is dropped (it is made again on its next query).

Internal tables (`_cr_*`) map each row to its agent's key and hold the offsets; queries never read them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent_client import FeedOffset, InvalidText, decode_value, quote_identifier

from . import feed_log
from .errors import BadRequest, ReplicatorError
from .store_view import AgentView, StoreView

log = logging.getLogger("replicator.network")

#: The owner column of every network table.
OWNER_COLUMN = "agent_id"
#: Agents' columns a network table cannot hold: the owner column, and the names of its rowid (a user column
#: named so would shadow the rowid every write of the store addresses rows by). Hidden in `"*".t`.
HIDDEN_COLUMNS = frozenset({OWNER_COLUMN, "rowid", "oid", "_rowid_"})
#: Indexes on (agent_id, primary key) one network table gets at most (one per distinct key among its agents).
PK_INDEXES = 4
#: Read-only connections to agents' central files the writer keeps open (least recently used closed first).
READERS_KEPT = 64
_SCHEMA = (
    # One row per network table: its name (lower case, as created) and its columns in order (JSON list).
    "CREATE TABLE IF NOT EXISTS _cr_net (tbl TEXT PRIMARY KEY, columns TEXT NOT NULL) WITHOUT ROWID",
    # Where each agent's part of each table stands in the agent's feed.
    "CREATE TABLE IF NOT EXISTS _cr_net_offsets (tbl TEXT NOT NULL, agent TEXT NOT NULL, feed_id TEXT NOT NULL,"
    " n INTEGER NOT NULL, PRIMARY KEY (tbl, agent)) WITHOUT ROWID",
)


class NetworkStoreError(ReplicatorError):
    """The network store could not be brought up to date (its file, the disk)."""

    code = "network_store_unavailable"
    status = 503


class UnknownNetworkTable(BadRequest):
    """`"*".t` names a table no agent has as an `always` table."""

    code = "unknown_table"
    status = 404


def unknown_table(names: Collection[str]) -> UnknownNetworkTable:
    """The error of a query that read `"*".t` for names no agent has as an `always` table."""
    listed = ", ".join(f'"*".{name}' for name in sorted(names))
    return UnknownNetworkTable(
        f'no agent has an always table named as in {listed}: "*".t reads the always tables of every agent '
        "(on_demand and private tables are never in it)"
    )


@dataclass(frozen=True)
class _Want:
    """Where one agent's part of a network table must reach."""

    name: str  # the table's name in the agent's file (case as the agent wrote it)
    path: Path
    file_id: tuple[int, int] | None
    feed_id: str | None  # the agent's committed feed at query start (None: not known, read the head)
    n: int


def _feed_of(agent: AgentView) -> tuple[str | None, int]:
    """(feed_id, feed_n) of an agent's view (the feed-log fields of AgentView)."""
    return agent.feed_id, agent.feed_n


def _agent_table(agent: AgentView, tbl: str) -> str | None:
    """The name of the agent's `always` table called `tbl` (compared without case, as SQLite does), or None."""
    meta = agent.tables.get(tbl)
    if meta is None:
        meta = next((m for name, m in agent.tables.items() if name.lower() == tbl), None)
    if meta is None or meta.visibility != "always":
        return None
    return meta.name


def contributors(view: StoreView, tbl: str) -> dict[str, str]:
    """agent -> its table's name, for every agent with an `always` table `tbl` (lower case)."""
    out: dict[str, str] = {}
    for agent_id, agent in view.agents.items():
        name = _agent_table(agent, tbl)
        if name is not None:
            out[agent_id] = name
    return out


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _value(wire: Any) -> Any:
    """A wire value as its SQLite value (only tagged values, JSON objects, need decoding)."""
    return decode_value(wire) if type(wire) is dict else wire


def _text_casts(values: list[Any]) -> tuple[int, ...]:
    """Positions of TEXT values that are not UTF-8."""
    return tuple(i for i, v in enumerate(values) if type(v) is InvalidText)


def _bound(values: list[Any], casts: tuple[int, ...]) -> list[Any]:
    """The values as bound: InvalidText as its plain bytes (the SQL casts them to TEXT)."""
    if not casts:
        return values
    return [bytes(v) if i in casts else v for i, v in enumerate(values)]


def _key_bytes(key: Mapping[str, Any]) -> bytes:
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS)


class _Table:
    """The writer's knowledge of one network table (touched on the writer thread only)."""

    def __init__(self, tbl: str, columns: list[str]) -> None:
        self.tbl = tbl
        self.columns = columns  # every column but agent_id, in order
        self.lower = {c.lower() for c in columns}
        self.sql_cache: dict[tuple[tuple[str, ...], tuple[int, ...]], str] = {}
        self.pk_indexes: set[tuple[str, ...]] = set()  # (agent_id, key columns...) indexes made (or found) already

    @property
    def keys(self) -> str:
        return quote_identifier(f"_cr_keys_{self.tbl}")


class NetworkStore:
    """The fan-in store of one data directory (see the module docstring).

    `ensure` runs on the event loop; the work runs on the store's one writer thread.
    """

    def __init__(self, path: Path, *, idle_drop_s: float = 600.0) -> None:
        self.path = path
        self.idle_drop_s = idle_drop_s
        self.refills = 0  # agents' parts filled from a snapshot
        self.units_applied = 0  # feed units applied
        self.catch_ups = 0  # writer jobs run
        #: tbl -> agent -> offset reached (committed), replaced whole by the writer after each commit.
        self._offsets: dict[str, Mapping[str, FeedOffset]] = {}
        self._used: dict[str, float] = {}  # tbl -> when a query last needed it (loop only)
        self._last_idle_check = time.monotonic()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="network-store")
        self._closed = False
        self._conn: sqlite3.Connection | None = None  # the writer's connection (writer thread only)
        self._tables: dict[str, _Table] = {}  # writer thread only
        self._readers: OrderedDict[str, tuple[tuple[int, int] | None, sqlite3.Connection]] = OrderedDict()
        self._seen_view: StoreView | None = None  # the view `_seen` was computed for (loop only)
        self._seen: dict[str, dict[str, str]] = {}
        self._executor.submit(self._open).result()

    # ------------------------------------------------------------------ event loop side
    def _contributors(self, view: StoreView, tbl: str) -> dict[str, str]:
        """`contributors`, remembered for the latest view (a view is immutable; a new one comes per batch)."""
        if self._seen_view is not view:
            self._seen_view, self._seen = view, {}
        found = self._seen.get(tbl)
        if found is None:
            found = self._seen[tbl] = contributors(view, tbl)
        return found

    def satisfied(self, view: StoreView, tbl: str) -> bool:
        """Whether `tbl` holds every contributing agent up to its committed feed head in `view` (and no other)."""
        have = self._offsets.get(tbl)
        if have is None:
            return False
        wanted = self._contributors(view, tbl)
        if len(wanted) != len(have):
            return False
        for agent_id in wanted:
            offset = have.get(agent_id)
            if offset is None:
                return False
            feed_id, feed_n = _feed_of(view.agents[agent_id])
            if feed_id is None or offset.feed_id != feed_id or offset.n < feed_n:
                return False
        return True

    async def ensure(self, view: StoreView, tables: Collection[str], timeout_s: float) -> set[str]:
        """Bring every table of `tables` (lower-case names) up to `view`; the names no agent has as an `always`
        table (no network table: a query reading one fails, see `unknown_table`). Past `timeout_s` a BadRequest
        408 `query_timeout` (the work goes on, for the next query)."""
        if self._closed:
            raise NetworkStoreError("the network store is closed (the replicator is stopping)")
        now = time.monotonic()
        jobs: list[Future[None]] = []
        unknown: set[str] = set()
        for tbl in sorted(tables):
            wanted = self._contributors(view, tbl)
            if not wanted and tbl not in self._offsets:
                unknown.add(tbl)
                continue
            self._used[tbl] = now
            if not self.satisfied(view, tbl):
                wants = {}
                for agent_id, name in wanted.items():
                    agent = view.agents[agent_id]
                    feed_id, feed_n = _feed_of(agent)
                    wants[agent_id] = _Want(name, agent.path, agent.file_id, feed_id, feed_n)
                jobs.append(self._executor.submit(self._catch_up, tbl, wants))
        if now - self._last_idle_check > min(60.0, self.idle_drop_s / 2):
            self._last_idle_check = now
            self._drop_idle(now)
        if not jobs:
            return unknown
        waiting = [asyncio.wrap_future(job) for job in jobs]
        done, pending = await asyncio.wait(waiting, timeout=timeout_s)
        if pending:
            for fut in pending:
                fut.add_done_callback(_retrieved)  # its error (if any) was logged by the writer already
            err = BadRequest(
                f"bringing the network store up to date took longer than the query's time bound of {timeout_s:g} s "
                "(it goes on: retry in a moment)"
            )
            err.code = "query_timeout"
            err.status = 408
            raise err
        for fut in done:
            fut.result()
        return unknown

    def _drop_idle(self, now: float) -> None:
        idle = [tbl for tbl, at in self._used.items() if now - at > self.idle_drop_s]
        for tbl in idle:
            del self._used[tbl]
            self._offsets.pop(tbl, None)  # the next query that needs it waits for the drop, then refills
            self._executor.submit(self._drop, tbl)

    def tables(self) -> list[str]:
        """The network tables kept now."""
        return sorted(self._offsets)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)  # the job running finishes (its transaction)
        self._close_connections()  # the writer thread is gone: nobody else uses them

    # ------------------------------------------------------------------ writer thread
    def _open(self) -> None:
        try:
            self._conn = self._connect()
        except sqlite3.DatabaseError as exc:
            # Derived data: a file that cannot be read is made again from the agents' feeds.
            log.warning("network store %s cannot be opened (%s); starting it over", self.path, exc)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = OFF")  # derived: a crash loses nothing a refill cannot make again
            conn.execute("PRAGMA busy_timeout = 5000")
            for stmt in _SCHEMA:
                conn.execute(stmt)
            tables = {
                str(tbl): _Table(str(tbl), [str(c) for c in orjson.loads(cols)])
                for tbl, cols in conn.execute("SELECT tbl, columns FROM _cr_net")
            }
            offsets: dict[str, dict[str, FeedOffset]] = {tbl: {} for tbl in tables}
            for tbl, agent, feed_id, n in conn.execute("SELECT tbl, agent, feed_id, n FROM _cr_net_offsets"):
                if tbl in offsets:
                    offsets[tbl][agent] = FeedOffset(feed_id, int(n))
        except BaseException:
            conn.close()
            raise
        self._tables = tables
        now = time.monotonic()
        self._offsets = dict(offsets)
        self._used = dict.fromkeys(offsets, now)
        return conn

    def _writer(self) -> sqlite3.Connection:
        if self._conn is None:
            raise NetworkStoreError("the network store is closed")
        return self._conn

    def _reader(self, agent_id: str, want: _Want) -> sqlite3.Connection:
        """A read-only connection to the agent's central file (a new one when the file was replaced)."""
        found = self._readers.get(agent_id)
        if found is not None and found[0] == want.file_id:
            self._readers.move_to_end(agent_id)
            return found[1]
        if found is not None:
            found[1].close()
            del self._readers[agent_id]
        conn = sqlite3.connect(f"file:{want.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        self._readers[agent_id] = (want.file_id, conn)
        while len(self._readers) > READERS_KEPT:
            self._readers.popitem(last=False)[1][1].close()
        return conn

    def _close_connections(self) -> None:
        for _file_id, conn in self._readers.values():
            conn.close()
        self._readers.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _catch_up(self, tbl: str, wants: Mapping[str, _Want]) -> None:
        """Bring `tbl` to `wants` in one transaction of the network store (on the writer thread)."""
        conn = self._writer()
        offsets = dict(self._offsets.get(tbl, {}))
        table = self._tables.get(tbl)
        self.catch_ups += 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            if table is None:
                table = self._create(conn, tbl)
            for agent_id in [a for a in offsets if a not in wants]:
                self._remove_agent(conn, table, agent_id)
                del offsets[agent_id]
            for agent_id, want in wants.items():
                reached = self._catch_up_agent(conn, table, agent_id, want, offsets.get(agent_id))
                if reached is None:
                    self._remove_agent(conn, table, agent_id)
                    offsets.pop(agent_id, None)
                else:
                    offsets[agent_id] = reached
                    conn.execute(
                        "INSERT OR REPLACE INTO _cr_net_offsets (tbl, agent, feed_id, n) VALUES (?, ?, ?, ?)",
                        (tbl, agent_id, reached.feed_id, reached.n),
                    )
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._tables.pop(tbl, None)  # reloaded from the file on the next job (columns may have been added)
            self._reload_table(conn, tbl)
            if isinstance(exc, Exception):
                log.warning("network store: catching up %r failed: %r", tbl, exc)
                raise NetworkStoreError(f"the network store could not be brought up to date: {exc}") from exc
            raise
        self._offsets[tbl] = offsets

    def _reload_table(self, conn: sqlite3.Connection, tbl: str) -> None:
        row = conn.execute("SELECT columns FROM _cr_net WHERE tbl = ?", (tbl,)).fetchone()
        if row is not None:
            self._tables[tbl] = _Table(tbl, [str(c) for c in orjson.loads(row[0])])

    def _catch_up_agent(
        self, conn: sqlite3.Connection, table: _Table, agent_id: str, want: _Want, have: FeedOffset | None
    ) -> FeedOffset | None:
        """Apply one agent's feed to `table` up to at least `want`; the offset reached (None: the agent has no
        such data table now)."""
        if have is not None and want.feed_id == have.feed_id and have.n >= want.n:
            return have
        reader = self._reader(agent_id, want)
        if have is None or (want.feed_id is not None and want.feed_id != have.feed_id):
            return self._refill(conn, table, agent_id, want, reader)
        offset = have
        while True:
            try:
                read = feed_log.read_after(reader, offset, table=want.name)
            except (feed_log.FeedGone, LookupError):
                return self._refill(conn, table, agent_id, want, reader)
            for unit in read.units:
                if any(name.lower() == table.tbl for name in unit.schema_changed):
                    return self._refill(conn, table, agent_id, want, reader)
                self._apply(conn, table, agent_id, unit.changes)
                self.units_applied += 1
            offset = read.head
            if read.caught_up or (offset.feed_id == want.feed_id and offset.n >= want.n):
                return offset

    def _refill(
        self, conn: sqlite3.Connection, table: _Table, agent_id: str, want: _Want, reader: sqlite3.Connection
    ) -> FeedOffset | None:
        """Replace the agent's rows by a snapshot of its table."""
        self._remove_agent(conn, table, agent_id)
        try:
            snap = feed_log.snapshot(reader, want.name)
        except LookupError:
            return None
        self.refills += 1
        columns = [c for c in snap.schema.columns if c.lower() not in HIDDEN_COLUMNS]
        self._add_columns(conn, table, columns)
        self._key_index(conn, table, snap.schema.pk)
        base = int(conn.execute(f"SELECT coalesce(max(rowid), 0) FROM {quote_identifier(table.tbl)}").fetchone()[0])
        rows: list[list[Any]] = []
        keys: list[tuple[str, bytes, int]] = []
        names = tuple(columns)
        for rid, (key, row) in enumerate(snap.rows, start=base + 1):
            values = [_value(row.get(c)) for c in columns]
            casts = _text_casts(values)
            if casts:  # TEXT that is not UTF-8: stored as TEXT byte for byte, like the central copy
                conn.execute(self._insert_sql(table, names, casts), [rid, agent_id, *_bound(values, casts)])
            else:
                rows.append([rid, agent_id, *values])
            keys.append((agent_id, _key_bytes(key), rid))
        if rows:
            conn.executemany(self._insert_sql(table, names), rows)
        if keys:
            conn.executemany(f"INSERT OR REPLACE INTO {table.keys} (agent, key, rid) VALUES (?, ?, ?)", keys)
        return FeedOffset.parse(snap.schema.offset)

    def _apply(self, conn: sqlite3.Connection, table: _Table, agent_id: str, changes: Iterable[Any]) -> None:
        q = quote_identifier
        for change in changes:
            key = _key_bytes(change.key)
            found = conn.execute(
                f"SELECT rid FROM {table.keys} WHERE agent = ? AND key = ?", (agent_id, key)
            ).fetchone()
            if change.op == "delete" or change.row is None:
                if found is not None:
                    conn.execute(f"DELETE FROM {q(table.tbl)} WHERE rowid = ?", (found[0],))
                    conn.execute(f"DELETE FROM {table.keys} WHERE agent = ? AND key = ?", (agent_id, key))
                continue
            columns = tuple(c for c in change.row if c.lower() not in HIDDEN_COLUMNS)
            self._add_columns(conn, table, columns)
            values = [_value(change.row[c]) for c in columns]
            casts = _text_casts(values)
            cur = conn.execute(
                self._insert_sql(table, columns, casts),
                [found[0] if found is not None else None, agent_id, *_bound(values, casts)],
            )
            if found is None:
                conn.execute(
                    f"INSERT INTO {table.keys} (agent, key, rid) VALUES (?, ?, ?)", (agent_id, key, cur.lastrowid)
                )

    def _insert_sql(self, table: _Table, columns: tuple[str, ...], casts: tuple[int, ...] = ()) -> str:
        """INSERT OR REPLACE of (rowid, agent_id, columns); the values at `casts` are bound as bytes and stored
        as TEXT."""
        sql = table.sql_cache.get((columns, casts))
        if sql is None:
            q = quote_identifier
            names = ", ".join(["rowid", OWNER_COLUMN, *map(q, columns)])
            marks = ", ".join(["?", "?", *("CAST(? AS TEXT)" if i in casts else "?" for i in range(len(columns)))])
            sql = f"INSERT OR REPLACE INTO {q(table.tbl)} ({names}) VALUES ({marks})"
            table.sql_cache[(columns, casts)] = sql
        return sql

    def _create(self, conn: sqlite3.Connection, tbl: str) -> _Table:
        q = quote_identifier
        table = _Table(tbl, [])
        conn.execute(f"DROP TABLE IF EXISTS {q(tbl)}")
        conn.execute(f"DROP TABLE IF EXISTS {table.keys}")
        conn.execute(f"CREATE TABLE {q(tbl)} ({OWNER_COLUMN} TEXT NOT NULL)")
        conn.execute(
            f"CREATE TABLE {table.keys} (agent TEXT NOT NULL, key BLOB NOT NULL, rid INTEGER NOT NULL,"
            " PRIMARY KEY (agent, key)) WITHOUT ROWID"
        )
        conn.execute("INSERT OR REPLACE INTO _cr_net (tbl, columns) VALUES (?, '[]')", (tbl,))
        conn.execute("DELETE FROM _cr_net_offsets WHERE tbl = ?", (tbl,))
        self._tables[tbl] = table
        return table

    def _add_columns(self, conn: sqlite3.Connection, table: _Table, columns: Iterable[str]) -> None:
        new = [c for c in dict.fromkeys(columns) if c.lower() not in table.lower]
        if not new:
            return
        for col in new:
            conn.execute(f"ALTER TABLE {quote_identifier(table.tbl)} ADD COLUMN {quote_identifier(col)}")
            table.columns.append(col)
            table.lower.add(col.lower())
        table.sql_cache.clear()
        conn.execute("UPDATE _cr_net SET columns = ? WHERE tbl = ?", (orjson.dumps(table.columns).decode(), table.tbl))

    def _key_index(self, conn: sqlite3.Connection, table: _Table, pk: Iterable[str]) -> None:
        """An index on (agent_id, the agent's primary key): `"a".t` read from here finds a row by its key (a join
        on it) as fast as in the agent's own file, and an agent's rows are found by agent_id. At most PK_INDEXES
        different ones per table (a query on agent_id still has the first one)."""
        cols = tuple(c.lower() for c in pk if c.lower() not in HIDDEN_COLUMNS)
        if cols in table.pk_indexes or len(table.pk_indexes) >= PK_INDEXES:
            return
        q = quote_identifier
        name = q(f"_cr_pk_{table.tbl}_{'_'.join(cols)}")  # (agent_id) alone for a table keyed by rowid
        conn.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON {q(table.tbl)} ({', '.join(map(q, (OWNER_COLUMN, *cols)))})"
        )
        table.pk_indexes.add(cols)

    def _remove_agent(self, conn: sqlite3.Connection, table: _Table, agent_id: str) -> None:
        conn.execute(f"DELETE FROM {quote_identifier(table.tbl)} WHERE {OWNER_COLUMN} = ?", (agent_id,))
        conn.execute(f"DELETE FROM {table.keys} WHERE agent = ?", (agent_id,))
        conn.execute("DELETE FROM _cr_net_offsets WHERE tbl = ? AND agent = ?", (table.tbl, agent_id))

    def _drop(self, tbl: str) -> None:
        conn = self._writer()
        table = self._tables.pop(tbl, None) or _Table(tbl, [])
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"DROP TABLE IF EXISTS {quote_identifier(tbl)}")
            conn.execute(f"DROP TABLE IF EXISTS {table.keys}")
            conn.execute("DELETE FROM _cr_net WHERE tbl = ?", (tbl,))
            conn.execute("DELETE FROM _cr_net_offsets WHERE tbl = ?", (tbl,))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("network store: dropping idle table %r failed: %s", tbl, exc)
            return
        self._offsets.pop(tbl, None)  # a catch-up queued before the drop may have put it back
        log.info("network store: dropped %r (not queried for %.0f s)", tbl, self.idle_drop_s)


def network_columns(view: StoreView, tbl: str, agent_id: str) -> tuple[str, ...] | None:
    """The columns `"<agent_id>".<tbl>` has (to read it from the network store), None if it has no such
    `always` table."""
    agent = view.agents.get(agent_id)
    if agent is None:
        return None
    name = _agent_table(agent, tbl)
    if name is None:
        return None
    return agent.tables[name].columns
