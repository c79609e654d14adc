"""The agent's side of a resync (agent_client/resync.py) on a real SQLite database: what it leaves in the log."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import InvalidResyncRequest, TableTooWide, Visibility, catalog, change_log, resync
from agent_client.local_store import connect

REQUEST = "0123456789abcdef0123456789abcdef"
OTHER = "fedcba9876543210fedcba9876543210"


def in_tx(conn: sqlite3.Connection, fn: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


@pytest.fixture
def conn(tmp_path: Path) -> Iterator[sqlite3.Connection]:
    c = connect(tmp_path / "agent.db")
    catalog.init_schema(c, "agent-1")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b BLOB)")
    c.execute("CREATE TABLE od (k TEXT PRIMARY KEY, n INTEGER)")
    c.execute("CREATE TABLE p (k TEXT PRIMARY KEY, secret TEXT)")
    c.execute("CREATE TABLE empty (id INTEGER PRIMARY KEY)")
    for table, vis in (("t", "always"), ("od", "on_demand"), ("p", "private"), ("empty", "always")):
        in_tx(c, lambda c, table=table, vis=vis: catalog.apply_visibility(c, table, Visibility(vis)))
    c.executemany("INSERT INTO t VALUES (?, ?, ?)", [(1, "x", b"\x00"), (2, "y", None), (3, "z", b"")])
    c.execute("INSERT INTO od VALUES ('a', 1)")
    c.execute("INSERT INTO p VALUES ('k', 'never leaves')")
    change_log.close_group(c)
    c.execute("UPDATE t SET a = 'x2' WHERE id = 1")  # an unpublished change in the open group
    try:
        yield c
    finally:
        c.close()


def log(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """(seq, tx, op, table of the layout or None, v0) of every row of the log."""
    return conn.execute(
        "SELECT seq, tx, op, (SELECT tbl FROM _cr_layouts WHERE id = layout), v0 FROM _cr_log ORDER BY seq"
    ).fetchall()


def test_resync_replaces_the_log_with_r_and_a_full_snapshot(conn: sqlite3.Connection) -> None:
    before = log(conn)
    last_before = change_log.last_committed_seq(conn)
    served = in_tx(conn, lambda c: resync.serve(c, REQUEST))
    assert served.new and served.request_id == REQUEST
    assert served.at_seq == last_before + 1
    assert served.superseded == len(before)  # every row below the R went, published or not

    rows = log(conn)
    assert rows[0][0] == served.at_seq and rows[0][2] == "R" and rows[0][4] == REQUEST
    assert {r[1] for r in rows} == {rows[0][1]}, "the resync is one group of its own"
    assert rows[0][1] > max(r[1] for r in before), "the group open before the resync was closed first"
    assert [r[0] for r in rows] == list(range(served.at_seq, served.at_seq + len(rows))), "no gap after the R"
    ops = [(op, table) for _seq, _tx, op, table, _v0 in rows[1:]]
    assert ops == [("S", "empty"), ("V", "od"), ("S", "t"), ("U", "t"), ("U", "t"), ("U", "t")]
    assert [r[4] for r in rows if r[2] == "U"] == [1, 2, 3]
    assert all(table != "p" for *_x, table, _v0 in rows), "a private table never appears"
    # the snapshot has the current row images, bit for bit
    images = conn.execute("SELECT v0, v1, v2 FROM _cr_log WHERE op = 'U' ORDER BY seq").fetchall()
    assert images == conn.execute("SELECT id, a, b FROM t ORDER BY id").fetchall()
    meta = conn.execute("SELECT value FROM _cr_meta WHERE key = 'resync_request'").fetchone()[0]
    assert json.loads(meta) == {"request_id": REQUEST, "at_seq": served.at_seq}


def test_the_same_request_again_is_answered_without_new_work(conn: sqlite3.Connection) -> None:
    first = in_tx(conn, lambda c: resync.serve(c, REQUEST))
    conn.execute("INSERT INTO t VALUES (9, 'later', NULL)")  # a change after the resync
    rows = log(conn)
    again = in_tx(conn, lambda c: resync.serve(c, REQUEST))
    assert (again.at_seq, again.new) == (first.at_seq, False)
    assert log(conn) == rows, "a repeated request changed the log"
    other = in_tx(conn, lambda c: resync.serve(c, OTHER))
    assert other.new and other.at_seq > rows[-1][0]
    assert log(conn)[0][2:] == ("R", None, OTHER)


def test_a_failed_resync_changes_nothing(conn: sqlite3.Connection) -> None:
    # Out-of-band DDL made a declared `always` table too wide to capture: the resync fails as a whole.
    conn.execute("CREATE TABLE wide (id INTEGER PRIMARY KEY)")
    in_tx(conn, lambda c: catalog.apply_visibility(c, "wide", Visibility.ALWAYS))
    rows = log(conn)
    for i in range(change_log.MAX_COLUMNS):
        conn.execute(f"ALTER TABLE wide ADD COLUMN c{i}")
    with pytest.raises(TableTooWide, match="columns; at most"):
        in_tx(conn, lambda c: resync.serve(c, REQUEST))
    assert log(conn) == rows
    assert conn.execute("SELECT count(*) FROM _cr_meta WHERE key = 'resync_request'").fetchone()[0] == 0


@pytest.mark.parametrize("bad", ["", "0123", REQUEST.upper(), REQUEST + "0", None, 7, "g" * 32])
def test_a_bad_request_id_is_refused(conn: sqlite3.Connection, bad: Any) -> None:
    rows = log(conn)
    with pytest.raises(InvalidResyncRequest, match="32 lowercase hex"):
        in_tx(conn, lambda c: resync.serve(c, bad))
    assert log(conn) == rows
