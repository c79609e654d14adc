"""The catalog: this database's identity, its tables' layouts and their visibility.

- `_cr_meta`: the epoch (a random id made with the database) and the agent id
  it belongs to; `init_schema` creates every internal table and refuses a
  database of another agent.
- `_cr_layouts`: every column layout a change in the log refers to (by id).
- `_cr_tables`: the declared visibility of each table, and the layout and SQL
  it was captured with.

The visibility state machine (`apply_visibility`) and `resync_schema` keep the
change log's triggers in step with the catalog and log what the HTPC must
learn (S + snapshot, V, X) through `change_log`. All functions are synchronous
and take a `sqlite3.Connection`; they run on the connection's own thread.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass

from . import change_log
from .errors import AgentStorageError, InvalidIdentifier, MissingPrimaryKey, TableTooWide, UnknownTable
from .identifiers import is_valid_identifier
from .statements import split_statements
from .visibility import Visibility

log = logging.getLogger("agent_client.catalog")

CATALOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS _cr_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
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
"""


@dataclass(frozen=True)
class Layout:
    """A row of `_cr_layouts`: the columns a logged change's values are in."""

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
    """Create the catalog and the change log (idempotent, one transaction) and return this database's epoch.

    A database made for another agent id is refused (InvalidIdentifier).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in split_statements(CATALOG_SCHEMA):
            conn.execute(stmt)
        change_log.create_schema(conn)
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


# ---------------------------------------------------------------------- user tables
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
    if len(info.columns) > change_log.MAX_COLUMNS:
        raise TableTooWide(f"table {info.name!r} has {len(info.columns)} columns; at most {change_log.MAX_COLUMNS}")


# ---------------------------------------------------------------------- layouts
def _insert_layout(conn: sqlite3.Connection, info: TableInfo, visibility: Visibility) -> int:
    cur = conn.execute(
        "INSERT INTO _cr_layouts (tbl, columns, pk, sql, visibility, types) VALUES (?, ?, ?, ?, ?, ?)",
        (info.name, json.dumps(info.columns), json.dumps(info.pk), info.sql, visibility.value, json.dumps(info.types)),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


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


class WidestLayout:
    """`widest_layout`, re-read only when a layout was added since the last call (one per reader).

    Pass the instance as `change_log.read_closed(..., width=...)`: it is called inside the read's snapshot.
    """

    def __init__(self) -> None:
        self._max_id = -1
        self._width = 0

    def __call__(self, conn: sqlite3.Connection) -> int:
        max_id = int(conn.execute("SELECT max(id) FROM _cr_layouts").fetchone()[0] or 0)
        if max_id != self._max_id:
            self._width = widest_layout(conn)
            self._max_id = max_id
        return self._width


# ---------------------------------------------------------------------- visibility
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
    layout_id: int | None
    if visibility is Visibility.ALWAYS:
        check_replicable(info)
        unchanged = known is not None and known[0] is Visibility.ALWAYS and known[2] == info.sql
        if unchanged and change_log.triggers_present(conn, table):
            return False
        layout_id = _insert_layout(conn, info, visibility)
        change_log.create_triggers(conn, info.name, info.columns, info.pk, layout_id)
        change_log.append(conn, layout_id, "S")
        change_log.append_snapshot(conn, layout_id, table, info.columns)
    else:
        if known and known[0] is visibility and (visibility is Visibility.PRIVATE or known[2] == info.sql):
            return False
        change_log.drop_triggers(conn, table)
        if visibility is Visibility.ON_DEMAND:
            if not is_valid_identifier(table):
                raise InvalidIdentifier(f"table name {table!r} cannot be announced (use letters, digits, '_')")
            layout_id = _insert_layout(conn, info, visibility)
            change_log.append(conn, layout_id, "V", ["'on_demand'"])
        else:
            layout_id = None
            if known is not None and known[0] is not Visibility.PRIVATE:
                lid = _insert_layout(conn, info, visibility)
                change_log.append(conn, lid, "X")
        if visibility is Visibility.PRIVATE:
            conn.execute("DELETE FROM _cr_tables WHERE name = ?", (table,))
            return True
    conn.execute(
        "INSERT OR REPLACE INTO _cr_tables (name, visibility, layout, sql) VALUES (?, ?, ?, ?)",
        (table, visibility.value, layout_id, info.sql),
    )
    return True


def _forget(conn: sqlite3.Connection, name: str, visibility: Visibility) -> None:
    """The table `name` is gone: drop its triggers and its declaration; an X makes the HTPC forget it."""
    change_log.drop_triggers(conn, name)
    if visibility is not Visibility.PRIVATE:
        conn.execute(
            "INSERT INTO _cr_layouts (tbl, columns, pk, sql, visibility) VALUES (?, '[]', '[]', NULL, ?)",
            (name, visibility.value),
        )
        lid = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        change_log.append(conn, int(lid), "X")
    conn.execute("DELETE FROM _cr_tables WHERE name = ?", (name,))


def follow_rename(conn: sqlite3.Connection, old: str, new: str) -> bool:
    """The declared table `old` is now called `new`: the visibility follows the table.

    Logs an X for `old` and declares `new` with the same visibility (for `always`: new triggers, S and a
    snapshot), in the caller's transaction. A new name that cannot be replicated (not a plain identifier)
    leaves the table private, with a warning. Returns True if `new` kept the visibility.
    """
    known = current_tables(conn).get(old)
    if known is None:
        return False
    visibility = known[0]
    _forget(conn, old, visibility)  # also drops the triggers named for `old`, which SQLite moved onto `new`
    if visibility is Visibility.PRIVATE:
        return False
    try:
        apply_visibility(conn, new, visibility)
    except AgentStorageError as exc:
        log.warning("table %r was renamed to %r, which stays private: %s", old, new, exc)
        return False
    log.info("table %r was renamed to %r: it stays %s", old, new, visibility.value)
    return True


def _renamed_captures(conn: sqlite3.Connection) -> dict[str, str]:
    """Declared `always` tables renamed since their capture: {old name: new name}.

    SQLite moves a table's triggers with it on RENAME (whoever ran it) and keeps their names, so the
    triggers named for `old` now being on an undeclared table `new` is a rename.
    """
    tables = current_tables(conn)
    out: dict[str, str] = {}
    for name, (vis, _layout, _sql) in tables.items():
        if vis is not Visibility.ALWAYS:
            continue
        now_on = change_log.trigger_table(conn, name)
        if now_on is not None and now_on != name and now_on not in tables:
            out[name] = now_on
    return out


def resync_schema(conn: sqlite3.Connection, renames: dict[str, str] | None = None) -> list[str]:
    """Re-capture every declared table whose definition changed (after a migration or out-of-band DDL).

    A renamed table keeps its visibility (X for the old name, S + snapshot under the new one): recognised by
    its capture triggers for `always` tables, or told by `renames` ({old: new}, from schema_change). A
    dropped table is forgotten (X for replicated ones). Returns the tables touched.
    """
    touched: list[str] = []
    for old, new in {**(renames or {}), **_renamed_captures(conn)}.items():
        if new in current_tables(conn) or old not in current_tables(conn):
            continue
        follow_rename(conn, old, new)
        touched += [old, new]
    existing = set(user_tables(conn))
    for name, (vis, _layout, sql) in current_tables(conn).items():
        if name not in existing:
            _forget(conn, name, vis)
            touched.append(name)
            continue
        info = table_info(conn, name)
        changed = info.sql != sql or (vis is Visibility.ALWAYS and not change_log.triggers_present(conn, name))
        if changed and apply_visibility(conn, name, vis):
            touched.append(name)
    return touched
