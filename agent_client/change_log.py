"""The local change log: internal tables, capture triggers, and reading it back.

Capture is done by SQLite triggers, so a write from *any* connection (the
sqlite3 CLI included) lands in `_cr_log` inside the writer's own transaction.
Row images are copied value-for-value into untyped columns `v0..vN`, which
keeps every SQLite storage class bit-exact (JSON inside SQL would round REALs
and cannot hold BLOBs).

Transaction grouping: each trigger stamps its rows with the current value of
`_cr_clock.tx`. Only the publisher advances that clock (through the writer
queue), so every local transaction's rows share one stamp, and a stamp below
the current clock belongs to a closed group that will never grow. A closed
group is published as one record (or as parts of one central transaction),
which keeps both atomicity and deterministic `Nats-Msg-Id`s across restarts.

All functions here are synchronous and take a `sqlite3.Connection`; they run
on the connection's own thread.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass

from .errors import InvalidIdentifier, MissingPrimaryKey, TableTooWide, UnknownTable
from .identifiers import is_valid_identifier, quote_identifier
from .visibility import Visibility

MAX_COLUMNS = 100
_VALUE_COLUMNS = ", ".join(f"v{i}" for i in range(MAX_COLUMNS))
# (julianday - unix epoch) in seconds, with sub-second precision, in plain SQL.
NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"

INTERNAL_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS _cr_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _cr_clock (id INTEGER PRIMARY KEY CHECK (id = 1), tx INTEGER NOT NULL);
INSERT OR IGNORE INTO _cr_clock (id, tx) VALUES (1, 1);
CREATE TABLE IF NOT EXISTS _cr_layouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    columns TEXT NOT NULL,
    pk TEXT NOT NULL,
    sql TEXT,
    visibility TEXT NOT NULL,
    types TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS _cr_tables (
    name TEXT PRIMARY KEY,
    visibility TEXT NOT NULL,
    layout INTEGER,
    sql TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _cr_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    tx INTEGER NOT NULL,
    layout INTEGER NOT NULL,
    op TEXT NOT NULL,
    at REAL NOT NULL,
    {_VALUE_COLUMNS}
);
CREATE TABLE IF NOT EXISTS _cr_schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at REAL NOT NULL
);
"""


#: Run by the publisher (through the writer queue): closes the open transaction group.
CLOSE_GROUP_SQL = "UPDATE _cr_clock SET tx = tx + 1 WHERE id = 1"


@dataclass(frozen=True)
class Layout:
    id: int
    table: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    sql: str | None
    visibility: str
    types: tuple[str, ...] = ()


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    sql: str
    types: tuple[str, ...]
    integer_pk: bool  # single INTEGER PRIMARY KEY (a rowid alias): SQLite can assign it


def init_schema(conn: sqlite3.Connection, agent_id: str) -> str:
    """Create the internal tables (idempotent) and return this database's epoch."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _split_statements(INTERNAL_SCHEMA):
            conn.execute(stmt)
        layout_cols = {str(r[1]) for r in conn.execute("PRAGMA table_info(_cr_layouts)")}
        if "types" not in layout_cols:  # databases made before layouts carried declared types
            conn.execute("ALTER TABLE _cr_layouts ADD COLUMN types TEXT NOT NULL DEFAULT '[]'")
        row = conn.execute("SELECT value FROM _cr_meta WHERE key = 'epoch'").fetchone()
        if row is None:
            epoch = secrets.token_hex(8)
            conn.execute("INSERT INTO _cr_meta (key, value) VALUES ('epoch', ?)", (epoch,))
            conn.execute("INSERT INTO _cr_meta (key, value) VALUES ('agent_id', ?)", (agent_id,))
            conn.execute("INSERT INTO _cr_meta (key, value) VALUES ('created_at', ?)", (time.time(),))
        else:
            epoch = str(row[0])
            owner = conn.execute("SELECT value FROM _cr_meta WHERE key = 'agent_id'").fetchone()
            if owner is not None and owner[0] != agent_id:
                raise InvalidIdentifier(
                    f"database belongs to agent {owner[0]!r}, not {agent_id!r}; refusing to mix histories"
                )
        conn.execute("COMMIT")
        return epoch
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _split_statements(script: str) -> list[str]:
    out: list[str] = []
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def table_info(conn: sqlite3.Connection, table: str) -> TableInfo:
    """Describe a user table, or raise UnknownTable."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    if row is None or table.startswith(("sqlite_", "_cr_")):
        raise UnknownTable(f"no table named {table!r} in the agent database")
    cols = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (table,)).fetchall()
    columns = tuple(str(c[0]) for c in cols)
    pk_cols = sorted((int(c[2]), str(c[0])) for c in cols if int(c[2]) > 0)
    pk = tuple(name for _, name in pk_cols)
    integer_pk = len(pk) == 1 and any(c[0] == pk[0] and str(c[1]).upper() == "INTEGER" for c in cols)
    types = tuple(str(c[1] or "") for c in cols)
    return TableInfo(name=table, columns=columns, pk=pk, sql=str(row[0]), types=types, integer_pk=integer_pk)


def user_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' "
        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_cr\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def check_replicable(info: TableInfo) -> None:
    if not is_valid_identifier(info.name):
        raise InvalidIdentifier(f"table name {info.name!r} cannot be replicated (use letters, digits, '_')")
    for col in info.columns:
        if not is_valid_identifier(col):
            raise InvalidIdentifier(f"column {info.name}.{col} cannot be replicated (use letters, digits, '_')")
    if not info.pk:
        raise MissingPrimaryKey(
            f"table {info.name!r} has no PRIMARY KEY; replicated (always) tables need one to address rows"
        )
    if len(info.columns) > MAX_COLUMNS:
        raise TableTooWide(f"table {info.name!r} has {len(info.columns)} columns; at most {MAX_COLUMNS}")


def _insert_layout(conn: sqlite3.Connection, info: TableInfo, visibility: Visibility) -> int:
    cur = conn.execute(
        "INSERT INTO _cr_layouts (tbl, columns, pk, sql, visibility, types) VALUES (?, ?, ?, ?, ?, ?)",
        (info.name, json.dumps(info.columns), json.dumps(info.pk), info.sql, visibility.value, json.dumps(info.types)),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _trigger_names(table: str) -> list[str]:
    return [f"_cr_{table}_{kind}" for kind in ("ins", "upd", "del")]


def drop_triggers(conn: sqlite3.Connection, table: str) -> None:
    for name in _trigger_names(table):
        conn.execute(f"DROP TRIGGER IF EXISTS {quote_identifier(name)}")


def _log_insert(layout_id: int, op: str, values: list[str]) -> str:
    cols = ", ".join(f"v{i}" for i in range(len(values)))
    sep = ", " if values else ""
    return (
        f"INSERT INTO _cr_log (tx, layout, op, at{sep}{cols}) VALUES "
        f"((SELECT tx FROM _cr_clock WHERE id = 1), {layout_id}, '{op}', {NOW_SQL}{sep}{', '.join(values)})"
    )


def create_triggers(conn: sqlite3.Connection, info: TableInfo, layout_id: int) -> None:
    """(Re)create the three capture triggers of an `always` table for one layout."""
    drop_triggers(conn, info.name)
    q = quote_identifier
    table = q(info.name)
    ins, upd, dele = (q(n) for n in _trigger_names(info.name))
    new_row = [f"NEW.{q(c)}" for c in info.columns]
    old_key = [f"OLD.{q(c)}" for c in info.pk]
    key_changed = " OR ".join(f"OLD.{q(c)} IS NOT NEW.{q(c)}" for c in info.pk)
    any_changed = " OR ".join(f"OLD.{q(c)} IS NOT NEW.{q(c)}" for c in info.columns)
    old_key_select = _log_insert(layout_id, "D", old_key).replace(" VALUES (", " SELECT ", 1)
    old_key_select = old_key_select[:-1] + f" WHERE {key_changed}"
    conn.execute(f"CREATE TRIGGER {ins} AFTER INSERT ON {table} BEGIN {_log_insert(layout_id, 'U', new_row)}; END")
    conn.execute(
        f"CREATE TRIGGER {upd} AFTER UPDATE ON {table} WHEN {any_changed} BEGIN "
        f"{old_key_select}; {_log_insert(layout_id, 'U', new_row)}; END"
    )
    conn.execute(f"CREATE TRIGGER {dele} AFTER DELETE ON {table} BEGIN {_log_insert(layout_id, 'D', old_key)}; END")


def current_tables(conn: sqlite3.Connection) -> dict[str, tuple[Visibility, int | None, str | None]]:
    rows = conn.execute("SELECT name, visibility, layout, sql FROM _cr_tables").fetchall()
    return {str(r[0]): (Visibility(r[1]), r[2], r[3]) for r in rows}


def apply_visibility(conn: sqlite3.Connection, table: str, visibility: Visibility) -> bool:
    """Make `table` have `visibility` inside the caller's transaction. Returns True if anything changed.

    `always`: a new layout, fresh triggers, a schema change (S) and a snapshot of
    every current row, all stamped into the log at once. `on_demand`: no
    triggers; a V change tells the HTPC the table exists but stays here.
    `private`: no triggers; an X change (only if the HTPC knew the table) makes
    it forget the table.
    """
    info = table_info(conn, table)
    known = current_tables(conn).get(table)
    if visibility is Visibility.ALWAYS:
        check_replicable(info)
        if known and known[0] is Visibility.ALWAYS and known[2] == info.sql and _triggers_present(conn, table):
            return False
        layout_id = _insert_layout(conn, info, visibility)
        create_triggers(conn, info, layout_id)
        conn.execute(_log_insert(layout_id, "S", []))
        cols = ", ".join(f"v{i}" for i in range(len(info.columns)))
        src = ", ".join(quote_identifier(c) for c in info.columns)
        conn.execute(
            f"INSERT INTO _cr_log (tx, layout, op, at, {cols}) SELECT (SELECT tx FROM _cr_clock WHERE id = 1), "
            f"{layout_id}, 'U', {NOW_SQL}, {src} FROM {quote_identifier(table)}"
        )
    else:
        if known and known[0] is visibility and (visibility is Visibility.PRIVATE or known[2] == info.sql):
            return False
        drop_triggers(conn, table)
        if visibility is Visibility.ON_DEMAND:
            if not is_valid_identifier(table):
                raise InvalidIdentifier(f"table name {table!r} cannot be announced (use letters, digits, '_')")
            layout_id = _insert_layout(conn, info, visibility)
            conn.execute(_log_insert(layout_id, "V", ["'on_demand'"]))
        else:
            layout_id = None
            if known is not None and known[0] is not Visibility.PRIVATE:
                lid = _insert_layout(conn, info, visibility)
                conn.execute(_log_insert(lid, "X", []))
        if visibility is Visibility.PRIVATE:
            conn.execute("DELETE FROM _cr_tables WHERE name = ?", (table,))
            return True
        conn.execute(
            "INSERT OR REPLACE INTO _cr_tables (name, visibility, layout, sql) VALUES (?, ?, ?, ?)",
            (table, visibility.value, layout_id, info.sql),
        )
        return True
    conn.execute(
        "INSERT OR REPLACE INTO _cr_tables (name, visibility, layout, sql) VALUES (?, ?, ?, ?)",
        (table, visibility.value, layout_id, info.sql),
    )
    return True


def _triggers_present(conn: sqlite3.Connection, table: str) -> bool:
    names = _trigger_names(table)
    rows = conn.execute(
        f"SELECT count(*) FROM sqlite_master WHERE type = 'trigger' AND name IN ({', '.join('?' * len(names))})",
        names,
    ).fetchone()
    return int(rows[0]) == len(names)


def resync_schema(conn: sqlite3.Connection) -> list[str]:
    """Re-capture every declared table whose definition changed (after a migration or out-of-band DDL).

    A dropped table is forgotten (X for replicated ones). Returns the tables touched.
    """
    touched: list[str] = []
    existing = set(user_tables(conn))
    for name, (vis, _layout, sql) in current_tables(conn).items():
        if name not in existing:
            drop_triggers(conn, name)
            if vis is not Visibility.PRIVATE:
                conn.execute(
                    "INSERT INTO _cr_layouts (tbl, columns, pk, sql, visibility) VALUES (?, '[]', '[]', NULL, ?)",
                    (name, vis.value),
                )
                lid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                conn.execute(_log_insert(int(lid), "X", []))
            conn.execute("DELETE FROM _cr_tables WHERE name = ?", (name,))
            touched.append(name)
            continue
        info = table_info(conn, name)
        changed = info.sql != sql or (vis is Visibility.ALWAYS and not _triggers_present(conn, name))
        if changed and apply_visibility(conn, name, vis):
            touched.append(name)
    return touched


def load_layouts(conn: sqlite3.Connection, ids: set[int]) -> dict[int, Layout]:
    if not ids:
        return {}
    rows = conn.execute(
        "SELECT id, tbl, columns, pk, sql, visibility, types FROM _cr_layouts "
        f"WHERE id IN ({', '.join('?' * len(ids))})",
        sorted(ids),
    ).fetchall()
    return {
        int(r[0]): Layout(
            int(r[0]),
            str(r[1]),
            tuple(json.loads(r[2])),
            tuple(json.loads(r[3])),
            r[4],
            str(r[5]),
            tuple(json.loads(r[6])),
        )
        for r in rows
    }


def widest_layout(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(json_array_length(columns)) FROM _cr_layouts").fetchone()
    return int(row[0] or 0)


def last_committed_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'").fetchone()
    return int(row[0]) if row else 0
