"""Rows written through the HTTP relay: the one check of their names and conversion of their values."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from agent_client import INT64_MAX, INT64_MIN
from replicator.errors import RecordRejected
from replicator.relay_row import (
    MAX_COLUMNS,
    InvalidRelayName,
    TooManyColumns,
    check_relay_columns,
    relay_row,
    relay_value,
)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (None, None),
        ("text", "text"),
        ("", ""),
        ("ünïcødé ✓", "ünïcødé ✓"),
        (0, 0),
        (INT64_MAX, INT64_MAX),
        (INT64_MIN, INT64_MIN),
        (1.5, 1.5),
        (-0.0, -0.0),
        (True, 1),
        (False, 0),
        ([1, "a", None], '[1,"a",null]'),
        ({"k": {"n": [True]}}, '{"k":{"n":[true]}}'),
        ([], "[]"),
        ({}, "{}"),
    ],
)
def test_values_convert_to_sqlite_values(value: Any, stored: Any) -> None:
    out = relay_value("t", "c", value)
    assert out == stored
    assert type(out) is type(stored)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (INT64_MAX + 1, "t.c: integer does not fit in 64 bits"),
        (INT64_MIN - 1, "t.c: integer does not fit in 64 bits"),
        (float("nan"), "t.c: nan is not a finite number"),
        (float("inf"), "t.c: inf is not a finite number"),
        (float("-inf"), "t.c: -inf is not a finite number"),
        ("\ud800", "t.c: text is not valid Unicode"),
        (["\udfff"], "t.c: cannot store as JSON text"),
        (b"bytes", "t.c: unsupported value bytes"),
        ({1, 2}, "t.c: unsupported value set"),
    ],
)
def test_values_without_a_sqlite_value_are_rejected(value: Any, reason: str) -> None:
    with pytest.raises(RecordRejected) as info:
        relay_value("t", "c", value)
    assert str(info.value).startswith(reason)


def test_json_nested_too_deep_is_rejected() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(RecordRejected, match="cannot store as JSON text"):
        relay_value("t", "c", deep)


def test_a_row_converts_every_value_and_keeps_the_column_order() -> None:
    row = relay_row("notes", {"id": 1, "flag": True, "tags": ["a"], "body": None})
    assert row == {"id": 1, "flag": 1, "tags": '["a"]', "body": None}
    assert list(row) == ["id", "flag", "tags", "body"]


@pytest.mark.parametrize("table", ["", "1abc", "bad name", "x;DROP", 'a"b', "t.c", "é"])
def test_invalid_table_names_are_rejected(table: str) -> None:
    with pytest.raises(InvalidRelayName, match="invalid table name"):
        relay_row(table, {"id": 1})


@pytest.mark.parametrize("column", ["", "2x", "x y", "x; DROP", "a-b"])
def test_invalid_column_names_are_rejected(column: str) -> None:
    with pytest.raises(InvalidRelayName, match="invalid column name"):
        relay_row("notes", {"id": 1, column: 2})


def test_an_empty_row_is_rejected_but_is_no_name_error() -> None:
    with pytest.raises(RecordRejected, match="has no columns") as info:
        relay_row("notes", {})
    assert not isinstance(info.value, InvalidRelayName)


def test_names_are_checked_before_values() -> None:
    with pytest.raises(InvalidRelayName):
        relay_row("notes", {"ok": float("nan"), "bad name": 1})


def test_a_bad_value_names_its_table_and_column() -> None:
    with pytest.raises(RecordRejected, match=r"^notes\.n: integer does not fit"):
        relay_row("notes", {"id": 1, "n": 2**70})


# --------------------------------------------------------------------------- what SQLite would refuse at apply time


def test_the_column_limit_is_sqlites() -> None:
    conn = sqlite3.connect(":memory:")
    try:
        assert conn.getlimit(sqlite3.SQLITE_LIMIT_COLUMN) == MAX_COLUMNS == 2000
    finally:
        conn.close()


def test_a_row_of_max_columns_converts_and_one_more_is_refused() -> None:
    row = {f"c{i}": i for i in range(MAX_COLUMNS)}
    assert len(relay_row("wide", row)) == MAX_COLUMNS
    row[f"c{MAX_COLUMNS}"] = 0
    with pytest.raises(TooManyColumns, match=r"2001 columns; SQLite allows at most 2000") as info:
        relay_row("wide", row)
    assert isinstance(info.value, RecordRejected)  # at apply time: a dead letter, never a retry
    assert (info.value.code, info.value.status) == ("too_many_columns", 400)


def test_column_names_differing_only_in_case_are_one_column() -> None:
    with pytest.raises(InvalidRelayName, match="'id' and 'ID' of 'notes' are one column"):
        relay_row("notes", {"id": 1, "ID": 2})


def test_check_relay_columns_counts_what_the_table_has() -> None:
    existing = [f"c{i}" for i in range(1990)]
    assert check_relay_columns("t", existing, ["c5", "c7", "new"]) == ["new"]
    with pytest.raises(InvalidRelayName, match="column 'C5' of 't' is named 'c5'"):
        check_relay_columns("t", existing, ["C5"])  # SQLite would take it for c5: name it so
    assert check_relay_columns("t", existing, [f"n{i}" for i in range(10)]) == [f"n{i}" for i in range(10)]
    with pytest.raises(TooManyColumns, match=r"t would have 2001 columns \(1990 now, 11 new\)"):
        check_relay_columns("t", existing, [f"n{i}" for i in range(11)])


def test_sqlite_really_refuses_what_is_refused_here(tmp_path: Path) -> None:
    """The control: the limits above are SQLite's, not ours."""
    conn = sqlite3.connect(tmp_path / "x.db")
    try:
        cols = ", ".join(f'"c{i}"' for i in range(MAX_COLUMNS))
        conn.execute(f"CREATE TABLE ok ({cols})")
        with pytest.raises(sqlite3.OperationalError, match="too many columns"):
            conn.execute(f'CREATE TABLE bad ({cols}, "extra")')
        with pytest.raises(sqlite3.OperationalError, match="too many columns"):
            conn.execute('ALTER TABLE ok ADD COLUMN "extra"')
        with pytest.raises(sqlite3.OperationalError, match="duplicate column name"):
            conn.execute('CREATE TABLE dup ("id", "ID")')
    finally:
        conn.close()
