"""The local change log `_cr_log` and its clock `_cr_clock`: capture triggers, groups, reads, trim.

Capture is done by SQLite triggers, so a write from *any* connection (the
sqlite3 CLI included) lands in `_cr_log` inside the writer's own transaction.
Row images are copied value-for-value into untyped columns `v0..vN`, which
keeps every SQLite storage class bit-exact (JSON inside SQL would round REALs
and cannot hold BLOBs).

Transaction grouping: each trigger stamps its rows with the current value of
`_cr_clock.tx`. The clock advances only at the end of a transaction
(`CLOSE_GROUP_SQL`: the agent's own writer runs it as the last statement of
each of its transactions; the publisher closes the group of rows another
process wrote), so every local transaction's rows share one stamp, and a
stamp below the current clock belongs to a closed group that will never
grow. A closed group is published as one record (or as parts of one central
transaction), which keeps both atomicity and deterministic `Nats-Msg-Id`s
across restarts.

Message ids: `_cr_secret` holds 32 random bytes made once per database (at
the first open, or the first open by a build that knows it). They key the
HMAC in every record's `Nats-Msg-Id` (change_record.msg_id), so ids stay
stable across restarts and nobody without the database can compute them.
The secret is never published nor shown. `_cr_msg_nonce` remembers the
fresh id of a record whose own id JetStream reported as already taken (see
publisher.py), until the record is trimmed.

Which tables are captured, and with which layout, is the catalog's business
(`catalog.py`); this module only takes plain names and layout ids. All
functions are synchronous and take a `sqlite3.Connection`; they run on the
connection's own thread.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .change_record import RESYNC_LAYOUT_ID, fetch_all_text
from .errors import LocalDatabaseError
from .identifiers import quote_identifier
from .statements import split_statements

#: The widest row image the log can hold (value columns v0..v{MAX_COLUMNS-1}).
MAX_COLUMNS = 100
_VALUE_COLUMNS = ", ".join(f"v{i}" for i in range(MAX_COLUMNS))
# (julianday - unix epoch) in seconds, with sub-second precision, in plain SQL.
NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"
# The open group's stamp, read inside the writer's transaction.
_CLOCK_SQL = "(SELECT tx FROM _cr_clock WHERE id = 1)"

LOG_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS _cr_clock (id INTEGER PRIMARY KEY CHECK (id = 1), tx INTEGER NOT NULL);
INSERT OR IGNORE INTO _cr_clock (id, tx) VALUES (1, 1);
CREATE TABLE IF NOT EXISTS _cr_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tx INTEGER NOT NULL,
    layout INTEGER NOT NULL,
    op TEXT NOT NULL,
    at REAL NOT NULL,
    {_VALUE_COLUMNS}
);
"""

#: Bytes of the message id secret in `_cr_secret`.
SECRET_BYTES = 32
_SECRET_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _cr_secret "
    "(id INTEGER PRIMARY KEY CHECK (id = 1), key BLOB NOT NULL CHECK (length(key) >= 16))"
)
_NONCE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _cr_msg_nonce "
    "(first INTEGER NOT NULL, last INTEGER NOT NULL, nonce TEXT NOT NULL, PRIMARY KEY (first, last)) WITHOUT ROWID"
)

#: Closes the open transaction group (the last statement of every transaction of the agent's writer; the
#: publisher runs it alone for rows written by another process).
CLOSE_GROUP_SQL = "UPDATE _cr_clock SET tx = tx + 1 WHERE id = 1"

#: A row of `_cr_log` as read back: (seq, tx, layout, op, at, v0, v1, ...).
LogRow = tuple[Any, ...]


def create_schema(conn: sqlite3.Connection) -> None:
    """Create `_cr_clock`, `_cr_log` and `_cr_secret` (with a new secret) if missing, in the caller's transaction."""
    for stmt in split_statements(LOG_SCHEMA):
        conn.execute(stmt)
    conn.execute(_SECRET_SCHEMA)
    conn.execute(_NONCE_SCHEMA)
    conn.execute("INSERT OR IGNORE INTO _cr_secret (id, key) VALUES (1, ?)", (secrets.token_bytes(SECRET_BYTES),))


def msg_id_secret(conn: sqlite3.Connection) -> bytes:
    """The key of this database's message ids (made by `create_schema`; never leaves the database)."""
    row = conn.execute("SELECT key FROM _cr_secret WHERE id = 1").fetchone()
    if row is None or not isinstance(row[0], bytes):
        raise LocalDatabaseError("the change log has no message id secret (_cr_secret): reopen the storage")
    return row[0]


def msg_id_nonces(conn: sqlite3.Connection) -> dict[tuple[int, int], str]:
    """The fresh-id nonces of records still in the log, keyed by (first, last) seq."""
    return {(int(r[0]), int(r[1])): str(r[2]) for r in conn.execute("SELECT first, last, nonce FROM _cr_msg_nonce")}


def save_msg_id_nonces(conn: sqlite3.Connection, nonces: Mapping[tuple[int, int], str]) -> None:
    """Remember fresh-id nonces (before the record is published under its fresh id)."""
    conn.executemany(
        "INSERT OR REPLACE INTO _cr_msg_nonce (first, last, nonce) VALUES (?, ?, ?)",
        [(first, last, nonce) for (first, last), nonce in nonces.items()],
    )


def forget_msg_id_nonces(conn: sqlite3.Connection, acked: int) -> None:
    """Drop the nonces of records acknowledged up to `acked` (they are never published again)."""
    conn.execute("DELETE FROM _cr_msg_nonce WHERE last <= ?", (acked,))


# ---------------------------------------------------------------------- capture
def _trigger_names(table: str) -> list[str]:
    return [f"_cr_{table}_{kind}" for kind in ("ins", "upd", "del")]


def _insert_sql(layout_id: int, op: str, values: Sequence[str]) -> str:
    cols = ", ".join(f"v{i}" for i in range(len(values)))
    sep = ", " if values else ""
    return (
        f"INSERT INTO _cr_log (tx, layout, op, at{sep}{cols}) VALUES "
        f"({_CLOCK_SQL}, {layout_id}, '{op}', {NOW_SQL}{sep}{', '.join(values)})"
    )


def drop_triggers(conn: sqlite3.Connection, table: str) -> None:
    for name in _trigger_names(table):
        conn.execute(f"DROP TRIGGER IF EXISTS {quote_identifier(name)}")


#: Written into every capture trigger; triggers without the current marker are recreated at the next open
#: (with a fresh snapshot of the table), so a database made by an older build gets the current capture rules.
CAPTURE_VERSION = 2
_CAPTURE_MARK = f"/* capture v{CAPTURE_VERSION} */"


def _differs(column: str) -> str:
    """True when a column's old and new values differ in any way the central copy must see.

    `IS NOT` alone compares with the column's collation and numerically: 'a' -> 'A' under NOCASE and
    0 -> 0.0 (an INTEGER becoming a REAL) would look unchanged and never be captured.
    """
    q = quote_identifier(column)
    return f"(OLD.{q} IS NOT NEW.{q} COLLATE BINARY OR typeof(OLD.{q}) IS NOT typeof(NEW.{q}))"


def create_triggers(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], pk: Sequence[str], layout_id: int
) -> None:
    """(Re)create the three capture triggers of a replicated table for one layout.

    INSERT logs the new row image (U); DELETE logs the old key (D); an UPDATE
    that changes anything (value, storage class, or bytes a collation would
    call equal) logs the new image, preceded by a D of the old key when the
    primary key itself changed. An UPDATE that changes nothing logs nothing.
    """
    drop_triggers(conn, table)
    q = quote_identifier
    target = q(table)
    ins, upd, dele = (q(n) for n in _trigger_names(table))
    new_row = [f"NEW.{q(c)}" for c in columns]
    old_key = [f"OLD.{q(c)}" for c in pk]
    key_changed = " OR ".join(_differs(c) for c in pk)
    any_changed = " OR ".join(_differs(c) for c in columns)
    old_key_select = _insert_sql(layout_id, "D", old_key).replace(" VALUES (", " SELECT ", 1)
    old_key_select = old_key_select[:-1] + f" WHERE {key_changed}"
    mark = _CAPTURE_MARK
    conn.execute(
        f"CREATE TRIGGER {ins} {mark} AFTER INSERT ON {target} BEGIN {_insert_sql(layout_id, 'U', new_row)}; END"
    )
    conn.execute(
        f"CREATE TRIGGER {upd} {mark} AFTER UPDATE ON {target} WHEN {any_changed} BEGIN "
        f"{old_key_select}; {_insert_sql(layout_id, 'U', new_row)}; END"
    )
    conn.execute(
        f"CREATE TRIGGER {dele} {mark} AFTER DELETE ON {target} BEGIN {_insert_sql(layout_id, 'D', old_key)}; END"
    )


def trigger_table(conn: sqlite3.Connection, table: str) -> str | None:
    """The table the capture triggers made for `table` are on now (None if there are none).

    SQLite's `ALTER TABLE t RENAME TO u` moves a table's triggers with it and keeps their names, so the
    triggers named for `t` being on `u` is how a rename made by any connection is recognised.
    """
    row = conn.execute(
        "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' AND name = ?", (_trigger_names(table)[0],)
    ).fetchone()
    return str(row[0]) if row else None


def owner_of_trigger(conn: sqlite3.Connection, trigger: str) -> str | None:
    """The table a capture trigger (`_cr_<table>_ins|upd|del`) is on, or None if `trigger` is not one of ours."""
    row = conn.execute(
        "SELECT tbl_name FROM sqlite_master WHERE type = 'trigger' AND name = ? AND instr(sql, '_cr_log') > 0",
        (trigger,),
    ).fetchone()
    return str(row[0]) if row else None


def triggers_present(conn: sqlite3.Connection, table: str) -> bool:
    """Are the table's three capture triggers there, made by the current capture rules?"""
    names = _trigger_names(table)
    rows = conn.execute(
        f"SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({', '.join('?' * len(names))}) "
        "AND instr(sql, ?) > 0",
        (*names, _CAPTURE_MARK),
    ).fetchone()
    return int(rows[0]) == len(names)


def append(conn: sqlite3.Connection, layout_id: int, op: str, values_sql: Sequence[str] = ()) -> None:
    """Log one change (S, V, X) in the open group; `values_sql` are SQL expressions (e.g. `'on_demand'`)."""
    conn.execute(_insert_sql(layout_id, op, values_sql))


def append_resync(conn: sqlite3.Connection, request_id: str) -> int:
    """Log a resync (R, layout 0, values = [request_id]) in the open group; returns its seq."""
    cur = conn.execute(
        f"INSERT INTO _cr_log (tx, layout, op, at, v0) VALUES ({_CLOCK_SQL}, {RESYNC_LAYOUT_ID}, 'R', {NOW_SQL}, ?)",
        (request_id,),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def forget_before(conn: sqlite3.Connection, seq: int) -> int:
    """Delete every log row (and fresh-id nonce) below `seq`: a resync's snapshot supersedes them.

    Returns how many rows went. Rows already acknowledged but not yet trimmed go too (trim would delete them).
    """
    cur = conn.execute("DELETE FROM _cr_log WHERE seq < ?", (seq,))
    conn.execute("DELETE FROM _cr_msg_nonce WHERE first < ?", (seq,))
    return int(cur.rowcount)


def append_snapshot(conn: sqlite3.Connection, layout_id: int, table: str, columns: Sequence[str]) -> None:
    """Log every current row of `table` as an upsert (U) in the open group: the snapshot after an S."""
    cols = ", ".join(f"v{i}" for i in range(len(columns)))
    src = ", ".join(quote_identifier(c) for c in columns)
    conn.execute(
        f"INSERT INTO _cr_log (tx, layout, op, at, {cols}) SELECT {_CLOCK_SQL}, "
        f"{layout_id}, 'U', {NOW_SQL}, {src} FROM {quote_identifier(table)}"
    )


# ---------------------------------------------------------------------- groups
def close_group(conn: sqlite3.Connection) -> None:
    """Close the open transaction group: rows logged from now on get the next stamp."""
    conn.execute(CLOSE_GROUP_SQL)


def open_group_has_rows(conn: sqlite3.Connection) -> bool:
    # tx never decreases along seq, so the newest row tells whether the open group has rows.
    row = conn.execute(f"SELECT (SELECT tx FROM _cr_log ORDER BY seq DESC LIMIT 1) >= {_CLOCK_SQL}").fetchone()
    return bool(row[0])


# ---------------------------------------------------------------------- reading
def read_closed(
    conn: sqlite3.Connection, cursor: int, limit: int, width: Callable[[sqlite3.Connection], int]
) -> list[LogRow]:
    """Up to `limit` rows of closed groups after `cursor`, in seq order, each `(seq, tx, layout, op, at, v0..)`.

    Only `width(conn)` value columns are read (the widest layout's column
    count); it is called inside the SAME read snapshot as the rows, since a
    width read in another snapshot could miss a layout committed in between
    and cut its rows short.
    """
    return read_log(conn, cursor, limit, width)[0]


def read_log(
    conn: sqlite3.Connection, cursor: int, limit: int, width: Callable[[sqlite3.Connection], int]
) -> tuple[list[LogRow], bool]:
    """`read_closed`, and whether the open group has rows, both in one read snapshot.

    The open group is looked at only when fewer than `limit` rows came back (all that is closed was read):
    the publisher then knows, with no second read, whether rows of another process wait for their group to
    be closed (its own commits close their group themselves).
    """
    conn.execute("BEGIN")
    try:
        cols = "".join(f", v{i}" for i in range(max(width(conn), 1)))
        rows = fetch_all_text(
            conn,
            f"SELECT seq, tx, layout, op, at{cols} FROM _cr_log "
            f"WHERE seq > ? AND tx < {_CLOCK_SQL} ORDER BY seq LIMIT ?",
            (cursor, limit),
        )
        has_open = len(rows) < limit and open_group_has_rows(conn)
    finally:
        conn.execute("COMMIT")
    return rows, has_open


def bounds(conn: sqlite3.Connection) -> tuple[int, int]:
    """(oldest seq still in the log or 0, newest committed seq)."""
    row = conn.execute("SELECT min(seq) FROM _cr_log").fetchone()
    return int(row[0] or 0), last_committed_seq(conn)


def last_committed_seq(conn: sqlite3.Connection) -> int:
    """The newest seq ever logged (trimmed or not): AUTOINCREMENT keeps it in sqlite_sequence."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'").fetchone()
    return int(row[0]) if row else 0


def backlog(conn: sqlite3.Connection, acked: int) -> tuple[int, float | None]:
    """(newest committed seq, time the oldest change after `acked` was logged, or None)."""
    last = last_committed_seq(conn)
    row = conn.execute("SELECT at FROM _cr_log WHERE seq > ? ORDER BY seq LIMIT 1", (acked,)).fetchone()
    return last, (float(row[0]) if row else None)


def trim(conn: sqlite3.Connection, acked: int) -> None:
    """Delete the log rows up to `acked` (only ever after their PubAck)."""
    conn.execute("DELETE FROM _cr_log WHERE seq <= ?", (acked,))
