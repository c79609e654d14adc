"""`python -m agent_client`: what another process may do to an agent database that the sqlite3 shell cannot.

    python -m agent_client sql DB "ALTER TABLE t DROP COLUMN x"   # SQL with the capture kept in step
    python -m agent_client vacuum DB                              # give free pages back (incremental auto-vacuum)

`sql` runs its statements in ONE transaction through schema_change.execute, the path AgentStorage uses: a
column of an `always` table can be dropped (SQLite refuses that in the plain shell while the capture
triggers name the column), a renamed table keeps its visibility, and the change log gets the S + snapshot
(or X) the HTPC needs, in the same transaction. The agent may be running meanwhile: its publisher picks the
changes up like any other write. Rows of the last statement are printed as JSON lines, values in the wire
form (`{"b": base64}` for a BLOB, `{"t": base64}` for TEXT that is not UTF-8).

`vacuum` converts a database made before incremental auto-vacuum (one VACUUM; run it with the agent
stopped, VACUUM holds the write lock until it is done), or gives the free pages of one that has it back.

Exit status: 0 done, 1 the database refused (nothing was changed), 2 bad usage or not an agent database.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

import orjson

from . import disk_space, schema_change
from .change_record import encode_values
from .errors import AgentStorageError
from .local_store import connect
from .statements import split_statements


class _NotAnAgentDatabase(Exception):
    pass


def _open(path: Path) -> sqlite3.Connection:
    """The agent database at `path` with the agent's connection policy; anything else is refused untouched."""
    if not path.is_file():
        raise _NotAnAgentDatabase(f"{path}: no such file")
    probe = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # looks without changing anything (WAL, pragmas)
    try:
        found = probe.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_cr_meta'").fetchone()
    except sqlite3.DatabaseError as exc:
        raise _NotAnAgentDatabase(f"{path}: not a SQLite database ({exc})") from None
    finally:
        probe.close()
    if found is None:
        raise _NotAnAgentDatabase(f"{path}: not an agent database (no _cr_meta table)")
    return connect(path)


def _sql(path: Path, script: str) -> int:
    statements = split_statements(script)
    if not statements:
        print("nothing to run: the SQL is empty", file=sys.stderr)
        return 2
    conn = _open(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            rows: list[dict[str, object]] = []
            for statement in statements:
                rows = schema_change.execute(conn, statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()
    for row in rows:
        values = encode_values(row.values())  # type: ignore[arg-type]
        print(orjson.dumps(dict(zip(row.keys(), values, strict=True))).decode())
    return 0


def _vacuum(path: Path) -> int:
    conn = _open(path)
    try:
        before = disk_space.space(conn)
        if before.auto_vacuum == "incremental":
            conn.execute("BEGIN IMMEDIATE")
            while disk_space.reclaim(conn) > 0:
                pass
            conn.execute("COMMIT")
        else:
            disk_space.convert(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        after = disk_space.space(conn)
    finally:
        conn.close()
    print(
        f"{path}: {before.file_bytes} -> {after.file_bytes} bytes, auto_vacuum {before.auto_vacuum} -> "
        f"{after.auto_vacuum}, {after.free_pages} free page(s) left"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent_client", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sql = sub.add_parser("sql", help="run SQL (DDL included) on an agent database, capture kept in step")
    sql.add_argument("db", type=Path, help="the agent database (data_dir/<agent_id>.db)")
    sql.add_argument("sql", help="one or more statements, run in one transaction")
    vac = sub.add_parser("vacuum", help="give free pages back to the file system (agent stopped)")
    vac.add_argument("db", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "sql":
            return _sql(args.db, args.sql)
        return _vacuum(args.db)
    except _NotAnAgentDatabase as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (sqlite3.Error, AgentStorageError) as exc:
        print(f"error: {exc} (nothing was changed)", file=sys.stderr)
        return 1
