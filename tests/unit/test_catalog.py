"""The catalog (agent_client/catalog.py) on a real SQLite database: epoch, layouts, visibility, resync."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import (
    InvalidIdentifier,
    MissingPrimaryKey,
    TableTooWide,
    UnknownTable,
    Visibility,
    catalog,
    change_log,
)

ALWAYS, ON_DEMAND, PRIVATE = Visibility.ALWAYS, Visibility.ON_DEMAND, Visibility.PRIVATE


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    c = sqlite3.connect(db, isolation_level=None)
    catalog.init_schema(c, "agent-1")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b REAL)")
    c.executemany("INSERT INTO t VALUES (?, ?, ?)", [(1, "x", 1.5), (2, "y", None)])
    try:
        yield c
    finally:
        c.close()


def log(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """(op, layout, v0) of every logged change."""
    return conn.execute("SELECT op, layout, v0 FROM _cr_log ORDER BY seq").fetchall()


def set_visibility(conn: sqlite3.Connection, table: str, visibility: Visibility) -> bool:
    conn.execute("BEGIN IMMEDIATE")
    try:
        changed = catalog.apply_visibility(conn, table, visibility)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return changed


# --------------------------------------------------------------------------- identity


def test_init_schema_keeps_one_epoch_per_database(db: Path) -> None:
    c = sqlite3.connect(db, isolation_level=None)
    epoch = catalog.init_schema(c, "agent-1")
    assert len(epoch) == 16 and int(epoch, 16) >= 0
    assert catalog.init_schema(c, "agent-1") == epoch
    c.close()
    again = sqlite3.connect(db, isolation_level=None)
    assert catalog.init_schema(again, "agent-1") == epoch
    tables = {r[0] for r in again.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"_cr_meta", "_cr_layouts", "_cr_tables", "_cr_log", "_cr_clock"} <= tables
    again.close()
    assert catalog.init_schema(sqlite3.connect(db.with_name("other.db"), isolation_level=None), "agent-1") != epoch


def test_a_database_of_another_agent_is_refused(db: Path) -> None:
    c = sqlite3.connect(db, isolation_level=None)
    catalog.init_schema(c, "agent-1")
    with pytest.raises(InvalidIdentifier, match="belongs to agent 'agent-1'"):
        catalog.init_schema(c, "agent-2")
    assert not c.in_transaction


def test_an_old_layouts_table_gains_declared_types(db: Path) -> None:
    c = sqlite3.connect(db, isolation_level=None)
    c.execute(
        "CREATE TABLE _cr_layouts (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, columns TEXT NOT NULL, "
        "pk TEXT NOT NULL, sql TEXT, visibility TEXT NOT NULL)"
    )
    catalog.init_schema(c, "agent-1")
    assert "types" in {r[1] for r in c.execute("PRAGMA table_info(_cr_layouts)")}


# --------------------------------------------------------------------------- tables


def test_table_info_describes_columns_key_and_types(conn: sqlite3.Connection) -> None:
    info = catalog.table_info(conn, "t")
    assert (info.columns, info.pk, info.types, info.integer_pk) == (
        ("id", "a", "b"),
        ("id",),
        ("INTEGER", "TEXT", "REAL"),
        True,
    )
    conn.execute("CREATE TABLE k (x TEXT, y INTEGER, PRIMARY KEY (y, x))")
    assert catalog.table_info(conn, "k").pk == ("y", "x")
    assert not catalog.table_info(conn, "k").integer_pk
    with pytest.raises(UnknownTable):
        catalog.table_info(conn, "nope")
    with pytest.raises(UnknownTable):
        catalog.table_info(conn, "_cr_log")
    assert catalog.user_tables(conn) == ["k", "t"]


def test_only_tables_with_a_key_plain_names_and_few_columns_can_be_always(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE nokey (a)")
    conn.execute('CREATE TABLE oddcol (id INTEGER PRIMARY KEY, "a b" TEXT)')
    wide = ", ".join(f"c{i}" for i in range(change_log.MAX_COLUMNS))
    conn.execute(f"CREATE TABLE wide (id INTEGER PRIMARY KEY, {wide})")
    with pytest.raises(MissingPrimaryKey):
        set_visibility(conn, "nokey", ALWAYS)
    with pytest.raises(InvalidIdentifier):
        set_visibility(conn, "oddcol", ALWAYS)
    with pytest.raises(TableTooWide):
        set_visibility(conn, "wide", ALWAYS)
    assert log(conn) == [] and catalog.current_tables(conn) == {}


# --------------------------------------------------------------------------- visibility


def test_always_logs_a_schema_change_and_a_snapshot_then_captures(conn: sqlite3.Connection) -> None:
    assert set_visibility(conn, "t", ALWAYS)
    (lid,) = {r[1] for r in log(conn)}
    assert [(op, v0) for op, _l, v0 in log(conn)] == [("S", None), ("U", 1), ("U", 2)]
    layout = catalog.load_layouts(conn, {lid})[lid]
    assert (layout.table, layout.columns, layout.pk, layout.types) == (
        "t",
        ("id", "a", "b"),
        ("id",),
        ("INTEGER", "TEXT", "REAL"),
    )
    assert layout.visibility == "always" and layout.sql is not None and "CREATE TABLE t" in layout.sql
    vis, table_layout, _sql = catalog.current_tables(conn)["t"]
    assert (vis, table_layout) == (ALWAYS, lid)
    conn.execute("INSERT INTO t VALUES (3, 'z', 0.5)")
    assert log(conn)[-1] == ("U", lid, 3)


def test_declaring_the_same_visibility_again_changes_nothing(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    before = log(conn)
    assert not set_visibility(conn, "t", ALWAYS)
    assert log(conn) == before
    set_visibility(conn, "t", ON_DEMAND)
    assert not set_visibility(conn, "t", ON_DEMAND)
    assert len(log(conn)) == len(before) + 1


def test_on_demand_stops_capture_and_announces_the_table(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    set_visibility(conn, "t", ON_DEMAND)
    op, lid, v0 = log(conn)[-1]
    assert (op, v0) == ("V", "on_demand")
    assert catalog.load_layouts(conn, {lid})[lid].visibility == "on_demand"
    assert not change_log.triggers_present(conn, "t")
    n = len(log(conn))
    conn.execute("INSERT INTO t VALUES (3, 'z', 0.5)")
    assert len(log(conn)) == n
    assert catalog.current_tables(conn)["t"][0] is ON_DEMAND


def test_private_after_always_tells_the_htpc_to_forget(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    assert set_visibility(conn, "t", PRIVATE)
    assert log(conn)[-1][0] == "X"
    assert "t" not in catalog.current_tables(conn)
    assert not change_log.triggers_present(conn, "t")


def test_private_for_a_table_the_htpc_never_knew_logs_nothing(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", PRIVATE)
    assert log(conn) == []
    set_visibility(conn, "t", ON_DEMAND)
    set_visibility(conn, "t", PRIVATE)
    assert [op for op, _l, _v in log(conn)] == ["V", "X"]


def test_back_to_always_takes_a_fresh_snapshot_with_a_new_layout(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    first = log(conn)[0][1]
    set_visibility(conn, "t", PRIVATE)
    set_visibility(conn, "t", ALWAYS)
    tail = log(conn)[-3:]
    assert [op for op, _l, _v in tail] == ["S", "U", "U"]
    assert tail[0][1] > first


# --------------------------------------------------------------------------- resync and layouts


def test_resync_recaptures_a_changed_table_and_forgets_a_dropped_one(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    conn.execute("CREATE TABLE d (id INTEGER PRIMARY KEY)")
    set_visibility(conn, "d", ALWAYS)
    assert catalog.resync_schema(conn) == []
    n = len(log(conn))
    conn.execute("ALTER TABLE t ADD COLUMN c TEXT")
    conn.execute("DROP TABLE d")
    assert sorted(catalog.resync_schema(conn)) == ["d", "t"]
    new = log(conn)[n:]
    assert [op for op, _l, _v in new] == ["X", "S", "U", "U"]
    lid = new[1][1]
    assert catalog.load_layouts(conn, {lid})[lid].columns == ("id", "a", "b", "c")
    assert set(catalog.current_tables(conn)) == {"t"}


def test_widest_layout_follows_new_layouts(conn: sqlite3.Connection) -> None:
    width = catalog.WidestLayout()
    assert width(conn) == 0
    set_visibility(conn, "t", ALWAYS)
    assert catalog.widest_layout(conn) == 3
    assert width(conn) == 3
    conn.execute("ALTER TABLE t ADD COLUMN c TEXT")
    conn.execute("ALTER TABLE t ADD COLUMN d TEXT")
    assert width(conn) == 3  # no new layout yet
    catalog.resync_schema(conn)
    assert width(conn) == 5
    assert catalog.load_layouts(conn, set()) == {}


def test_resync_recaptures_a_table_whose_triggers_older_rules_made(conn: sqlite3.Connection) -> None:
    set_visibility(conn, "t", ALWAYS)
    first_layout = log(conn)[0][1]
    sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = '_cr_t_upd'").fetchone()[0]
    conn.execute('DROP TRIGGER "_cr_t_upd"')
    conn.execute(sql.replace(f"/* capture v{change_log.CAPTURE_VERSION} */", ""))  # as a previous build made it
    conn.execute("BEGIN IMMEDIATE")
    assert catalog.resync_schema(conn) == ["t"]
    conn.execute("COMMIT")
    after = log(conn)[3:]  # S + 2 rows of the first snapshot come first
    assert [op for op, _l, _v in after] == ["S", "U", "U"] and {lid for _o, lid, _v in after} == {first_layout + 1}
    assert change_log.triggers_present(conn, "t")
