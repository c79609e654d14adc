"""Ordered, versioned schema migrations recorded in `_cr_schema_version`.

Each migration runs in its own transaction together with the re-capture of
any replicated table it changed, so the DDL and the new trigger set reach the
change log atomically (a renamed table keeps its visibility; a column of an
`always` table can be dropped: see schema_change.py). Re-running a set is a no-op; an applied migration whose
SQL changed is refused rather than silently diverging.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import catalog, schema_change
from .errors import MigrationConflict, MigrationFailed
from .statements import split_statements

VERSION_TABLE_SQL = """CREATE TABLE IF NOT EXISTS _cr_schema_version (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    checksum TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    sql: str
    name: str = ""

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.strip().encode()).hexdigest()


def init_schema(conn: sqlite3.Connection) -> None:
    """Create `_cr_schema_version` if missing (one statement: atomic on its own)."""
    conn.execute(VERSION_TABLE_SQL)


def _statements(sql: str) -> list[str]:
    """The migration's statements; an incomplete trailing statement is refused, not run."""
    out = split_statements(sql)
    if out and not sqlite3.complete_statement(out[-1] + "\n;"):
        raise MigrationFailed(f"incomplete SQL statement: {out[-1][:80]!r}")
    return out


def check_migrations(migrations: Iterable[Migration]) -> list[Migration]:
    given = list(migrations)
    for m in given:  # before sorting: sorting needs comparable integer versions
        if not isinstance(m, Migration):
            raise MigrationFailed(f"not a Migration: {m!r}")
        if not isinstance(m.version, int) or isinstance(m.version, bool) or m.version < 1:
            raise MigrationFailed(f"migration version must be a positive integer, got {m.version!r}")
    ordered = sorted(given, key=lambda m: m.version)
    seen: set[int] = set()
    for m in ordered:
        if m.version in seen:
            raise MigrationFailed(f"migration version {m.version} given twice")
        if not isinstance(m.sql, str) or not m.sql.strip():
            raise MigrationFailed(f"migration {m.version} has no SQL")
        seen.add(m.version)
    return ordered


def apply_migrations(conn: sqlite3.Connection, migrations: list[Migration]) -> list[int]:
    """Apply the missing migrations in order; returns the versions applied now. Runs on the db thread."""
    applied = {int(r[0]): str(r[1]) for r in conn.execute("SELECT version, checksum FROM _cr_schema_version")}
    highest = max(applied, default=0)
    done: list[int] = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.checksum:
                raise MigrationConflict(
                    f"migration {m.version} ({m.name or 'unnamed'}) was already applied with different SQL; "
                    "add a new migration instead of editing an applied one"
                )
            continue
        if m.version < highest:
            raise MigrationConflict(
                f"migration {m.version} is older than the newest applied migration {highest}; "
                "new migrations must have higher versions"
            )
        conn.execute("BEGIN IMMEDIATE")
        try:
            renames: dict[str, str] = {}
            for stmt in _statements(m.sql):
                schema_change.run_statement(conn, stmt, renames=renames)  # DROP COLUMN of a captured table too
            conn.execute(
                "INSERT INTO _cr_schema_version (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)",
                (m.version, m.name, m.checksum, time.time()),
            )
            catalog.resync_schema(conn, renames)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK")
            raise MigrationFailed(f"migration {m.version} failed and was rolled back: {exc}") from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        done.append(m.version)
        highest = m.version
    return done
