"""Writing rows given as dicts: `write_data` and `batch_write`, inside the caller's write transaction.

Only the given columns are written (an upsert on the primary key); a missing
single-column key is generated (SQLite assigns an INTEGER PRIMARY KEY, any
other key gets a uuid4 hex string). Python values become SQLite values here:
bools become 0/1, lists/dicts/tuples JSON text, and an integer outside 64 bits
is refused.

The per-row work is kept small: a table's description and, per set of columns written, the checked plan
(statement, key handling) are cached until `PRAGMA schema_version` moves (read once per transaction: a
schema change by any other connection, the sqlite3 shell included, is seen before the next write).
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeGuard

import orjson

from . import catalog
from .change_record import INT64_MAX, INT64_MIN
from .errors import InvalidRow, LocalDatabaseError, UnknownTable
from .identifiers import quote_identifier
from .statements import upsert_sql

#: What write_data returns: the row's primary key (a value, or a tuple for a composite key).
RowId = Any


def _to_sqlite(table: str, column: str, value: Any) -> Any:
    """Python value -> SQLite value for write_data; lists and dicts become JSON text."""
    if value is None or isinstance(value, str | float | bytes):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise InvalidRow(f"{table}.{column}: integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, list | dict | tuple):
        try:
            return orjson.dumps(value).decode()
        except TypeError as exc:
            raise InvalidRow(f"{table}.{column}: value is not JSON-serialisable: {exc}") from None
    raise InvalidRow(f"{table}.{column}: unsupported value type {type(value).__name__}")


#: Types SQLite takes as they are (exact types: a bool or a str subclass goes through `_to_sqlite`).
_AS_IS = frozenset({str, float, bytes, type(None)})


def is_mapping(value: object) -> TypeGuard[Mapping[str, Any]]:
    """isinstance(value, Mapping), with the common case (a dict) without the ABC machinery."""
    return type(value) is dict or isinstance(value, Mapping)


def _values(table: str, cols: tuple[str, ...], data: Mapping[str, Any]) -> list[Any]:
    """The row's values in `cols` order, converted (the common types without a call per value)."""
    out = []
    for c in cols:
        v = data[c]
        t = type(v)
        if t in _AS_IS or (t is int and INT64_MIN <= v <= INT64_MAX):
            out.append(v)
        else:
            out.append(_to_sqlite(table, c, v))
    return out


class _Plan(NamedTuple):
    """How to write a row of one table given with one set of columns (checked once, then reused)."""

    sql: str
    uuid_key: bool  # a single non-integer key not given: a uuid4 hex is generated (appended last)
    pk: tuple[str, ...]


#: Plans kept at most (one per table and set of columns written); the cache starts again past it.
_MAX_PLANS = 4096


class RowWriter:
    """Upserts rows, caching table descriptions and statements until the schema changes.

    Every method runs inside the caller's write transaction (BEGIN IMMEDIATE held), on whichever connection
    holds it (the loop's or the writer thread's): the write lock serialises them, so one RowWriter serves both.
    """

    def __init__(self) -> None:
        self._version = -1
        self._tables: dict[str, catalog.TableInfo] = {}
        self._statements: dict[tuple[str, tuple[str, ...]], str] = {}
        self._plans: dict[tuple[str, tuple[str, ...]], _Plan] = {}

    def upsert_one(self, conn: sqlite3.Connection, table: str, data: Mapping[str, Any]) -> RowId:
        """Upsert one row of `table`; returns its primary key."""
        self._refresh(conn)
        return self._upsert(conn, table, data)

    def upsert_many(self, conn: sqlite3.Connection, items: Sequence[tuple[str, Mapping[str, Any]]]) -> list[RowId]:
        """A batch; consecutive rows of one table with the same columns share one executemany."""
        self._refresh(conn)
        out: list[RowId] = []
        i, n = 0, len(items)
        while i < n:
            table, data = items[i]
            j = i + 1
            if is_mapping(data) and data:
                keys = tuple(data)
                while j < n and items[j][0] == table and is_mapping(items[j][1]) and tuple(items[j][1]) == keys:
                    j += 1
            if j - i > 1:
                out.extend(self._upsert_run(conn, table, keys, [d for _t, d in items[i:j]]))
            else:
                out.append(self._upsert(conn, table, data))
            i = j
        return out

    # ------------------------------------------------------------------ internals
    def _refresh(self, conn: sqlite3.Connection) -> None:
        """Forget every table description once the schema changed (any connection's DDL bumps the version).

        Read inside the caller's write transaction, so no other connection can change the schema between this
        check and the write. Every caller of a RowWriter holds the database's write lock (BEGIN IMMEDIATE) while
        it runs, so its caches are never used by two threads at once.
        """
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version != self._version:
            self._tables.clear()
            self._statements.clear()
            self._plans.clear()
            self._version = version

    def _info(self, conn: sqlite3.Connection, table: str) -> catalog.TableInfo:
        info = self._tables.get(table)
        if info is None:
            if not isinstance(table, str):
                raise UnknownTable(f"table name must be a string, got {type(table).__name__}")
            info = catalog.table_info(conn, table)
            self._tables[table] = info
        return info

    def _upsert_sql(self, info: catalog.TableInfo, cols: tuple[str, ...]) -> str:
        key = (info.name, cols)
        sql = self._statements.get(key)
        if sql is None:
            sql = self._statements[key] = upsert_sql(info.name, cols, info.pk)
        return sql

    def _plan(self, conn: sqlite3.Connection, table: str, cols: tuple[str, ...]) -> _Plan:
        """Check a set of columns against the table once: unknown columns, the key, what to generate."""
        info = self._info(conn, table)
        unknown = [c for c in cols if c not in info.columns]
        if unknown:
            raise InvalidRow(f"{table} has no column(s) {', '.join(map(repr, unknown))}")
        pk = info.pk
        uuid_key = False
        if len(pk) == 1 and pk[0] not in cols:
            uuid_key = not info.integer_pk
        else:
            missing = [c for c in pk if c not in cols]
            if missing:
                raise InvalidRow(f"{table}: primary key column(s) {', '.join(missing)} missing")
        if not cols and not uuid_key:
            raise InvalidRow(f"no values given for {table!r}")
        plan = _Plan(self._upsert_sql(info, (*cols, pk[0]) if uuid_key else cols), uuid_key, pk)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.clear()
        self._plans[(table, cols)] = plan
        return plan

    def _upsert(self, conn: sqlite3.Connection, table: str, data: Mapping[str, Any]) -> RowId:
        if not is_mapping(data):
            raise InvalidRow(f"data for {table!r} must be a dict of column -> value")
        cols = tuple(data)
        plan = self._plans.get((table, cols))
        if plan is None:
            plan = self._plan(conn, table, cols)
        values = _values(table, cols, data)
        if plan.uuid_key:
            key = uuid.uuid4().hex
            values.append(key)
            conn.execute(plan.sql, values)
            return key
        cur = conn.execute(plan.sql, values)
        pk = plan.pk
        if len(pk) == 1:
            return data.get(pk[0], cur.lastrowid)
        if not pk:
            return cur.lastrowid
        return tuple(data[c] for c in pk)

    def _upsert_run(
        self, conn: sqlite3.Connection, table: str, keys: tuple[str, ...], rows: list[Mapping[str, Any]]
    ) -> list[RowId]:
        """Rows of one table with the same columns: checked once, written with one executemany."""
        info = self._info(conn, table)
        unknown = [k for k in keys if k not in info.columns]
        if unknown:
            raise InvalidRow(f"{table} has no column(s) {', '.join(map(repr, unknown))}")
        cols = keys
        generated: list[str] = []
        auto_ids = False
        if len(info.pk) == 1 and info.pk[0] not in keys:
            if info.integer_pk:
                auto_ids = True
            else:
                generated = [uuid.uuid4().hex for _ in rows]
                cols = (*keys, info.pk[0])
        else:
            missing = [c for c in info.pk if c not in keys]
            if missing:
                raise InvalidRow(f"{table}: primary key column(s) {', '.join(missing)} missing")
        values = [_values(table, keys, row) for row in rows]
        for row_values, key in zip(values, generated, strict=False):
            row_values.append(key)
        sql = self._upsert_sql(info, cols)
        if not auto_ids:
            conn.executemany(sql, values)
            if generated:
                return list(generated)
            if len(info.pk) == 1:
                return [row[info.pk[0]] for row in rows]
            return [tuple(row[c] for c in info.pk) for row in rows]
        # SQLite assigns the keys: every new rowid is above the largest one before the insert, and this
        # transaction is the only writer, so the new rows are exactly those above it.
        q = quote_identifier
        before = conn.execute(f"SELECT max(rowid) FROM {q(table)}").fetchone()[0] or 0
        conn.executemany(sql, values)
        new_ids = [
            r[0] for r in conn.execute(f"SELECT rowid FROM {q(table)} WHERE rowid > ? ORDER BY rowid", (before,))
        ]
        if len(new_ids) != len(rows):
            raise LocalDatabaseError(f"cannot tell the keys SQLite gave {len(rows)} new rows of {table}")
        return new_ids
