"""The feed log: every change applied to an agent's central copy, in commit order, for `GET /relay/changes`.

Each agent's central file (`<data_dir>/agents/<agent_id>.db`) holds, next to its
data tables:

- `_cr_feed (n, final, tables, body, at)`: one row per applied record that touched
  data tables, appended in the same SQLite transaction as the apply (so the log is
  exactly as durable and as atomic as the copy). `tables` is `|t1|t2|`; `final` is 0
  only for a non-final part of a multi-part transaction: a reader joins rows up to
  and including the next final one into one *unit* (one agent transaction), whose
  offset is that final row's `n`. `body` is the changes (see "Body" below).
- `_cr_feed_meta`: `feed_id` (16 lowercase hex digits) names one continuous history
  of the copy; `floor` is the `n` such that every unit after it is still in the log.

A new feed (new `feed_id`, empty log, floor = the last `n` ever issued) starts with
a new file, a new agent epoch, a resync, and a file installed by restore / rebuild
(`restart_feed_in_file`). The log keeps at most `FEED_KEEP_UNITS` rows and
`FEED_KEEP_BYTES` of bodies (less under a storage quota): older units are trimmed and
the floor moves up; an offset below it must refetch (`FeedGone`).

Reading (`head`, `read_after`, `snapshot`) takes a read-only connection and reads in
one read transaction per call. Writing (`append`, `trim`, `start_new_feed`) runs
inside the central store's open transaction, on its apply thread.

Body: JSON `{"l": {layout id: [table, columns, pk]}, "c": [entry, ...]}`, values in
wire form (`encode_value`), exactly as they came in the record. Entries:
`["U", layout id, [row, ...], labels]` (labels "" when every row was an insert, else
one "i"/"u" per row), `["D", layout id, key values]`, `["R", table, "i"|"u", key,
row]` (a relay row, the whole row after the write), `["S", table]` (the table's
schema changed here: created, recreated, dropped, announced on_demand, altered).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from agent_client import FeedOffset, FeedSchema, TableLayout, encode_values, fetch_all_text, quote_identifier

from . import central_schema

#: Most log rows kept per agent (older whole units are trimmed).
FEED_KEEP_UNITS = 10_000
#: Most body bytes kept per agent (a quarter of the agent's quota when that is smaller).
FEED_KEEP_BYTES = 16 * 1024 * 1024
#: The newest units kept whatever their size (the byte bound gives way to them).
FEED_KEEP_MIN_UNITS = 64
#: A trim for the row bound leaves this many rows of room, so it runs at most every so many records.
FEED_TRIM_SLACK = 256

FEED_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _cr_feed (n INTEGER PRIMARY KEY AUTOINCREMENT, final INTEGER NOT NULL,"
    " tables TEXT NOT NULL, body BLOB NOT NULL, at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS _cr_feed_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
)
_INTERNAL_PREFIX = "_cr_"


class FeedGone(Exception):
    """The offset cannot be continued (another feed, ahead of the head, or trimmed); str(exc) says why."""


@dataclass(frozen=True)
class FeedRowChange:
    """One row change of a unit: wire values (`encode_value` form) of its key and whole row."""

    table: str
    op: str  # "insert" | "update" | "delete"
    key: dict[str, Any]
    row: dict[str, Any] | None  # None for a delete


@dataclass(frozen=True)
class FeedUnit:
    """One agent transaction (log rows up to a final one)."""

    n: int  # the offset's n after it
    changes: tuple[FeedRowChange, ...]  # of the requested table only (all tables when the read named none)
    schema_changed: frozenset[str]  # tables whose schema changed in this unit (only the requested one, if any)


@dataclass(frozen=True)
class FeedRead:
    units: list[FeedUnit]  # only units with a change of the table or a schema marker for it
    head: FeedOffset  # the position this read reached (>= the last unit's n; the head when caught up)
    caught_up: bool  # nothing committed after `head`


@dataclass(frozen=True)
class TableSnapshot:
    schema: FeedSchema  # the table's layout and the offset of the snapshot
    rows: list[tuple[dict[str, Any], dict[str, Any]]]  # (key, row) in wire values


@dataclass(frozen=True)
class FeedPosition:
    """Where a central file's feed stands (what the writer keeps in memory)."""

    feed_id: str
    floor: int
    head: int  # n of the last complete unit, or the floor when the log is empty
    rows: int  # log rows
    body_bytes: int  # bytes of their bodies


# ------------------------------------------------------------------ schema and feeds
def create_schema(conn: sqlite3.Connection) -> None:
    """Create the feed tables (idempotent, also on files made before them); a file without a feed id gets a new
    feed. On a connection in autocommit mode the new feed is written in its own transaction."""
    for stmt in FEED_SCHEMA:
        conn.execute(stmt)
    if _meta(conn).get("feed_id") is None:
        if conn.in_transaction:
            start_new_feed(conn)
        else:
            _start_new_feed_alone(conn)


def new_feed_id() -> str:
    return os.urandom(8).hex()


def start_new_feed(conn: sqlite3.Connection) -> tuple[str, int]:
    """Empty the log and name a new feed (in the caller's transaction); (feed_id, floor).

    The floor is the last `n` ever issued (AUTOINCREMENT never reuses one), so the new feed's units come after it.
    """
    conn.execute("DELETE FROM _cr_feed")
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_feed'").fetchone()
    floor = int(row[0]) if row is not None and row[0] is not None else 0
    feed_id = new_feed_id()
    conn.executemany(
        "INSERT OR REPLACE INTO _cr_feed_meta (key, value) VALUES (?, ?)", [("feed_id", feed_id), ("floor", floor)]
    )
    return feed_id, floor


def restart_feed_in_file(path: Path) -> None:
    """Start a new feed in a central file installed from a copy (restore, rebuild): its history no longer
    continues any offset handed out before. Creates the feed tables in a copy made before they existed."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for stmt in FEED_SCHEMA:
            conn.execute(stmt)
        _start_new_feed_alone(conn)
    finally:
        conn.close()


def _start_new_feed_alone(conn: sqlite3.Connection) -> None:
    """`start_new_feed` in a transaction of its own (`conn` in autocommit mode), rolled back if it fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        start_new_feed(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def load_position(conn: sqlite3.Connection) -> FeedPosition:
    """The feed as the file holds it (after `create_schema`)."""
    meta = _meta(conn)
    feed_id = meta.get("feed_id")
    if not isinstance(feed_id, str):
        raise ValueError(f"feed id {feed_id!r} in _cr_feed_meta is not text")
    floor = int(meta.get("floor") or 0)
    rows, body_bytes = conn.execute("SELECT count(*), total(length(body)) FROM _cr_feed").fetchone()
    return FeedPosition(feed_id, floor, _last_final(conn, floor), int(rows), int(body_bytes))


def append(conn: sqlite3.Connection, final: bool, tables: str, body: bytes, at: float) -> int:
    """Add one log row (in the caller's transaction); its n."""
    cur = conn.execute(
        "INSERT INTO _cr_feed (final, tables, body, at) VALUES (?, ?, ?, ?)", (1 if final else 0, tables, body, at)
    )
    n = cur.lastrowid
    assert n is not None
    return n


def trim(conn: sqlite3.Connection, head: int, keep_rows: int, keep_bytes: int) -> tuple[int, int, int] | None:
    """Delete the oldest whole units (up to `head` at most) until at most `keep_rows` rows and `keep_bytes` of
    bodies are left; (new floor, rows deleted, body bytes deleted), or None when nothing had to go."""
    rows, body_bytes = conn.execute("SELECT count(*), total(length(body)) FROM _cr_feed").fetchone()
    cut = 0
    if rows > keep_rows:
        row = conn.execute("SELECT n FROM _cr_feed ORDER BY n LIMIT 1 OFFSET ?", (rows - keep_rows - 1,)).fetchone()
        cut = int(row[0]) if row is not None else 0
    if body_bytes > keep_bytes:
        row = conn.execute(
            "SELECT n FROM (SELECT n, sum(length(body)) OVER (ORDER BY n) AS gone FROM _cr_feed) WHERE gone >= ? "
            "ORDER BY n LIMIT 1",
            (body_bytes - keep_bytes,),
        ).fetchone()
        cut = max(cut, int(row[0]) if row is not None else 0)
    if not cut:
        return None
    # Whole units only: up to the final row that closes the unit holding `cut`, never past the head.
    row = conn.execute("SELECT min(n) FROM _cr_feed WHERE n >= ? AND final = 1", (cut,)).fetchone()
    cut = min(int(row[0]) if row is not None and row[0] is not None else head, head)
    # The newest FEED_KEEP_MIN_UNITS units always stay, however large: a subscriber that is caught up or nearly
    # (all of them, usually) must never be sent to refetch by one big transaction; the byte bound overshoots.
    row = conn.execute(
        "SELECT n FROM _cr_feed WHERE final = 1 AND n <= ? ORDER BY n DESC LIMIT 1 OFFSET ?",
        (head, FEED_KEEP_MIN_UNITS),
    ).fetchone()
    cut = min(cut, int(row[0]) if row is not None else 0)
    if cut <= 0:
        return None
    gone_rows, gone_bytes = conn.execute(
        "SELECT count(*), total(length(body)) FROM _cr_feed WHERE n <= ?", (cut,)
    ).fetchone()
    if not gone_rows:
        return None
    conn.execute("DELETE FROM _cr_feed WHERE n <= ?", (cut,))
    conn.execute("INSERT OR REPLACE INTO _cr_feed_meta (key, value) VALUES ('floor', ?)", (cut,))
    return cut, int(gone_rows), int(gone_bytes)


class UnitBuilder:
    """The body of one log row, built while a record is applied (wire values kept as they came)."""

    __slots__ = ("_entries", "_layouts", "_tables")

    def __init__(self) -> None:
        self._layouts: dict[str, list[Any]] = {}
        self._entries: list[list[Any]] = []
        self._tables: dict[str, None] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def _layout(self, layout_id: str, layout: TableLayout) -> None:
        if layout_id not in self._layouts:
            self._layouts[layout_id] = [layout.table, layout.columns, layout.pk]
            self._tables[layout.table] = None

    def upserts(self, layout_id: str, layout: TableLayout, rows: list[list[Any]], labels: str) -> None:
        """Rows written whole; `labels` "" when all were inserts, else one "i"/"u" per row."""
        self._layout(layout_id, layout)
        self._entries.append(["U", layout_id, rows, labels])

    def delete(self, layout_id: str, layout: TableLayout, key: list[Any]) -> None:
        self._layout(layout_id, layout)
        self._entries.append(["D", layout_id, key])

    def relay(self, table: str, op: str, key: dict[str, Any], row: dict[str, Any]) -> None:
        self._tables[table] = None
        self._entries.append(["R", table, op, key, row])

    def schema(self, table: str) -> None:
        self._tables[table] = None
        self._entries.append(["S", table])

    def tables(self) -> str:
        return "|" + "|".join(self._tables) + "|" if self._tables else "|"

    def body(self) -> bytes:
        return orjson.dumps({"l": self._layouts, "c": self._entries})


# ------------------------------------------------------------------ reading
def head(conn: sqlite3.Connection) -> FeedOffset:
    """The current committed position (feed_id, n of the last complete unit or the floor)."""
    with _read_txn(conn):
        feed_id, floor = _feed(conn)
        return FeedOffset(feed_id, _last_final(conn, floor))


def read_after(
    conn: sqlite3.Connection,
    after: FeedOffset,
    *,
    table: str | None,
    max_units: int = 1000,
    max_bytes: int = 4 << 20,
) -> FeedRead:
    """The units after `after` (of `table`, or of every table for None), whole, in commit order.

    Stops after `max_units` units or once `max_bytes` of log bodies were read (always at least one unit).
    Raises FeedGone when the offset names another feed, lies ahead of the head, or was trimmed; LookupError for
    an internal table name.
    """
    if table is not None:
        _check_name(table)
    with _read_txn(conn):
        feed_id, floor = _feed(conn)
        if after.feed_id != feed_id:
            raise FeedGone(
                f"offset {after} belongs to another history of this agent's copy (the current feed is {feed_id}: "
                f"its database was replaced, resynced or restored)"
            )
        top = _last_final(conn, floor)
        if after.n > top:
            raise FeedGone(f"offset {after} is ahead of the feed (its head is {feed_id}_{top}): unknown offset")
        if after.n < floor:
            raise FeedGone(f"offset {after} is too old: the feed log keeps only what came after {feed_id}_{floor}")
        if after.n > floor:
            row = conn.execute("SELECT final FROM _cr_feed WHERE n = ?", (after.n,)).fetchone()
            if row is None or not row[0]:
                raise FeedGone(f"offset {after} is not the end of a transaction of this feed: unknown offset")
        return _scan(conn, feed_id, after.n, top, table, max(1, max_units), max_bytes)


def snapshot(conn: sqlite3.Connection, table: str) -> TableSnapshot:
    """The table's rows now and the offset to continue from, read in one read transaction.

    Raises LookupError when `table` is not a data table of this copy (unknown, internal, or on_demand: the HTPC
    holds no rows of it). A table without a primary key (written over the relay) keys its rows by `rowid`.
    """
    _check_name(table)
    with _read_txn(conn):
        meta = central_schema.load_tables(conn).get(table)
        if meta is None or meta.visibility != "always":
            raise LookupError(f"{table!r} is not a data table of this copy")
        feed_id, floor = _feed(conn)
        offset = FeedOffset(feed_id, _last_final(conn, floor))
        rows = _table_rows(conn, table, meta.columns, meta.pk)
    return TableSnapshot(FeedSchema(table, meta.columns, meta.types, meta.pk, str(offset)), rows)


# ------------------------------------------------------------------ internals
@contextlib.contextmanager
def _read_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction (or the caller's, if one is open); a missing feed table is a LookupError."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "no such table: _cr_feed" in str(exc):
            raise LookupError("this central file has no feed log (it was never opened by this replicator)") from None
        raise
    finally:
        if own and conn.in_transaction:
            conn.execute("COMMIT")


def _check_name(table: str) -> None:
    if table.lower().startswith(_INTERNAL_PREFIX) or table.lower().startswith("sqlite_"):
        raise LookupError(f"{table!r} is not a data table")


def _meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return dict(conn.execute("SELECT key, value FROM _cr_feed_meta").fetchall())


def _feed(conn: sqlite3.Connection) -> tuple[str, int]:
    meta = _meta(conn)
    feed_id = meta.get("feed_id")
    if not isinstance(feed_id, str):
        raise LookupError("this central file has no feed id yet")
    return feed_id, int(meta.get("floor") or 0)


def _last_final(conn: sqlite3.Connection, floor: int) -> int:
    row = conn.execute("SELECT n FROM _cr_feed WHERE final = 1 ORDER BY n DESC LIMIT 1").fetchone()
    return max(floor, int(row[0])) if row is not None else floor


_CHUNK = 512


def _scan(
    conn: sqlite3.Connection, feed_id: str, after: int, top: int, table: str | None, max_units: int, max_bytes: int
) -> FeedRead:
    if table is None:
        sql = "SELECT n, final, body FROM _cr_feed WHERE n > ? AND n <= ? ORDER BY n LIMIT ?"
        params: tuple[Any, ...] = ()
    else:
        # Rows of other tables are read only for their unit boundary (final), never their bodies.
        sql = (
            "SELECT n, final, CASE WHEN instr(tables, ?1) > 0 THEN body END FROM _cr_feed "
            "WHERE n > ?2 AND n <= ?3 AND (final = 1 OR instr(tables, ?1) > 0) ORDER BY n LIMIT ?4"
        )
        params = (f"|{table}|",)
    units: list[FeedUnit] = []
    bodies: list[bytes] = []
    reached = after
    read_bytes = 0
    cursor = after
    done = False
    while not done and cursor < top:
        chunk = conn.execute(sql, (*params, cursor, top, _CHUNK)).fetchall()
        if not chunk:
            break
        for n, final, body in chunk:
            cursor = n
            if body is not None:
                bodies.append(body)
                read_bytes += len(body)
            if not final:
                continue
            reached = n
            if bodies:
                unit = _unit(n, bodies, table)
                bodies = []
                if unit.changes or unit.schema_changed:
                    units.append(unit)
            if len(units) >= max_units or read_bytes >= max_bytes:
                done = True
                break
    return FeedRead(units, FeedOffset(feed_id, reached), reached >= top)


_OPS = {"i": "insert", "u": "update"}


def _unit(n: int, bodies: Sequence[bytes], table: str | None) -> FeedUnit:
    changes: list[FeedRowChange] = []
    marked: set[str] = set()
    for body in bodies:
        doc = orjson.loads(body)
        layouts: dict[str, Any] = doc["l"]
        shapes: dict[str, tuple[str, list[str], list[int]]] = {}
        for lid, (t, columns, pk) in layouts.items():
            if table is None or t == table:
                shapes[lid] = (t, columns, [columns.index(c) for c in pk])
        for entry in doc["c"]:
            kind = entry[0]
            if kind == "U":
                shape = shapes.get(entry[1])
                if shape is None:
                    continue
                t, columns, pk_at = shape
                labels: str = entry[3]
                for i, values in enumerate(entry[2]):
                    key = {columns[j]: values[j] for j in pk_at}
                    op = _OPS[labels[i]] if labels else "insert"
                    changes.append(FeedRowChange(t, op, key, dict(zip(columns, values, strict=True))))
            elif kind == "D":
                shape = shapes.get(entry[1])
                if shape is None:
                    continue
                t, columns, pk_at = shape
                key = {columns[j]: v for j, v in zip(pk_at, entry[2], strict=True)}
                changes.append(FeedRowChange(t, "delete", key, None))
            elif table is not None and entry[1] != table:
                continue
            elif kind == "R":
                changes.append(FeedRowChange(entry[1], _OPS[entry[2]], entry[3], entry[4]))
            elif kind == "S":
                marked.add(entry[1])
    return FeedUnit(n, tuple(changes), frozenset(marked))


def _table_rows(
    conn: sqlite3.Connection, table: str, columns: tuple[str, ...], pk: tuple[str, ...]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    q = quote_identifier
    cols = ", ".join(map(q, columns))
    sql = f"SELECT rowid, {cols} FROM {q(table)}" if not pk else f"SELECT {cols} FROM {q(table)}"
    raw = fetch_all_text(conn, sql)
    out: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if not pk:
        for r in raw:
            out.append(({"rowid": r[0]}, dict(zip(columns, encode_values(r[1:]), strict=True))))
        return out
    pk_at = [columns.index(c) for c in pk]
    for r in raw:
        values = encode_values(r)
        out.append(({columns[j]: values[j] for j in pk_at}, dict(zip(columns, values, strict=True))))
    return out


__all__ = [
    "FEED_KEEP_BYTES",
    "FEED_KEEP_UNITS",
    "FEED_TRIM_SLACK",
    "FeedGone",
    "FeedPosition",
    "FeedRead",
    "FeedRowChange",
    "FeedUnit",
    "TableSnapshot",
    "UnitBuilder",
    "append",
    "create_schema",
    "head",
    "load_position",
    "read_after",
    "restart_feed_in_file",
    "snapshot",
    "start_new_feed",
    "trim",
]
