"""Writing dict rows (agent_client/row_writer.py) on a real SQLite database: upserts, keys, value conversion."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import INT64_MAX, INT64_MIN, InvalidRow, UnknownTable
from agent_client.row_writer import RowWriter


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "rows.db", isolation_level=None)
    c.execute("CREATE TABLE n (id INTEGER PRIMARY KEY, a TEXT, b TEXT)")
    c.execute("CREATE TABLE s (key TEXT PRIMARY KEY, v)")
    c.execute("CREATE TABLE c (x TEXT, y INTEGER, v, PRIMARY KEY (x, y))")
    c.execute("CREATE TABLE nokey (v)")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def rows() -> RowWriter:
    return RowWriter()


def select(conn: sqlite3.Connection, sql: str) -> list[tuple[Any, ...]]:
    return conn.execute(sql).fetchall()


def test_only_the_given_columns_are_written(conn: sqlite3.Connection, rows: RowWriter) -> None:
    assert rows.upsert_one(conn, "n", {"id": 1, "a": "a1", "b": "b1"}) == 1
    assert rows.upsert_one(conn, "n", {"id": 1, "a": "a2"}) == 1
    assert select(conn, "SELECT id, a, b FROM n") == [(1, "a2", "b1")]
    assert rows.upsert_one(conn, "n", {"id": 1}) == 1  # key only: nothing to update
    assert select(conn, "SELECT id, a, b FROM n") == [(1, "a2", "b1")]


def test_missing_keys_are_generated(conn: sqlite3.Connection, rows: RowWriter) -> None:
    conn.execute("INSERT INTO n (id) VALUES (41)")
    assert rows.upsert_one(conn, "n", {"a": "x"}) == 42  # SQLite assigns an INTEGER PRIMARY KEY
    key = rows.upsert_one(conn, "s", {"v": 1})
    assert isinstance(key, str) and len(key) == 32 and int(key, 16) >= 0  # uuid4 hex
    assert select(conn, "SELECT key, v FROM s") == [(key, 1)]
    assert rows.upsert_one(conn, "c", {"x": "a", "y": 2, "v": 3}) == ("a", 2)
    assert rows.upsert_one(conn, "nokey", {"v": 9}) == 1  # no key at all: the rowid


def test_a_composite_key_must_be_given(conn: sqlite3.Connection, rows: RowWriter) -> None:
    with pytest.raises(InvalidRow, match="primary key column"):
        rows.upsert_one(conn, "c", {"x": "a", "v": 1})
    with pytest.raises(InvalidRow, match="primary key column"):
        rows.upsert_many(conn, [("c", {"x": "a", "v": 1}), ("c", {"x": "b", "v": 2})])


@pytest.mark.parametrize("value", [INT64_MIN, INT64_MAX, 0, -1])
def test_integers_within_64_bits_are_written(conn: sqlite3.Connection, rows: RowWriter, value: int) -> None:
    rows.upsert_one(conn, "s", {"key": "k", "v": value})
    assert select(conn, "SELECT v, typeof(v) FROM s") == [(value, "integer")]


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 2**100])
def test_integers_outside_64_bits_are_refused(conn: sqlite3.Connection, rows: RowWriter, value: int) -> None:
    with pytest.raises(InvalidRow, match="64 bits"):
        rows.upsert_one(conn, "s", {"key": "k", "v": value})
    with pytest.raises(InvalidRow, match="64 bits"):
        rows.upsert_many(conn, [("s", {"key": "a", "v": 1}), ("s", {"key": "b", "v": value})])
    assert select(conn, "SELECT count(*) FROM s") == [(0,)]


@pytest.mark.parametrize(
    ("value", "stored", "kind"),
    [
        (True, 1, "integer"),
        (2.5, 2.5, "real"),
        (None, None, "null"),
        (bytearray(b"\x00\x01"), b"\x00\x01", "blob"),
        (memoryview(b"\xff"), b"\xff", "blob"),
        ([1, "a"], '[1,"a"]', "text"),
        ({"k": [None]}, '{"k":[null]}', "text"),
        ((1, 2), "[1,2]", "text"),
    ],
)
def test_python_values_become_sqlite_values(
    conn: sqlite3.Connection, rows: RowWriter, value: Any, stored: Any, kind: str
) -> None:
    rows.upsert_one(conn, "s", {"key": "k", "v": value})
    assert select(conn, "SELECT v, typeof(v) FROM s") == [(stored, kind)]


@pytest.mark.parametrize(
    ("table", "data", "error", "match"),
    [
        ("s", {"key": "k", "v": object()}, InvalidRow, "unsupported value type"),
        ("s", {"key": "k", "v": [object()]}, InvalidRow, "not JSON-serialisable"),
        ("s", {"key": "k", "nope": 1}, InvalidRow, "no column"),
        ("n", {}, InvalidRow, "no values"),
        ("s", ["key"], InvalidRow, "must be a dict"),
        ("missing", {"a": 1}, UnknownTable, "missing"),
        (3, {"a": 1}, UnknownTable, "must be a string"),
    ],
)
def test_bad_rows_are_refused(
    conn: sqlite3.Connection, rows: RowWriter, table: Any, data: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        rows.upsert_one(conn, table, data)


def test_a_batch_returns_every_key_in_order(conn: sqlite3.Connection, rows: RowWriter) -> None:
    conn.execute("INSERT INTO n (id, a) VALUES (10, 'old')")
    items: list[tuple[str, Any]] = [
        ("n", {"a": "r1"}),  # a run of three with generated integer keys
        ("n", {"a": "r2"}),
        ("n", {"a": "r3"}),
        ("s", {"key": "given", "v": 1}),
        ("s", {"v": 2}),  # a run of two with generated uuid keys
        ("s", {"v": 3}),
        ("c", {"x": "a", "y": 1, "v": 0}),
        ("c", {"x": "a", "y": 2, "v": 0}),
        ("n", {"id": 10, "b": "kept"}),
    ]
    keys = rows.upsert_many(conn, items)
    assert keys[:4] == [11, 12, 13, "given"]
    assert len({keys[4], keys[5]}) == 2 and all(len(k) == 32 for k in keys[4:6])
    assert keys[6:] == [("a", 1), ("a", 2), 10]
    assert select(conn, "SELECT id, a, b FROM n ORDER BY id") == [
        (10, "old", "kept"),
        (11, "r1", None),
        (12, "r2", None),
        (13, "r3", None),
    ]
    assert dict(select(conn, "SELECT key, v FROM s")) == {"given": 1, keys[4]: 2, keys[5]: 3}


def test_a_run_with_given_keys_upserts(conn: sqlite3.Connection, rows: RowWriter) -> None:
    rows.upsert_one(conn, "n", {"id": 1, "a": "a", "b": "b"})
    assert rows.upsert_many(conn, [("n", {"id": 1, "a": "A"}), ("n", {"id": 2, "a": "B"})]) == [1, 2]
    assert select(conn, "SELECT id, a, b FROM n ORDER BY id") == [(1, "A", "b"), (2, "B", None)]


def test_the_cached_schema_follows_alter_table(conn: sqlite3.Connection, rows: RowWriter) -> None:
    rows.upsert_one(conn, "n", {"id": 1, "a": "x"})
    conn.execute("ALTER TABLE n ADD COLUMN c TEXT")
    rows.upsert_one(conn, "n", {"id": 1, "c": "new"})
    rows.upsert_many(conn, [("n", {"id": 2, "c": "p"}), ("n", {"id": 3, "c": "q"})])
    assert select(conn, "SELECT id, a, c FROM n ORDER BY id") == [(1, "x", "new"), (2, None, "p"), (3, None, "q")]
