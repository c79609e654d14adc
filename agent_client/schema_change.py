"""SQL run through agent_client with the capture kept in step with the schema.

Capture triggers name every column of an `always` table (they copy `NEW.<column>` into the log), and
SQLite refuses `ALTER TABLE t DROP COLUMN x` while any trigger names `x` ("error in trigger _cr_t_ins after
drop column: no such column: NEW.x"). `run_statement` recognises that refusal, drops the table's capture
triggers and runs the statement again; `execute` then, whenever the statement changed the schema, runs
catalog.resync_schema in the same transaction: new triggers and an S + snapshot for a changed table (the
HTPC's copy follows), an X for a dropped one, X + S + snapshot for a renamed one (the visibility follows
the table). Nothing of a change is lost between the two: the snapshot is taken after the statement.

Used by `Transaction.execute`, `AgentStorage.execute`, migrations and `python -m agent_client sql`. Callers
run it inside a write transaction, so the DDL and the re-capture commit together. All functions are
synchronous and take a `sqlite3.Connection` on its own thread.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any

from . import catalog, change_log

#: SQLite's message when a statement breaks a trigger: "error in trigger <name> after drop column: ...".
_TRIGGER_ERROR = re.compile(r"error in trigger (\S+?)(?::| after )")
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)

Params = Sequence[Any] | Mapping[str, Any]


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA schema_version").fetchone()[0])


def rows_as_dicts(cur: sqlite3.Cursor) -> list[dict[str, Any]]:
    if cur.description is None:
        return []
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _capture_in_the_way(conn: sqlite3.Connection, exc: sqlite3.OperationalError) -> str | None:
    """The table whose capture triggers made SQLite refuse a statement, or None if it was something else."""
    match = _TRIGGER_ERROR.search(str(exc))
    return change_log.owner_of_trigger(conn, match.group(1)) if match else None


def run_statement(
    conn: sqlite3.Connection, sql: str, params: Params = (), *, renames: dict[str, str] | None = None
) -> sqlite3.Cursor:
    """`conn.execute(sql, params)`, except that a statement refused because of a capture trigger (ALTER
    TABLE ... DROP COLUMN on an `always` table) is run again once that table's capture triggers are gone.

    With `renames`, an ALTER TABLE that renamed a table adds `{old: new}` to it (chains kept as one: a -> c).
    The caller re-captures afterwards (catalog.resync_schema; `execute` does it).
    """
    tables_before = set(catalog.user_tables(conn)) if renames is not None and _is_alter(sql) else None
    dropped: set[str] = set()
    while True:
        try:
            cur = conn.execute(sql, params)
            break
        except sqlite3.OperationalError as exc:
            table = _capture_in_the_way(conn, exc)
            if table is None or table in dropped:
                raise
            change_log.drop_triggers(conn, table)
            dropped.add(table)
    if tables_before is not None and renames is not None:
        for old, new in _rename_of(tables_before, set(catalog.user_tables(conn))).items():
            first = next((k for k, v in renames.items() if v == old), old)
            renames[first] = new
    return cur


def _is_alter(sql: str) -> bool:
    match = _LEADING_COMMENTS.match(sql)
    return sql[match.end() if match else 0 :][:5].upper() == "ALTER"


def execute(conn: sqlite3.Connection, sql: str, params: Params = ()) -> list[dict[str, Any]]:
    """Run one statement (any SQL) and keep the capture in step if it changed the schema; rows as dicts."""
    before = schema_version(conn)
    renames: dict[str, str] = {}
    rows = rows_as_dicts(run_statement(conn, sql, params, renames=renames))
    if schema_version(conn) != before:
        catalog.resync_schema(conn, renames)
    return rows


def _rename_of(before: set[str], after: set[str]) -> dict[str, str]:
    """{old: new} when, across one ALTER TABLE, exactly one table went and one came: a RENAME TO (how an
    `on_demand` table's rename is told; an `always` table's is recognised by its triggers, whoever ran it)."""
    gone, came = before - after, after - before
    return {gone.pop(): came.pop()} if len(gone) == 1 and len(came) == 1 else {}
