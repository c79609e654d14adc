"""SQL text built in one place (agent_client/statements.py): the script splitter and the upsert statement."""

from __future__ import annotations

import sqlite3

import pytest

from agent_client import MigrationFailed, safe_declared_type, split_statements, upsert_sql
from agent_client.migration import _statements as migration_statements


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("", []),
        ("  \n ;; \n", []),
        ("SELECT 1", ["SELECT 1"]),
        ("SELECT 1;SELECT 2;", ["SELECT 1;", "SELECT 2;"]),
        ("ALTER TABLE t ADD c; UPDATE t SET c = 1;", ["ALTER TABLE t ADD c;", "UPDATE t SET c = 1;"]),
        ("INSERT INTO t VALUES ('a;b'); SELECT 2;", ["INSERT INTO t VALUES ('a;b');", "SELECT 2;"]),
        ('INSERT INTO "we;ird" VALUES (1);', ['INSERT INTO "we;ird" VALUES (1);']),
        ("SELECT 1; -- a note; more\nSELECT 2;", ["SELECT 1;", "-- a note; more\nSELECT 2;"]),
        ("SELECT /* x; y */ 1;", ["SELECT /* x; y */ 1;"]),
        (
            "CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 1; DELETE FROM u; END;\nSELECT 3;",
            ["CREATE TRIGGER tr AFTER INSERT ON t BEGIN UPDATE t SET a = 1; DELETE FROM u; END;", "SELECT 3;"],
        ),
        ("SELECT 1;\nSELECT 2", ["SELECT 1;", "SELECT 2"]),
    ],
    ids=["empty", "blank", "no-semicolon", "two", "one-line", "string", "quoted-name", "line-comment",
         "block-comment", "trigger", "trailing"],
)  # fmt: skip
def test_split_statements_cuts_only_where_sqlite_would(script: str, expected: list[str]) -> None:
    assert split_statements(script) == expected


def test_split_statements_runs_as_the_script_does() -> None:
    script = """
    CREATE TABLE t (a TEXT, n INTEGER);
    CREATE TABLE u (x);
    CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO u VALUES ('in;trigger'); UPDATE t SET n = 1; END;
    INSERT INTO t (a) VALUES ('x;y'); -- done; really
    """
    one, two = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    one.executescript(script)
    for stmt in split_statements(script):
        two.execute(stmt)
    for table in ("t", "u"):
        assert one.execute(f"SELECT * FROM {table}").fetchall() == two.execute(f"SELECT * FROM {table}").fetchall()
    assert two.execute("SELECT a, n FROM t").fetchall() == [("x;y", 1)]


def test_migration_refuses_an_incomplete_trailing_statement() -> None:
    assert migration_statements("CREATE TABLE t (a);\nINSERT INTO t VALUES (1)") == [
        "CREATE TABLE t (a);",
        "INSERT INTO t VALUES (1)",
    ]
    with pytest.raises(MigrationFailed, match="incomplete"):
        migration_statements("CREATE TABLE t (a);\nCREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1;")
    with pytest.raises(MigrationFailed, match="incomplete"):
        migration_statements("INSERT INTO t VALUES ('unterminated")


# --------------------------------------------------------------------------- upsert_sql


def test_upsert_updates_only_the_given_non_key_columns() -> None:
    assert upsert_sql("t", ["id", "a"], ["id"]) == (
        'INSERT INTO "t" ("id", "a") VALUES (?, ?) ON CONFLICT ("id") DO UPDATE SET "a" = excluded."a"'
    )


def test_upsert_of_key_columns_only_does_nothing_on_conflict() -> None:
    assert upsert_sql("t", ["k1", "k2"], ["k1", "k2"]) == (
        'INSERT INTO "t" ("k1", "k2") VALUES (?, ?) ON CONFLICT ("k1", "k2") DO NOTHING'
    )


def test_upsert_without_a_key_is_a_plain_insert() -> None:
    assert upsert_sql("log", ["a", "b"], []) == 'INSERT INTO "log" ("a", "b") VALUES (?, ?)'


def test_upsert_sql_runs_and_keeps_columns_not_given() -> None:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT)")
    conn.execute(upsert_sql("t", ["id", "a", "b"], ["id"]), (1, "a1", "b1"))
    conn.execute(upsert_sql("t", ["id", "a"], ["id"]), (1, "a2"))
    conn.execute(upsert_sql("t", ["id"], ["id"]), (1,))
    assert conn.execute("SELECT id, a, b FROM t").fetchall() == [(1, "a2", "b1")]


@pytest.mark.parametrize(
    ("decl", "kept"),
    [
        ("TEXT", "TEXT"),
        ("unsigned big int", "unsigned big int"),
        ("DECIMAL(10, 2)", "DECIMAL(10, 2)"),
        ("TEXT UNIQUE", ""),
        ("INT CHECK (0)", ""),
        ("INT NOT NULL", ""),
        ("TEXT DEFAULT x", ""),
        ("INT PRIMARY KEY", ""),
        ("TEXT COLLATE NOCASE", ""),
        ("INT AS (1)", ""),
        ("INT); DROP TABLE t; --", ""),
    ],
)
def test_a_declared_type_from_another_party_is_never_a_constraint(decl: str, kept: str) -> None:
    """Follower copies and central copies build DDL from a layout another process sent: a type with a constraint
    in it (which would make the copy refuse or drop rows) is dropped to no declared type."""
    assert safe_declared_type(decl) == kept
    conn = sqlite3.connect(":memory:")
    conn.execute(f'CREATE TABLE t ("a" {safe_declared_type(decl)}, "b")')
    conn.executemany("INSERT INTO t VALUES (?, ?)", [(None, 1), (None, 1), (0, 2)])
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 3
