"""Bad input of any kind gets its own named error and leaves the agent's database exactly as it was."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_client import (
    AgentStorage,
    AgentStorageError,
    ConstraintViolation,
    FlushTimeout,
    InvalidAgentId,
    InvalidIdentifier,
    InvalidRow,
    InvalidVisibility,
    Migration,
    MigrationConflict,
    MigrationFailed,
    MissingPrimaryKey,
    StorageClosed,
    UnknownTable,
    Visibility,
)
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import (
    assert_exactly_once,
    assert_rows_identical,
    changes_of,
    flatten,
    local_rows,
    read_agent_stream,
    replay,
    storage,
)

AGENT = "agent-1"
SCHEMA = Migration(
    1,
    """
    CREATE TABLE items (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        qty INTEGER CHECK (qty >= 0)
    );
    CREATE TABLE tags (item INTEGER NOT NULL REFERENCES items (id), tag TEXT NOT NULL, PRIMARY KEY (item, tag));
    CREATE TABLE nopk (a, b);
    """,
    "base",
)


@pytest.fixture
async def st(tmp_path: Path) -> AsyncIterator[AgentStorage]:
    """An offline storage (no NATS needed to be wrong) with a schema and a few rows."""
    storage_ = AgentStorage(AGENT, tmp_path / "agents", replicate=False)
    async with storage_:
        assert await storage_.migrate([SCHEMA]) == [1]
        await storage_.set_visibility("items", "always")
        await storage_.set_visibility("tags", "always")
        for i in range(3):
            await storage_.write_data("items", {"id": i, "name": f"item {i}", "qty": i})
        await storage_.write_data("tags", {"item": 0, "tag": "red"})
        yield storage_


async def snapshot(st: AgentStorage) -> dict[str, Any]:
    """Everything an error must not change: rows, change log position, schema, visibility, migrations."""
    out: dict[str, Any] = {"seq": await st.last_committed_seq(), "visibility": await st.visibility()}
    for table in await st.visibility():
        out[table] = await st.query_local(f'SELECT * FROM "{table}" ORDER BY rowid')
    out["schema"] = await st.query_local("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
    out["migrations"] = await st.query_local("SELECT version, checksum FROM _cr_schema_version ORDER BY version")
    out["log"] = await st.query_local("SELECT count(*) AS n FROM _cr_log")
    return out


async def assert_rejected(st: AgentStorage, error: type[BaseException], call: Any, match: str | None = None) -> None:
    before = await snapshot(st)
    with pytest.raises(error, match=match):
        await call()
    after = await snapshot(st)
    assert after == before, "a rejected call changed the database"


# --------------------------------------------------------------------------- agent ids


@pytest.mark.parametrize(
    "bad",
    [
        *("", "Agent", "agent 1", "a.b", "a*", "a>", "-agent", "_agent", "a" * 65),
        *("agent/1", "../etc", "agént", "a\n", 7, None, b"agent"),
    ],
    ids=repr,
)
def test_invalid_agent_id_is_rejected_before_anything_is_created(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(InvalidAgentId) as info:
        AgentStorage(bad, tmp_path / "agents")
    assert isinstance(info.value, ValueError) and isinstance(info.value, AgentStorageError)
    assert "a-z0-9" in str(info.value)
    assert not (tmp_path / "agents").exists()


async def test_database_of_another_agent_is_refused(tmp_path: Path) -> None:
    async with AgentStorage("first", tmp_path, replicate=False) as st:
        await st.migrate([SCHEMA])
        await st.set_visibility("items", "always")
        await st.write_data("items", {"name": "x"})
    shutil.copy(tmp_path / "first.db", tmp_path / "second.db")
    other = AgentStorage("second", tmp_path, replicate=False)
    with pytest.raises(InvalidIdentifier, match="belongs to agent"):
        await other.open()
    await other.close()
    conn = sqlite3.connect(tmp_path / "second.db")
    try:
        assert conn.execute("SELECT value FROM _cr_meta WHERE key = 'agent_id'").fetchone() == ("first",)
    finally:
        conn.close()


# --------------------------------------------------------------------------- tables and visibility


async def test_unknown_table(st: AgentStorage) -> None:
    for table in ("nope", "ITEMS2", "sqlite_master", "_cr_log", "_cr_meta", "", 42):
        await assert_rejected(st, UnknownTable, lambda t=table: st.write_data(t, {"id": 9}))
    await assert_rejected(st, UnknownTable, lambda: st.set_visibility("nope", "always"))
    await assert_rejected(st, UnknownTable, lambda: st.set_visibility("_cr_log", "always"))
    # a batch is all or nothing: the valid first item is not written either
    await assert_rejected(
        st,
        UnknownTable,
        lambda: st.batch_write([{"table": "items", "data": {"name": "ok"}}, {"table": "nope", "data": {"a": 1}}]),
    )

    async def in_transaction() -> None:
        async with st.transaction() as tx:
            await tx.write_data("items", {"name": "ok too"})
            await tx.write_data("nope", {"a": 1})

    await assert_rejected(st, UnknownTable, in_transaction)


@pytest.mark.parametrize("bad", ["public", "", "ALWAYS", "Always", "on-demand", "ondemand", None, 1, True])
async def test_invalid_visibility(st: AgentStorage, bad: Any) -> None:
    await assert_rejected(st, InvalidVisibility, lambda: st.set_visibility("items", bad), match="always")
    await assert_rejected(st, InvalidVisibility, lambda: st.set_visibility("nopk", bad))
    assert (await st.visibility())["items"] is Visibility.ALWAYS


async def test_always_table_without_primary_key(st: AgentStorage) -> None:
    await assert_rejected(st, MissingPrimaryKey, lambda: st.set_visibility("nopk", "always"), match="PRIMARY KEY")
    assert (await st.visibility())["nopk"] is Visibility.PRIVATE
    triggers = await st.query_local("SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'nopk'")
    assert triggers == []
    seq = await st.last_committed_seq()
    await st.write_data("nopk", {"a": 1, "b": 2})  # still a fine private table
    assert await st.last_committed_seq() == seq
    # on_demand and private need no key
    await st.set_visibility("nopk", "on_demand")
    assert (await st.visibility())["nopk"] is Visibility.ON_DEMAND


# --------------------------------------------------------------------------- rows


class Opaque:
    pass


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"name": "x", "colour": "red"}, "colour"),
        ({"name": "x", "qty": 2**63}, "64 bits"),
        ({"name": "x", "qty": -(2**63) - 1}, "64 bits"),
        ({"name": "x", "qty": 10**30}, "64 bits"),
        ({"name": "x", "qty": object()}, "object"),
        ({"name": "x", "qty": Opaque()}, "Opaque"),
        ({"name": "x", "qty": {1, 2}}, "set"),
        ({"name": "x", "qty": 1j}, "complex"),
        ({"name": "x", "qty": [object()]}, "JSON"),
        ({"name": "x", "qty": {"nested": object()}}, "JSON"),
        ({}, "no values"),
        ([("name", "x")], "dict"),
        ("name=x", "dict"),
        (None, "dict"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
async def test_invalid_row(st: AgentStorage, data: Any, match: str) -> None:
    await assert_rejected(st, InvalidRow, lambda: st.write_data("items", data), match=match)
    await assert_rejected(
        st,
        InvalidRow,
        lambda: st.batch_write([{"table": "items", "data": {"name": "fine"}}, {"table": "items", "data": data}]),
    )


async def test_invalid_batch_shape_and_missing_key(st: AgentStorage) -> None:
    for batch in (
        [{"data": {"name": "x"}}],
        [{"table": "items"}],
        [{"table": "items", "data": "x"}],
        ["items"],
        [None],
    ):
        await assert_rejected(st, InvalidRow, lambda b=batch: st.batch_write([{"table": "items", "data": {}}, *b]))
    # a composite key cannot be generated
    await assert_rejected(st, InvalidRow, lambda: st.write_data("tags", {"item": 1}), match="tag")


async def test_valid_values_are_accepted_after_errors(st: AgentStorage) -> None:
    """The limits are exact: the largest and smallest 64-bit integers are fine."""
    await st.write_data("items", {"id": 2**63 - 1, "name": "max", "qty": 2**63 - 1})
    await st.write_data("items", {"id": -(2**63), "name": "min", "qty": 0})
    rows = await st.query_local("SELECT id, qty FROM items WHERE name IN ('max', 'min') ORDER BY id")
    assert rows == [{"id": -(2**63), "qty": 0}, {"id": 2**63 - 1, "qty": 2**63 - 1}]


# --------------------------------------------------------------------------- constraints


@pytest.mark.parametrize(
    ("data", "what"),
    [
        ({"name": "item 1"}, "UNIQUE"),
        ({"name": None}, "NOT NULL"),
        ({"name": "neg", "qty": -1}, "CHECK"),
    ],
)
async def test_constraint_violation(st: AgentStorage, data: dict[str, Any], what: str) -> None:
    await assert_rejected(st, ConstraintViolation, lambda: st.write_data("items", data), match=what)
    await assert_rejected(
        st,
        ConstraintViolation,
        lambda: st.batch_write([{"table": "items", "data": {"name": "fine"}}, {"table": "items", "data": data}]),
    )


async def test_foreign_key_and_raw_sql_violations_roll_back_the_transaction(st: AgentStorage) -> None:
    await assert_rejected(
        st, ConstraintViolation, lambda: st.write_data("tags", {"item": 999, "tag": "x"}), match="FOREIGN KEY"
    )

    async def raw() -> None:
        async with st.transaction() as tx:
            await tx.execute("INSERT INTO items (name, qty) VALUES ('fresh', 1)")
            await tx.execute("UPDATE items SET qty = qty + 1")
            await tx.execute("INSERT INTO items (name) VALUES ('item 2')")  # UNIQUE

    await assert_rejected(st, ConstraintViolation, raw, match="UNIQUE")


async def test_a_failing_write_does_not_undo_concurrent_good_writes(st: AgentStorage) -> None:
    """Group commit: writes that share a transaction with a failing one still commit, the bad one does not."""
    seq = await st.last_committed_seq()
    results = await asyncio.gather(
        st.write_data("items", {"name": "good 1", "qty": 1}),
        st.write_data("items", {"name": "item 0"}),  # UNIQUE
        st.write_data("items", {"name": "good 2", "qty": -5}),  # CHECK
        st.write_data("items", {"name": "good 3", "qty": 3}),
        return_exceptions=True,
    )
    assert isinstance(results[1], ConstraintViolation) and isinstance(results[2], ConstraintViolation)
    assert not isinstance(results[0], BaseException) and not isinstance(results[3], BaseException)
    names = {r["name"] for r in await st.query_local("SELECT name FROM items")}
    assert {"good 1", "good 3"} <= names and "good 2" not in names
    assert await st.last_committed_seq() == seq + 2  # only the two good rows were captured


# --------------------------------------------------------------------------- closed storage


async def test_closed_storage(tmp_path: Path) -> None:
    st = AgentStorage(AGENT, tmp_path, replicate=False)
    with pytest.raises(StorageClosed):
        await st.write_data("items", {"name": "x"})  # never opened
    async with st:
        await st.migrate([SCHEMA])
        await st.write_data("items", {"name": "x"})
    calls: list[Any] = [
        lambda: st.write_data("items", {"name": "y"}),
        lambda: st.batch_write([{"table": "items", "data": {"name": "y"}}]),
        lambda: st.query_local("SELECT 1"),
        lambda: st.set_visibility("items", "always"),
        lambda: st.visibility(),
        lambda: st.migrate([SCHEMA]),
        lambda: st.flush(),
        lambda: st.last_committed_seq(),
        lambda: st.health_check(),
        lambda: st.query_network("SELECT 1"),
    ]
    for call in calls:
        with pytest.raises(StorageClosed):
            await call()
    with pytest.raises(StorageClosed):
        async with st.transaction():
            pass
    await st.close()  # closing twice is fine
    conn = sqlite3.connect(st.db_path)
    try:
        assert conn.execute("SELECT name FROM items").fetchall() == [("x",)]
    finally:
        conn.close()


async def test_flush_without_replication_is_a_clear_error(st: AgentStorage) -> None:
    with pytest.raises(FlushTimeout, match="replicate=False"):
        await st.flush(timeout=0.1)


# --------------------------------------------------------------------------- migrations


async def test_rerunning_migrations_is_a_no_op(st: AgentStorage) -> None:
    m2 = Migration(2, "CREATE TABLE extra (id INTEGER PRIMARY KEY); CREATE INDEX extra_id ON extra (id);", "extra")
    assert await st.migrate([SCHEMA, m2]) == [2]
    before = await snapshot(st)
    assert await st.migrate([m2, SCHEMA]) == []
    assert await st.migrate([SCHEMA]) == []
    # whitespace around the SQL is not an edit
    assert await st.migrate([Migration(1, "\n" + SCHEMA.sql + "\n  ", "base")]) == []
    assert await snapshot(st) == before


async def test_edited_applied_migration_is_a_conflict(st: AgentStorage) -> None:
    edited = Migration(1, SCHEMA.sql.replace("qty >= 0", "qty >= -1"), "base")
    m2 = Migration(2, "CREATE TABLE later (id INTEGER PRIMARY KEY)")
    await assert_rejected(st, MigrationConflict, lambda: st.migrate([edited, m2]), match="different SQL")
    assert "later" not in await st.visibility()
    # an unapplied migration older than the newest applied one is refused too
    assert await st.migrate([SCHEMA, Migration(3, "CREATE TABLE three (id INTEGER PRIMARY KEY)")]) == [3]
    await assert_rejected(st, MigrationConflict, lambda: st.migrate([SCHEMA, m2]), match="older")


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE half (id INTEGER PRIMARY KEY); INSERT INTO missing_table VALUES (1);",
        "ALTER TABLE items ADD COLUMN colour TEXT; INSERT INTO items (name) VALUES ('item 0');",
        "CREATE TABLE half (id INTEGER PRIMARY KEY); DROP TABLE items; SELECT no_such_function();",
        "CREATE TABLE half (id INTEGER PRIMARY KEY",
        "THIS IS NOT SQL;",
    ],
    ids=["missing-table", "constraint", "unknown-function", "incomplete", "garbage"],
)
async def test_failing_migration_applies_nothing(st: AgentStorage, sql: str) -> None:
    await assert_rejected(st, MigrationFailed, lambda: st.migrate([SCHEMA, Migration(2, sql, "bad")]))
    assert "half" not in await st.visibility()
    # the storage is still usable, and a corrected migration 2 applies
    assert await st.migrate([SCHEMA, Migration(2, "CREATE TABLE half (id INTEGER PRIMARY KEY)")]) == [2]
    assert "half" in await st.visibility()


@pytest.mark.parametrize(
    "migrations",
    [
        [Migration(0, "CREATE TABLE z (id INTEGER PRIMARY KEY)")],
        [Migration(-1, "CREATE TABLE z (id INTEGER PRIMARY KEY)")],
        [Migration(2, "CREATE TABLE z (id INTEGER PRIMARY KEY)"), Migration(2, "CREATE TABLE y (id INTEGER)")],
        [Migration(2, "   ")],
        [Migration(True, "CREATE TABLE z (id INTEGER PRIMARY KEY)")],  # type: ignore[arg-type]
        [Migration("2", "CREATE TABLE z (id INTEGER PRIMARY KEY)")],  # type: ignore[arg-type]
        ["CREATE TABLE z (id INTEGER PRIMARY KEY)"],
        [None],
    ],
    ids=["zero", "negative", "duplicate", "empty", "bool", "str-version", "not-a-migration", "none"],
)
async def test_malformed_migration_sets_are_refused(st: AgentStorage, migrations: list[Any]) -> None:
    await assert_rejected(st, MigrationFailed, lambda: st.migrate([SCHEMA, *migrations]))


async def test_migration_that_adds_a_column_to_an_always_table_is_captured(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await st.migrate([SCHEMA])
        await st.set_visibility("items", "always")
        await st.write_data("items", {"id": 1, "name": "before", "qty": 1})
        await st.flush()
        seq = await st.last_committed_seq()
        m2 = Migration(2, "ALTER TABLE items ADD COLUMN colour TEXT DEFAULT 'grey'; UPDATE items SET qty = 5;")
        assert await st.migrate([SCHEMA, m2]) == [2]
        log = await st.query_local("SELECT op FROM _cr_log WHERE seq > ? ORDER BY seq", (seq,))
        # the UPDATE ran under the old triggers (U), then the re-capture: S + a snapshot of the row
        assert [r["op"] for r in log] == ["U", "S", "U"]
        await st.write_data("items", {"id": 2, "name": "after", "colour": "blue"})
        async with st.transaction() as tx:
            await tx.execute("UPDATE items SET colour = 'red' WHERE id = 1")
        # and a migration dropping a replicated table makes the HTPC forget it (X)
        m3 = Migration(3, "CREATE TABLE gone (id INTEGER PRIMARY KEY)")
        assert await st.migrate([SCHEMA, m2, m3]) == [3]
        await st.set_visibility("gone", "always")
        await st.migrate([SCHEMA, m2, m3, Migration(4, "DROP TABLE gone")])
        await st.flush()
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    items = changes_of(messages, "items")
    schema_changes = [c for c in items if c.op == "S"]
    assert len(schema_changes) == 2
    new_layout = schema_changes[-1].layout
    assert new_layout.columns == ["id", "name", "qty", "colour"]
    assert new_layout.sql is not None and "colour" in new_layout.sql
    after = items[items.index(schema_changes[-1]) + 1 :]
    assert [c.op for c in after] == ["U", "U", "U"]
    assert after[0].values == [1, "before", 5, "grey"]  # the snapshot row carries the new column
    assert after[1].values == [2, "after", None, "blue"]
    assert after[2].values == [1, "before", 5, "red"]
    # the migration's S and the snapshot travel with the migration's own changes, in one record
    assert len({c.record_index for c in items if c.seq > seq and c.seq <= seq + 3}) == 1
    assert [c.op for c in changes_of(messages, "gone")] == ["S", "X"]
    replicated = replay(flatten(messages))
    assert "gone" not in replicated
    assert_rows_identical(replicated["items"], local_rows(db_path, "items"))
