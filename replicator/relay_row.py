"""Rows written through the HTTP relay: the one check and conversion of their names and values.

The relay API validates a row with it before publishing (so bad input is a
4xx, not a dead letter), and the central store converts the same row with it
when applying. JSON values map to SQLite values: null, text, integers (64-bit),
finite reals, booleans as 0/1, and lists or objects as JSON text.

Names are checked as SQLite will see them: it compares names without regard
to case (`a` and `A` are one column), so a row may not name one column twice
nor an existing column in another case, and a table holds at most
`MAX_COLUMNS` columns (SQLite's limit, 2000 in a default build), counting the
ones it already has (`check_relay_columns`).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from agent_client import INT64_MAX, INT64_MIN, SQLiteValue, is_valid_identifier

from .errors import RecordRejected


def _sqlite_column_limit() -> int:
    conn = sqlite3.connect(":memory:")
    try:
        return int(conn.getlimit(sqlite3.SQLITE_LIMIT_COLUMN))
    finally:
        conn.close()


#: The most columns a table (and so a relay row) may have: SQLite's SQLITE_LIMIT_COLUMN.
MAX_COLUMNS = _sqlite_column_limit()


class InvalidRelayName(RecordRejected):
    """A relay row names a table or column that cannot be used."""


class TooManyColumns(RecordRejected):
    """A relay row (with the columns its table already has) exceeds SQLite's column limit."""

    code = "too_many_columns"
    status = 400


def check_relay_columns(table: str, existing: Iterable[str], columns: Iterable[str]) -> list[str]:
    """The columns of `columns` that `table` (with `existing` columns) lacks, in order.

    SQLite compares column names without case, so a name that differs from an existing column only in case
    is refused (InvalidRelayName: use the column's own name), and so is a row that would take the table
    beyond MAX_COLUMNS (TooManyColumns).
    """
    have = {c.lower(): c for c in existing}
    missing: list[str] = []
    for column in dict.fromkeys(columns):
        known = have.get(column.lower())
        if known is None:
            missing.append(column)
        elif known != column:
            raise InvalidRelayName(f"column {column!r} of {table!r} is named {known!r}: use that name")
    if len(have) + len(missing) > MAX_COLUMNS:
        raise TooManyColumns(
            f"{table} would have {len(have) + len(missing)} columns ({len(have)} now, {len(missing)} new); "
            f"SQLite allows at most {MAX_COLUMNS}"
        )
    return missing


def relay_value(table: str, column: str, value: Any) -> SQLiteValue:
    """A JSON value from the HTTP relay -> SQLite value; raises RecordRejected if there is none."""
    if value is None:
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordRejected(f"{table}.{column}: text is not valid Unicode (lone surrogate)") from None
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # NaN/Infinity/1e400 parse, but would reach the stream as null
            raise RecordRejected(f"{table}.{column}: {value} is not a finite number")
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise RecordRejected(f"{table}.{column}: integer does not fit in 64 bits")
        return value
    if isinstance(value, list | dict):
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError as exc:  # lone surrogates, nesting deeper than 255
            raise RecordRejected(f"{table}.{column}: cannot store as JSON text: {exc}") from None
    raise RecordRejected(f"{table}.{column}: unsupported value {type(value).__name__}")


def relay_row(table: str, data: Mapping[str, Any]) -> dict[str, SQLiteValue]:
    """Check a relay row's table and column names and convert its values (column -> SQLite value)."""
    if not is_valid_identifier(table):
        raise InvalidRelayName(f"invalid table name {table!r}: letters, digits and '_', not starting with a digit")
    if not data:
        raise RecordRejected(f"row for {table!r} has no columns")
    if len(data) > MAX_COLUMNS:
        raise TooManyColumns(f"row for {table!r} has {len(data)} columns; SQLite allows at most {MAX_COLUMNS}")
    seen: dict[str, str] = {}
    for column in data:
        if not is_valid_identifier(column):
            raise InvalidRelayName(f"invalid column name {column!r} in {table!r}")
        other = seen.setdefault(column.lower(), column)
        if other != column:
            raise InvalidRelayName(f"columns {other!r} and {column!r} of {table!r} are one column to SQLite (case)")
    return {column: relay_value(table, column, value) for column, value in data.items()}
