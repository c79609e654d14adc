"""Read-only SQL for other agents: the one place that runs SQL nobody here wrote.

Used by the agent (answering `on_demand` queries) and by the HTPC (the relay
query endpoint). Read-only by construction: a read-only connection *and* an
authorizer that allows only reads of permitted tables and plain functions.
Bounded in time (a progress handler interrupts it between rows; the
builtins whose one step can be long are replaced by guarded ones, and a
statement whose prepare step would expand too far is refused, see
`_sql_guards`), in rows and in bytes (each value, each value a function makes,
the whole answer); parameters are always bound, never spliced into the text.

Answers carry values in the wire form of change records (`encode_values`): a
BLOB is `{"b": base64}`, a non-finite REAL `{"f": "inf"}`, and TEXT whose bytes
are not UTF-8 `{"t": base64}` (read as `InvalidText`, never a decode error).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ._sql_guards import LIKE_PATTERN_BYTES, MAX_EXPANSION, GuardAbort, GuardedConnection, expansion_estimate, install
from .change_record import encode_values, sqlite_text
from .errors import QueryError, QueryRejected, QueryTimeout

#: Functions that reach outside the database or change the connection.
_DENIED_FUNCTIONS = frozenset(
    {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "fts5", "sqlite_log", "optimize"}
    | {"rtreecheck", "rtreenode", "rtreedepth"}
)
#: Functions whose one call can take unbounded time and that cannot be replaced with the same result.
_COSTLY_FUNCTIONS = {"json_patch": "its cost grows with the product of its two inputs' sizes"}
#: Eponymous virtual tables that show what is not the asker's: other queries' SQL, pages, internal tables.
_DENIED_TABLES = frozenset({"dbstat", "sqlite_stmt", "sqlite_dbpage"})

TablePolicy = Callable[[str, str], bool]  # (schema name, table name) -> may it be read?

_SCHEMA_TABLES = ("sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema")
MAX_VALUE_BYTES = 16 * 1024 * 1024  # SQLITE_LIMIT_LENGTH for query connections: no giant blobs in memory
MAX_MADE_VALUE_BYTES = 1024 * 1024  # a value printf/format, zeroblob or randomblob may make
MAX_RESULT_BYTES = 16 * 1024 * 1024  # one answer's rows, JSON-encoded
MAX_SQL_BYTES = 256 * 1024  # SQLITE_LIMIT_SQL_LENGTH
MAX_VDBE_OPS = 500_000  # SQLITE_LIMIT_VDBE_OP: a statement's program size

#: A connection type whose guards are installed once (use it as `factory=` for pooled query connections).
QueryConnection = GuardedConnection

QueryParams = Sequence[Any] | Mapping[str, Any] | None


class ValueTooLarge(QueryError):
    """A value the query reads or makes is larger than the limit on one value."""

    code = "value_too_large"


class ResultTooLarge(QueryError):
    """The answer, JSON-encoded, is larger than the limit on one answer."""

    code = "result_too_large"


class QueryTooComplex(QueryError):
    """Preparing the statement would take unbounded work (it expands too far), or a function input is too long."""

    code = "query_too_complex"


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool = False
    denied: list[str] = field(default_factory=list)
    rows_json: bytes = b"[]"  # `rows` JSON-encoded (the bytes an answer embeds; counted against its limit)


Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


def _authorizer(policy: TablePolicy, denied: list[str]) -> Authorizer:
    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, _src: str | None) -> int:
        if action == sqlite3.SQLITE_SELECT or action == sqlite3.SQLITE_RECURSIVE:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_READ:
            if arg1 in _DENIED_TABLES:
                denied.append(f"read of {arg1}")
                return sqlite3.SQLITE_DENY
            if arg1 is not None and policy(db or "main", arg1):
                return sqlite3.SQLITE_OK
            if arg1 in _SCHEMA_TABLES and arg2 == "ROWID" and (db or "main") == "main":
                return sqlite3.SQLITE_OK  # SQLite's own lookup when a table-valued function is first used
            denied.append(f"read of {db}.{arg1}")
            return sqlite3.SQLITE_DENY
        if action == sqlite3.SQLITE_UPDATE and arg1 in _SCHEMA_TABLES:
            # Registering an eponymous virtual table (json_each, pragma_table_info) on first use is
            # authorized as an UPDATE of the schema table; a real one is impossible here (PRAGMA
            # writable_schema is denied and the connection is read-only).
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION:
            name = (arg2 or "").lower()
            if name in _DENIED_FUNCTIONS:
                denied.append(f"function {arg2}")
                return sqlite3.SQLITE_DENY
            if name in _COSTLY_FUNCTIONS:
                denied.append(f"function {arg2} ({_COSTLY_FUNCTIONS[name]})")
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


def _set_limits(conn: sqlite3.Connection, max_value_read_bytes: int) -> None:
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_read_bytes)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_VDBE_OP, MAX_VDBE_OPS)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, LIKE_PATTERN_BYTES)


def run_read_only(
    conn: sqlite3.Connection,
    sql: str,
    params: QueryParams,
    *,
    policy: TablePolicy,
    timeout_s: float,
    max_rows: int,
    max_value_read_bytes: int = MAX_VALUE_BYTES,
    max_value_bytes: int = MAX_MADE_VALUE_BYTES,
    max_result_bytes: int = MAX_RESULT_BYTES,
) -> QueryResult:
    """Run one read-only statement on `conn` (opened read-only by the caller).

    `max_value_read_bytes` must be at least the largest value stored in the databases read (a longer one
    cannot be read at all); `max_value_bytes` bounds what printf/format, zeroblob and randomblob make;
    `max_result_bytes` bounds the JSON-encoded rows (ResultTooLarge, never a silently cut answer).
    """
    if not isinstance(sql, str) or not sql.strip():
        raise QueryError("query must be a non-empty SQL string")
    if params is None:
        params = ()
    if not isinstance(params, Mapping | list | tuple):
        raise QueryError("params must be a list (positional ?) or an object (named :name)")
    for value in params.values() if isinstance(params, Mapping) else params:
        if value is not None and not isinstance(value, int | float | str | bytes):
            raise QueryError(f"query parameter {value!r} is not a number, string or null")
    deadline = time.monotonic() + timeout_s
    if len(sql) > MAX_SQL_BYTES or len(sql.encode("utf-8", "surrogatepass")) > MAX_SQL_BYTES:
        raise QueryTooComplex(f"the query text is longer than {MAX_SQL_BYTES} bytes")
    if expansion_estimate(sql) is None:
        raise QueryTooComplex(
            f"preparing this query would handle more than {MAX_EXPANSION} terms: references to a CTE or to a "
            "subquery's columns copy what they name, and nested ones multiply; simplify the query"
        )
    denied: list[str] = []
    timed_out = False

    def progress() -> int:
        nonlocal timed_out
        if time.monotonic() > deadline:
            timed_out = True
            return 1
        return 0

    _set_limits(conn, max_value_read_bytes)
    text_factory = conn.text_factory
    conn.text_factory = sqlite_text  # TEXT that is not UTF-8 answers as {"t": base64}, like a BLOB as {"b": ...}
    guards = install(conn)
    guards.arm(deadline, max_value_bytes, max_value_read_bytes)
    conn.set_authorizer(_authorizer(policy, denied))
    conn.set_progress_handler(progress, 2000)
    try:
        cur = conn.execute(sql, params)
        if cur.description is None:
            raise QueryRejected("only SELECT statements are allowed")
        columns = [str(d[0]) for d in cur.description]
        rows, rows_json, truncated = _fetch(cur, columns, max_rows, max_result_bytes)
        cur.close()
        return QueryResult(columns, rows, truncated, rows_json=rows_json)
    except (sqlite3.DatabaseError, MemoryError) as exc:
        raise _query_error(exc, timed_out, guards.abort, denied, timeout_s, max_value_read_bytes) from None
    except sqlite3.ProgrammingError as exc:
        raise QueryError(f"bad query or parameters: {exc}") from None
    except (OverflowError, ValueError) as exc:
        raise QueryError(f"bad query parameters: {exc}") from None
    finally:
        guards.deadline = float("inf")
        conn.text_factory = text_factory
        conn.set_progress_handler(None, 0)
        conn.set_authorizer(None)


def _fetch(
    cur: sqlite3.Cursor, columns: list[str], max_rows: int, max_result_bytes: int
) -> tuple[list[list[Any]], bytes, bool]:
    """Up to max_rows rows, wire-encoded, with their JSON; ResultTooLarge as soon as it passes the limit."""
    rows: list[list[Any]] = []
    encoded: list[bytes] = []
    size = len(orjson.dumps(columns)) + 64  # the answer's other members
    while len(rows) < max_rows:
        batch = cur.fetchmany(min(256, max_rows - len(rows)))
        if not batch:
            return rows, b"[" + b",".join(encoded) + b"]", False
        for row in batch:
            values = encode_values(row)
            data = orjson.dumps(values)
            size += len(data) + 1
            if size > max_result_bytes:
                raise ResultTooLarge(
                    f"the answer exceeds {max_result_bytes} bytes (query_max_result_bytes) after {len(rows)} rows; "
                    "select fewer or smaller columns, or fewer rows (LIMIT, max_rows)"
                )
            rows.append(values)
            encoded.append(data)
    truncated = cur.fetchone() is not None
    return rows, b"[" + b",".join(encoded) + b"]", truncated


def _query_error(
    exc: BaseException,
    timed_out: bool,
    abort: GuardAbort | None,
    denied: list[str],
    timeout_s: float,
    max_value_read_bytes: int,
) -> QueryError:
    """The named QueryError for what stopped a statement."""
    text = str(exc)
    if timed_out or (abort is not None and abort.kind == "timeout"):
        return QueryTimeout(f"query exceeded its time bound of {timeout_s:g} s and was interrupted")
    if abort is not None:
        if abort.kind == "value_too_large":
            return ValueTooLarge(str(abort))
        if abort.kind == "too_complex":
            return QueryTooComplex(str(abort))
        return QueryError(f"query failed: {abort}")
    if denied or "not authorized" in text or "prohibited" in text:
        what = ", ".join(dict.fromkeys(denied)) or text
        return QueryRejected(f"not allowed in a read-only query: {what}")
    if isinstance(exc, MemoryError):
        return QueryTooComplex("the query is too large for SQLite to prepare or run within its memory bounds")
    if isinstance(exc, sqlite3.OperationalError) and "readonly" in text:
        return QueryRejected("the query tried to write; queries are read-only")
    if "too big" in text:
        return ValueTooLarge(f"a value is larger than the limit on one value ({max_value_read_bytes} bytes)")
    if "user-defined function raised exception" in text:
        return QueryError(
            "query failed: a function's argument is TEXT that is not valid UTF-8 (LIKE, GLOB, instr, replace, "
            "trim, printf and strftime take UTF-8 text in queries)"
        )
    return QueryError(f"query failed: {exc}")
