"""`python -m agent_client` (agent_client/cli.py) on real SQLite files: sql and vacuum, and its refusals."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from agent_client import Visibility, catalog
from agent_client.cli import main
from agent_client.local_store import connect


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "agent.db"
    c = connect(path)
    catalog.init_schema(c, "agent-1")
    c.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, x BLOB)")
    c.execute("INSERT INTO t VALUES (1, 'one', x'00ff'), (2, CAST(x'ff' AS TEXT), NULL)")
    c.execute("BEGIN IMMEDIATE")
    catalog.apply_visibility(c, "t", Visibility.ALWAYS)
    c.execute("COMMIT")
    c.close()
    return path


def columns(db: Path) -> list[str]:
    c = sqlite3.connect(db)
    try:
        return [str(r[1]) for r in c.execute("PRAGMA table_info(t)")]
    finally:
        c.close()


def test_sql_drops_a_column_of_an_always_table_and_prints_rows(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", str(db), "ALTER TABLE t DROP COLUMN x; SELECT id, a FROM t ORDER BY id"]) == 0
    assert columns(db) == ["id", "a"]
    out = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out == [{"id": 1, "a": "one"}, {"id": 2, "a": {"t": "/w=="}}]  # wire form: not UTF-8 is tagged
    c = sqlite3.connect(db)
    assert [r[0] for r in c.execute("SELECT op FROM _cr_log ORDER BY seq")][-3:] == ["S", "U", "U"]
    c.close()


def test_sql_that_fails_changes_nothing(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sql", str(db), "ALTER TABLE t DROP COLUMN x; ALTER TABLE t DROP COLUMN nope"]) == 1
    assert "no such column" in capsys.readouterr().err
    assert columns(db) == ["id", "a", "x"], "the first statement of the failed transaction stayed"


@pytest.mark.parametrize("make", ["missing", "plain", "garbage"])
def test_only_agent_databases_are_touched(tmp_path: Path, make: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "other.db"
    if make == "plain":
        sqlite3.connect(path).execute("CREATE TABLE t (id)").connection.close()
    elif make == "garbage":
        path.write_bytes(b"not a database at all" * 100)
    assert main(["sql", str(path), "DROP TABLE t"]) == 2
    assert "error:" in capsys.readouterr().err
    if make == "plain":  # left exactly as it was: its table, and not switched to WAL
        c = sqlite3.connect(path)
        assert c.execute("SELECT count(*) FROM sqlite_master").fetchone() == (1,)
        assert c.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        c.close()


def test_vacuum_converts_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    c = sqlite3.connect(path)  # made like an older build: auto_vacuum NONE
    catalog.init_schema(c, "agent-1")
    c.execute("CREATE TABLE big (v)")
    c.executemany("INSERT INTO big VALUES (?)", [("x" * 500,)] * 2000)
    c.commit()
    c.execute("DELETE FROM big")
    c.commit()
    assert c.execute("PRAGMA auto_vacuum").fetchone() == (0,) and c.execute("PRAGMA freelist_count").fetchone()[0] > 100
    c.close()
    size = path.stat().st_size
    done = subprocess.run(
        [sys.executable, "-m", "agent_client", "vacuum", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "auto_vacuum none -> incremental" in done.stdout
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA auto_vacuum").fetchone() == (2,) and c.execute("PRAGMA freelist_count").fetchone() == (0,)
    c.close()
    assert path.stat().st_size < size / 4
