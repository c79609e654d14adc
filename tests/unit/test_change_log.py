"""The local change log (agent_client/change_log.py) on a real SQLite database: capture, groups, reads, trim."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import change_log

LAYOUT = 7


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    c.execute("BEGIN")
    change_log.create_schema(c)
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b)")
    change_log.create_triggers(c, "t", ("id", "a", "b"), ("id",), LAYOUT)
    c.execute("COMMIT")
    try:
        yield c
    finally:
        c.close()


def log_rows(conn: sqlite3.Connection, width: int = 3) -> list[tuple[Any, ...]]:
    """(seq, tx, layout, op, v0..v{width-1}) of every row in the log."""
    cols = "".join(f", v{i}" for i in range(width))
    return conn.execute(f"SELECT seq, tx, layout, op{cols} FROM _cr_log ORDER BY seq").fetchall()


def changes(conn: sqlite3.Connection, width: int = 3) -> list[tuple[Any, ...]]:
    """(op, values...) of every row, values cut to the row image the op carries."""
    out = []
    for row in log_rows(conn, width):
        op = row[3]
        out.append((op, *row[4 : 4 + (width if op == "U" else 1)]))
    return out


def tx(conn: sqlite3.Connection, *statements: str) -> None:
    conn.execute("BEGIN")
    for stmt in statements:
        conn.execute(stmt)
    conn.execute("COMMIT")


# --------------------------------------------------------------------------- capture


def test_insert_update_delete_are_captured_as_row_images_and_keys(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'x', 2.5)")
    tx(conn, "UPDATE t SET a = 'y' WHERE id = 1")
    tx(conn, "DELETE FROM t WHERE id = 1")
    assert changes(conn) == [("U", 1, "x", 2.5), ("U", 1, "y", 2.5), ("D", 1)]
    assert {r[2] for r in log_rows(conn)} == {LAYOUT}


def test_an_update_that_changes_nothing_is_not_captured(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'x', NULL)")
    tx(conn, "UPDATE t SET a = 'x', b = NULL WHERE id = 1")
    assert changes(conn) == [("U", 1, "x", None)]


def test_a_key_change_is_delete_of_the_old_key_then_the_new_row(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'x', NULL)")
    tx(conn, "UPDATE t SET id = 5 WHERE id = 1")
    rows = log_rows(conn)
    assert changes(conn)[1:] == [("D", 1), ("U", 5, "x", None)]
    assert rows[1][1] == rows[2][1], "both halves of the key change carry one group stamp"


def test_values_are_copied_with_their_storage_class(conn: sqlite3.Connection) -> None:
    values: list[Any] = [2**63 - 1, -0.0, b"\x00\xff", "é", math.inf]
    for i, v in enumerate(values):
        conn.execute("INSERT INTO t (id, b) VALUES (?, ?)", (i + 10, v))
    got = [r[6] for r in log_rows(conn)]
    assert [type(v) for v in got] == [type(v) for v in values]
    assert got == values
    assert math.copysign(1, got[1]) == -1.0


def test_writes_of_one_transaction_share_a_stamp_until_the_group_is_closed(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'a', NULL)", "INSERT INTO t VALUES (2, 'b', NULL)")
    tx(conn, "INSERT INTO t VALUES (3, 'c', NULL)")
    assert change_log.open_group_has_rows(conn)
    change_log.close_group(conn)
    assert not change_log.open_group_has_rows(conn)
    tx(conn, "INSERT INTO t VALUES (4, 'd', NULL)")
    assert change_log.open_group_has_rows(conn)
    stamps = [r[1] for r in log_rows(conn)]
    assert stamps[0] == stamps[1] == stamps[2] < stamps[3]


def test_dropped_triggers_capture_nothing(conn: sqlite3.Connection) -> None:
    assert change_log.triggers_present(conn, "t")
    change_log.drop_triggers(conn, "t")
    assert not change_log.triggers_present(conn, "t")
    tx(conn, "INSERT INTO t VALUES (1, 'x', NULL)")
    assert log_rows(conn) == []


def test_append_and_snapshot_log_in_the_open_group(conn: sqlite3.Connection) -> None:
    change_log.drop_triggers(conn, "t")
    tx(conn, "INSERT INTO t VALUES (1, 'a', NULL)", "INSERT INTO t VALUES (2, 'b', x'00')")
    conn.execute("BEGIN")
    change_log.append(conn, 9, "S")
    change_log.append_snapshot(conn, 9, "t", ("id", "a", "b"))
    change_log.append(conn, 9, "V", ["'on_demand'"])
    conn.execute("COMMIT")
    rows = log_rows(conn)
    assert [(r[2], r[3]) for r in rows] == [(9, "S"), (9, "U"), (9, "U"), (9, "V")]
    assert sorted(r[4:] for r in rows[1:3]) == [(1, "a", None), (2, "b", b"\x00")]
    assert rows[3][4] == "on_demand"
    assert len({r[1] for r in rows}) == 1


# --------------------------------------------------------------------------- reading, trim, backlog


def test_read_closed_returns_only_closed_groups_after_the_cursor(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'a', NULL)", "INSERT INTO t VALUES (2, 'b', NULL)")
    assert change_log.read_closed(conn, 0, 100, lambda c: 3) == []  # the group is still open
    change_log.close_group(conn)
    tx(conn, "INSERT INTO t VALUES (3, 'c', NULL)")  # the next, open group
    rows = change_log.read_closed(conn, 0, 100, lambda c: 3)
    assert [(r[0], r[3], r[5:]) for r in rows] == [(1, "U", (1, "a", None)), (2, "U", (2, "b", None))]
    assert change_log.read_closed(conn, 1, 100, lambda c: 3)[0][0] == 2
    assert [r[0] for r in change_log.read_closed(conn, 0, 1, lambda c: 3)] == [1]
    assert not conn.in_transaction


def test_read_closed_reads_as_many_value_columns_as_the_width_says(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'a', 'b')")
    change_log.close_group(conn)
    seen: list[bool] = []

    def width(c: sqlite3.Connection) -> int:
        seen.append(c.in_transaction)  # asked inside the read's own snapshot
        return 2

    (row,) = change_log.read_closed(conn, 0, 10, width)
    assert row[5:] == (1, "a")
    assert seen == [True]
    assert len(change_log.read_closed(conn, 0, 10, lambda c: 0)[0]) == 6  # at least one value column


def test_trim_deletes_acknowledged_rows_and_keeps_the_sequence(conn: sqlite3.Connection) -> None:
    for i in range(5):
        tx(conn, f"INSERT INTO t VALUES ({i}, 'x', NULL)")
    assert change_log.bounds(conn) == (1, 5)
    change_log.trim(conn, 3)
    assert [r[0] for r in log_rows(conn)] == [4, 5]
    assert change_log.bounds(conn) == (4, 5)
    change_log.trim(conn, 5)
    assert change_log.bounds(conn) == (0, 5)
    assert change_log.last_committed_seq(conn) == 5
    tx(conn, "INSERT INTO t VALUES (9, 'x', NULL)")
    assert log_rows(conn)[0][0] == 6, "sequence numbers are never reused after a trim"


def test_backlog_is_the_newest_seq_and_when_the_oldest_unacked_change_was_logged(conn: sqlite3.Connection) -> None:
    assert change_log.backlog(conn, 0) == (0, None)
    before = time.time()
    tx(conn, "INSERT INTO t VALUES (1, 'x', NULL)")
    tx(conn, "INSERT INTO t VALUES (2, 'x', NULL)")
    last, oldest = change_log.backlog(conn, 0)
    assert last == 2
    assert oldest is not None and before - 1 <= oldest <= time.time() + 1
    assert change_log.backlog(conn, 2) == (2, None)


# --------------------------------------------------------------------------- exact change detection


def test_update_that_changes_only_the_storage_class_is_captured(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'x', 0)")
    tx(conn, "UPDATE t SET b = 0.0 WHERE id = 1")  # 0 == 0.0 numerically, but INTEGER became REAL
    last = changes(conn)[-1]
    assert last == ("U", 1, "x", 0.0) and type(last[3]) is float


def test_update_a_collation_calls_equal_is_captured(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE ci (id TEXT COLLATE NOCASE PRIMARY KEY, s TEXT COLLATE NOCASE)")
    change_log.create_triggers(conn, "ci", ("id", "s"), ("id",), LAYOUT + 1)
    tx(conn, "INSERT INTO ci VALUES ('k', 'a')")
    tx(conn, "UPDATE ci SET s = 'A'")
    tx(conn, "UPDATE ci SET id = 'K'")  # a key change the NOCASE key calls equal: old key deleted, new row upserted
    assert changes(conn, 2)[-3:] == [("U", "k", "A"), ("D", "k"), ("U", "K", "A")]


def test_update_that_changes_nothing_logs_nothing(conn: sqlite3.Connection) -> None:
    tx(conn, "INSERT INTO t VALUES (1, 'x', 2.5)")
    before = len(log_rows(conn))
    tx(conn, "UPDATE t SET a = a, b = b WHERE id = 1")
    assert len(log_rows(conn)) == before


def test_triggers_of_older_capture_rules_are_not_current(conn: sqlite3.Connection) -> None:
    assert change_log.triggers_present(conn, "t")
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = '_cr_t_upd'").fetchone()[0]
    conn.execute('DROP TRIGGER "_cr_t_upd"')
    conn.execute(sql.replace(f"/* capture v{change_log.CAPTURE_VERSION} */", ""))  # as a previous build made it
    assert not change_log.triggers_present(conn, "t")
