"""Read-only SQL for other agents: the one place that runs SQL nobody here wrote.

Used by the agent (answering `on_demand` queries) and by the HTPC (the relay
query endpoint). Read-only by construction: a read-only connection *and* an
authorizer that allows only reads of permitted tables and plain functions.
Bounded in time (a progress handler interrupts it) and in rows; parameters are
always bound, never spliced into the text.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .change_record import encode_value
from .errors import QueryError, QueryRejected, QueryTimeout

#: Functions that reach outside the database or change the connection.
_DENIED_FUNCTIONS = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})

TablePolicy = Callable[[str, str], bool]  # (schema name, table name) -> may it be read?

_SCHEMA_TABLES = ("sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema")
MAX_VALUE_BYTES = 16 * 1024 * 1024  # SQLITE_LIMIT_LENGTH for query connections: no giant blobs in memory

QueryParams = Sequence[Any] | Mapping[str, Any] | None


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
    denied: list[str] = field(default_factory=list)


Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


def _authorizer(policy: TablePolicy, denied: list[str]) -> Authorizer:
    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, _src: str | None) -> int:
        if action == sqlite3.SQLITE_SELECT or action == sqlite3.SQLITE_RECURSIVE:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            if arg1 is not None and policy(db or "main", arg1):
                return sqlite3.SQLITE_OK
            if arg1 in _SCHEMA_TABLES and arg2 == "ROWID":
                return sqlite3.SQLITE_OK  # SQLite's own lookup when a table-valued function is first used
            denied.append(f"read of {db}.{arg1}")
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES:
            # Registering an eponymous virtual table (json_each, pragma_table_info) on first use is
            # authorized as an UPDATE of the schema table; a real one is impossible here (PRAGMA
            # writable_schema is denied and the connection is read-only).
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            if (arg2 or "").lower() in _DENIED_FUNCTIONS:
                denied.append(f"function {arg2}")
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        denied.append(_ACTION_NAMES.get(action, f"action {action}"))
        return sqlite3.SQLITE_DENY

    return authorize


_ACTION_NAMES = {
    getattr(sqlite3, name): name.removeprefix("SQLITE_").lower().replace("_", " ")
    for name in dir(sqlite3)
    if name.startswith(("SQLITE_CREATE", "SQLITE_DROP", "SQLITE_ALTER"))
    or name
    in (
        "SQLITE_INSERT",
        "SQLITE_UPDATE",
        "SQLITE_DELETE",
        "SQLITE_PRAGMA",
        "SQLITE_ATTACH",
        "SQLITE_DETACH",
        "SQLITE_TRANSACTION",
        "SQLITE_SAVEPOINT",
        "SQLITE_REINDEX",
        "SQLITE_ANALYZE",
    )
}


def run_read_only(
    conn: sqlite3.Connection,
    sql: str,
    params: QueryParams,
    *,
    policy: TablePolicy,
    timeout_s: float,
    max_rows: int,
) -> QueryResult:
    """Run one read-only statement on `conn` (opened read-only by the caller)."""
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("query must be a non-empty SQL string")
    if params is None:
        params = ()
    if not isinstance(params, Mapping | list | tuple):
        raise QueryError("params must be a list (positional ?) or an object (named :name)")
    for value in params.values() if isinstance(params, Mapping) else params:
        if value is not None and not isinstance(value, int | float | str | bytes):
            raise QueryError(f"query parameter {value!r} is not a number, string or null")
    denied: list[str] = []
    deadline = time.monotonic() + timeout_s
    timed_out = False

    def progress() -> int:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
            return 1
        return 0

    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.set_authorizer(_authorizer(policy, denied))
    conn.set_progress_handler(progress, 2000)
    try:
        cur = conn.execute(sql, params)
        if cur.description is None:
            raise QueryRejected("only SELECT statements are allowed")
        columns = [str(d[0]) for d in cur.description]
        fetched = cur.fetchmany(max_rows + 1)
        truncated = len(fetched) > max_rows
        rows = [[encode_value(v) for v in row] for row in fetched[:max_rows]]
        cur.close()
        return QueryResult(columns, rows, truncated)
    except sqlite3.DatabaseError as exc:
        if timed_out:
            raise QueryTimeout(f"query exceeded its time bound of {timeout_s:g} s and was interrupted") from None
        if denied or "not authorized" in str(exc) or "prohibited" in str(exc):
            what = ", ".join(dict.fromkeys(denied)) or str(exc)
            raise QueryRejected(f"not allowed in a read-only query: {what}") from None
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc):
            raise QueryRejected("the query tried to write; queries are read-only") from None
        raise QueryError(f"query failed: {exc}") from None
    except sqlite3.ProgrammingError as exc:
        raise QueryError(f"bad query or parameters: {exc}") from None
    except (OverflowError, ValueError) as exc:
        raise QueryError(f"bad query parameters: {exc}") from None
    finally:
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)
