"""Schema changes of captured tables (agent_client/schema_change.py, catalog.resync_schema) on real SQLite files.

DROP COLUMN of an `always` table through agent_client, and RENAME TO by anyone: the capture follows, and the
log says what the HTPC must do (S + snapshot, X), in the same transaction as the DDL.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import Migration, Visibility, catalog, change_log, migration, schema_change
from agent_client.local_store import connect


def in_tx(conn: sqlite3.Connection, fn: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        out = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return out


def declare(conn: sqlite3.Connection, table: str, vis: str) -> None:
    in_tx(conn, lambda c: catalog.apply_visibility(c, table, Visibility(vis)))


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "agent.db"


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    c = connect(db)
    catalog.init_schema(c, "agent-1")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, x REAL, b BLOB)")
    c.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", [(1, "one", 1.5, b"\x01"), (2, "two", None, None)])
    declare(c, "t", "always")
    c.execute("DELETE FROM _cr_log")
    try:
        yield c
    finally:
        c.close()


def log(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    """(op, table, columns of the layout) of every change logged."""
    return conn.execute(
        "SELECT op, l.tbl, l.columns FROM _cr_log JOIN _cr_layouts l ON l.id = _cr_log.layout ORDER BY seq"
    ).fetchall()


def visibility(conn: sqlite3.Connection) -> dict[str, str]:
    return {name: vis.value for name, (vis, _l, _s) in catalog.current_tables(conn).items()}


def triggers(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    return {
        (str(r[0]), str(r[1])) for r in conn.execute("SELECT name, tbl_name FROM sqlite_master WHERE type = 'trigger'")
    }


def test_sqlite_itself_refuses_drop_column_while_the_capture_names_it(conn: sqlite3.Connection) -> None:
    """What another process's plain sqlite3 connection meets: refused, nothing changed."""
    with pytest.raises(sqlite3.OperationalError, match=r"error in trigger _cr_t_\w+ after drop column"):
        conn.execute("ALTER TABLE t DROP COLUMN x")
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["id", "a", "x", "b"]
    assert change_log.triggers_present(conn, "t")


def test_drop_column_through_agent_client_recaptures_in_the_same_transaction(conn: sqlite3.Connection) -> None:
    in_tx(conn, lambda c: schema_change.execute(c, "ALTER TABLE t DROP COLUMN x"))
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["id", "a", "b"]
    assert change_log.triggers_present(conn, "t")
    assert log(conn) == [("S", "t", '["id", "a", "b"]')] + [("U", "t", '["id", "a", "b"]')] * 2
    images = conn.execute("SELECT v0, v1, v2 FROM _cr_log WHERE op = 'U' ORDER BY seq").fetchall()
    assert images == [(1, "one", b"\x01"), (2, "two", None)]
    conn.execute("DELETE FROM _cr_log")
    conn.execute("INSERT INTO t VALUES (3, 'three', x'03')")  # captured under the new layout
    assert log(conn) == [("U", "t", '["id", "a", "b"]')]
    assert visibility(conn) == {"t": "always"}


def test_drop_column_in_a_migration_style_script(conn: sqlite3.Connection) -> None:
    def script(c: sqlite3.Connection) -> None:
        schema_change.run_statement(c, "ALTER TABLE t DROP COLUMN x")
        schema_change.run_statement(c, "UPDATE t SET a = 'changed' WHERE id = 2")  # not captured: no triggers
        catalog.resync_schema(c)  # ... but the snapshot after it has it

    in_tx(conn, script)
    assert [op for op, _t, _c in log(conn)] == ["S", "U", "U"]
    assert conn.execute("SELECT v1 FROM _cr_log WHERE op = 'U' AND v0 = 2").fetchone() == ("changed",)


def test_a_statement_refused_for_another_reason_still_fails_and_changes_nothing(conn: sqlite3.Connection) -> None:
    with pytest.raises(sqlite3.OperationalError, match="cannot drop PRIMARY KEY column"):
        in_tx(conn, lambda c: schema_change.execute(c, "ALTER TABLE t DROP COLUMN id"))
    with pytest.raises(sqlite3.OperationalError, match="no such column"):
        in_tx(conn, lambda c: schema_change.execute(c, "ALTER TABLE t DROP COLUMN nope"))
    assert change_log.triggers_present(conn, "t") and log(conn) == []


def test_a_rename_by_another_process_is_followed_at_the_next_schema_check(conn: sqlite3.Connection, db: Path) -> None:
    """Visibility follows the table: X for the old name, S + snapshot for the new, the capture under the new name."""
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('ALTER TABLE t RENAME TO u'); c.execute(\"INSERT INTO u VALUES (5, 'five', 5.0, NULL)\"); "
            "c.commit()",
            str(db),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert other.returncode == 0, other.stderr
    # SQLite moved the triggers with the table and kept their names: the write after the rename was captured,
    # under the old layout (the HTPC applies it to t, then learns of the rename).
    assert ("_cr_t_ins", "u") in triggers(conn)
    assert log(conn) == [("U", "t", '["id", "a", "x", "b"]')]
    touched = in_tx(conn, catalog.resync_schema)
    assert set(touched) == {"t", "u"}
    assert visibility(conn) == {"u": "always"}
    assert (
        log(conn)[1:]
        == [("X", "t", "[]"), ("S", "u", '["id", "a", "x", "b"]')] + [("U", "u", '["id", "a", "x", "b"]')] * 3
    )
    assert {name for name, _tbl in triggers(conn)} == {"_cr_u_ins", "_cr_u_upd", "_cr_u_del"}
    assert in_tx(conn, catalog.resync_schema) == [], "a second check finds nothing to do"


def test_rename_through_agent_client_keeps_the_visibility_of_an_on_demand_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE od (k TEXT PRIMARY KEY)")
    declare(conn, "od", "on_demand")
    conn.execute("DELETE FROM _cr_log")
    in_tx(conn, lambda c: schema_change.execute(c, "/* why */ ALTER TABLE od RENAME TO od2"))
    assert visibility(conn) == {"t": "always", "od2": "on_demand"}
    assert [(op, table) for op, table, _c in log(conn)] == [("X", "od"), ("V", "od2")]


def test_rename_to_a_name_that_cannot_be_replicated_leaves_it_private(conn: sqlite3.Connection) -> None:
    in_tx(conn, lambda c: schema_change.execute(c, 'ALTER TABLE t RENAME TO "my table"'))
    assert visibility(conn) == {}
    assert [(op, table) for op, table, _c in log(conn)] == [("X", "t")]
    assert triggers(conn) == set(), "no capture left on the renamed table"


def test_a_new_table_under_the_old_name_is_a_new_table(conn: sqlite3.Connection) -> None:
    def script(c: sqlite3.Connection) -> None:
        schema_change.execute(c, "ALTER TABLE t RENAME TO archive")
        schema_change.execute(c, "CREATE TABLE t (id INTEGER PRIMARY KEY, fresh TEXT)")

    in_tx(conn, script)
    assert visibility(conn) == {"archive": "always"}
    assert ("_cr_archive_ins", "archive") in triggers(conn)
    assert not any(tbl == "t" for _n, tbl in triggers(conn))


def test_plain_writes_do_not_touch_the_catalog(conn: sqlite3.Connection) -> None:
    layouts = conn.execute("SELECT count(*) FROM _cr_layouts").fetchone()
    rows = in_tx(conn, lambda c: schema_change.execute(c, "INSERT INTO t VALUES (7, 'x', 1, NULL) RETURNING id, a"))
    assert rows == [{"id": 7, "a": "x"}]
    assert conn.execute("SELECT count(*) FROM _cr_layouts").fetchone() == layouts
    assert [op for op, _t, _c in log(conn)] == ["U"]


def test_in_a_migration_renames_are_followed_and_a_drop_plus_create_is_not_a_rename(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE od (k TEXT PRIMARY KEY)")
    declare(conn, "od", "on_demand")
    migration.init_schema(conn)
    done = migration.apply_migrations(
        conn,
        [
            Migration(1, "ALTER TABLE od RENAME TO od_tmp; ALTER TABLE od_tmp RENAME TO od2"),
            # not a rename: a new table must never inherit a dropped one's visibility
            Migration(2, "DROP TABLE t; CREATE TABLE fresh (id INTEGER PRIMARY KEY, secret TEXT)"),
        ],
    )
    assert done == [1, 2]
    assert visibility(conn) == {"od2": "on_demand"}
    assert triggers(conn) == set()


def test_the_shell_recipe_drop_the_capture_then_the_column_is_recaptured_at_the_next_check(
    conn: sqlite3.Connection, db: Path
) -> None:
    """What the README tells sqlite3-shell users: drop the three capture triggers and the column in one
    transaction; the agent re-captures with S + snapshot (what changed meanwhile is in the snapshot)."""
    shell = sqlite3.connect(db, isolation_level=None)
    shell.executescript(
        "BEGIN; DROP TRIGGER _cr_t_ins; DROP TRIGGER _cr_t_upd; DROP TRIGGER _cr_t_del;"
        " ALTER TABLE t DROP COLUMN x; UPDATE t SET a = 'uncaptured' WHERE id = 1; COMMIT;"
    )
    shell.close()
    assert log(conn) == []
    assert in_tx(conn, catalog.resync_schema) == ["t"]
    assert [op for op, _t, _c in log(conn)] == ["S", "U", "U"]
    assert {c for _op, _t, c in log(conn)} == {'["id", "a", "b"]'}
    assert conn.execute("SELECT v1 FROM _cr_log WHERE op = 'U' AND v0 = 1").fetchone() == ("uncaptured",)
    assert change_log.triggers_present(conn, "t")
