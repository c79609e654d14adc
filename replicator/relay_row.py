"""Rows written through the HTTP relay: the one check and conversion of their names and values.

The relay API validates a row with it before publishing (so bad input is a
4xx, not a dead letter), and the central store converts the same row with it
when applying. JSON values map to SQLite values: null, text, integers (64-bit),
finite reals, booleans as 0/1, and lists or objects as JSON text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from agent_client import INT64_MAX, INT64_MIN, SQLiteValue, is_valid_identifier

from .errors import RecordRejected


class InvalidRelayName(RecordRejected):
    """A relay row names a table or column that cannot be used."""


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
    for column in data:
        if not is_valid_identifier(column):
            raise InvalidRelayName(f"invalid column name {column!r} in {table!r}")
    return {column: relay_value(table, column, value) for column, value in data.items()}
