"""Capture: what an agent writes (API, raw SQL, other processes) reaches AGENT_CHANGES exactly as SQLite holds it.

Real nats-server (tests/nats_server.py), real SQLite files, the stream read back with an ordered consumer.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import shutil
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_client import AgentStorage, msg_id
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import (
    Change,
    StreamMessage,
    assert_exactly_once,
    assert_rows_identical,
    changes_of,
    create_tables,
    flatten,
    local_rows,
    msg_id_secret,
    read_agent_stream,
    replay,
    same_value,
    storage,
)

AGENT = "agent-1"


def external_connection(db_path: Path) -> sqlite3.Connection:
    """A second, plain sqlite3 connection to the agent's file (as any other library or tool would open it)."""
    conn = sqlite3.connect(db_path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def records_holding(messages: list[StreamMessage], seqs: set[int]) -> list[int]:
    """Indexes of the records that carry any of `seqs`."""
    return [i for i, m in enumerate(messages) if any(seq in seqs for seq, _op, _lid, _v in m.record.changes)]


# --------------------------------------------------------------------------- order, exactly once


async def test_every_change_arrives_in_order_exactly_once(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(
            st,
            "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)",
            "CREATE TABLE tags (item INTEGER, tag TEXT, PRIMARY KEY (item, tag)) WITHOUT ROWID",
            always=["items", "tags"],
        )
        for i in range(60):
            await st.write_data("items", {"id": i, "name": f"item {i}", "qty": i})
        # concurrent callers share group commits
        await asyncio.gather(*(st.write_data("items", {"id": i, "qty": -i - 1}) for i in range(0, 60, 3)))
        await st.batch_write([{"table": "tags", "data": {"item": i, "tag": t}} for i in range(10) for t in "ab"])
        async with st.transaction() as tx:
            await tx.execute("UPDATE items SET qty = qty + 1000 WHERE id < 10")
            await tx.execute("DELETE FROM tags WHERE tag = 'b'")
        conn = external_connection(st.db_path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM items WHERE id >= 50")
            conn.execute("INSERT INTO items (id, name) VALUES (1000, 'external')")
            conn.execute("COMMIT")
        finally:
            conn.close()
        await st.write_data("items", {"id": 1001, "name": "after external"})
        await st.flush(timeout=15)
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    # 2 tables x (S) + 60 inserts + 20 updates + 20 tag inserts + 10 updates + 10 deletes + 10 deletes + 2 inserts
    assert last == 2 + 60 + 20 + 20 + 10 + 10 + 10 + 2
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert len(messages) >= 2
    assert_exactly_once(messages, AGENT, epoch, last)
    firsts = [m.record.first_seq for m in messages]
    assert firsts == sorted(firsts), "records are out of order on the stream"
    replicated = replay(flatten(messages))
    for table in ("items", "tags"):
        assert_rows_identical(replicated[table], local_rows(db_path, table))


async def test_unchanged_update_is_not_a_change(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v)", always=["t"])
        await st.write_data("t", {"id": 1, "v": 1.5})
        before = await st.last_committed_seq()
        async with st.transaction() as tx:
            await tx.execute("UPDATE t SET v = v")
        await st.write_data("t", {"id": 1, "v": 1.5})
        assert await st.last_committed_seq() == before
        # but 1.5 -> '1.5' is a change of type, and must be captured
        await st.write_data("t", {"id": 1, "v": "1.5"})
        assert await st.last_committed_seq() == before + 1
        await st.flush()
    changes = changes_of(await read_agent_stream(nats_server.url, AGENT), "t")
    assert [c.op for c in changes] == ["S", "U", "U"]
    assert same_value(changes[-1].values[1], "1.5")


# --------------------------------------------------------------------------- type fidelity

EDGE_INTS = [-(2**63), -(2**63) + 1, -1, 0, 1, 2**31, 2**53 + 1, 2**63 - 2, 2**63 - 1]
EDGE_FLOATS = [
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2250738585072009e-308,
    1.7976931348623157e308,
    -1.7976931348623157e308,
    math.inf,
    -math.inf,
    1e16,
    0.1,
    float(2**63),
]
EDGE_TEXT = [
    *("", " ", "0", "1.0", "null", "🎉", "👩‍👩‍👧‍👦 family", "\u202etxet", "é\u0301"),
    *("\U0010ffff", "a\nb\tc", '{"b":"AA=="}'),
]
EDGE_BLOBS = [b"", b"\x00", b"\xff\xfe", bytes(range(256))]

sqlite_value = st.one_of(
    st.none(),
    st.sampled_from(EDGE_INTS),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from(EDGE_FLOATS),
    st.floats(allow_nan=False),
    st.sampled_from(EDGE_TEXT),
    st.text(alphabet=st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(EDGE_BLOBS),
    st.binary(max_size=40),
)
row_values = st.tuples(sqlite_value, sqlite_value, sqlite_value, sqlite_value, sqlite_value)
FIDELITY_DDL = (
    "CREATE TABLE loose (id INTEGER PRIMARY KEY, a, b, c, d, e)",
    "CREATE TABLE typed (id INTEGER PRIMARY KEY, i INTEGER, r REAL, t TEXT, b BLOB, n NUMERIC)",
)
_example_ids = itertools.count()


async def _fidelity_example(url: str, base: Path, rows: list[tuple[Any, ...]], paths: list[str]) -> None:
    n = next(_example_ids)
    agent = f"fidelity-{n}"
    async with AgentStorage(agent, base / agent, nats_url=url) as st:
        await create_tables(st, *FIDELITY_DDL, always=["loose", "typed"])
        for table, cols in (("loose", "a, b, c, d, e"), ("typed", "i, r, t, b, n")):
            names = cols.split(", ")
            for i, (values, path) in enumerate(zip(rows, paths, strict=True)):
                if path == "api":
                    await st.write_data(table, {"id": i, **dict(zip(names, values, strict=True))})
                elif path == "tx":
                    async with st.transaction() as tx:
                        await tx.execute(f"INSERT INTO {table} (id, {cols}) VALUES (?, ?, ?, ?, ?, ?)", (i, *values))
                else:
                    conn = external_connection(st.db_path)
                    try:
                        conn.execute(f"INSERT INTO {table} (id, {cols}) VALUES (?, ?, ?, ?, ?, ?)", (i, *values))
                    finally:
                        conn.close()
            # an update through raw SQL moves the last row's values one column over (values change type)
            last = len(rows) - 1
            async with st.transaction() as tx:
                await tx.execute(
                    f"UPDATE {table} SET {names[0]} = {names[1]}, {names[1]} = {names[0]} WHERE id = ?", (last,)
                )
        await st.flush(timeout=15)
        db_path = st.db_path
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
    messages = await read_agent_stream(url, agent)
    assert_exactly_once(messages, agent, epoch, last_seq)
    replicated = replay(flatten(messages))
    for table in ("loose", "typed"):
        assert_rows_identical(replicated[table], local_rows(db_path, table))
    # untyped columns keep exactly what was written, so the comparison above is about the written values
    loose = local_rows(db_path, "loose")
    for i, values in enumerate(rows[:-1]):
        stored = loose[(("int", i),)]
        for col, value in zip(("a", "b", "c", "d", "e"), values, strict=True):
            assert same_value(stored[col], value), f"SQLite changed {value!r} into {stored[col]!r}"


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rows=st.lists(row_values, min_size=1, max_size=5),
    paths=st.lists(st.sampled_from(["api", "tx", "conn"]), min_size=5, max_size=5),
)
@example(  # the edges, every time: a row of only finite numbers travels untagged, one with a blob tagged
    rows=[
        (-0.0, 0.0, -(2**63), 2**63 - 1, 5e-324),
        (-0.0, 1.7976931348623157e308, "🎉", b"", None),
        (math.inf, -math.inf, -0.0, "", b"\x00"),
        (-5e-324, -0.0, 1.0, "1", b"\xff"),
    ],
    paths=["api", "tx", "conn", "api", "tx"],
)
@example(  # found by CI: the last row's update turns a's 0 into 0.0, which `IS NOT` called no change
    rows=[(None, None, None, None, None), (0, 0.0, None, None, None)],
    paths=["api", "api", "api", "api", "api"],
)
def test_values_keep_their_type_on_the_stream(
    nats_server: NatsServer, tmp_path: Path, rows: list[tuple[Any, ...]], paths: list[str]
) -> None:
    """Property: decode_value(stream) == what SQLite holds, same type, -0.0 kept apart from 0.0.

    One nats-server for all examples; every example is its own agent (own subject, own database) and its own
    event loop, so nothing leaks between examples.
    """
    asyncio.run(_fidelity_example(nats_server.url, tmp_path, rows, paths[: len(rows)]))


# --------------------------------------------------------------------------- primary keys


async def test_primary_key_change_is_delete_old_key_then_upsert_in_one_record(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(
            st,
            "CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)",
            "CREATE TABLE pairs (a TEXT, b INTEGER, note, PRIMARY KEY (a, b))",
            always=["people", "pairs"],
        )
        await st.write_data("people", {"id": 1, "name": "ann"})
        await st.write_data("pairs", {"a": "x", "b": 1, "note": "n"})
        await st.flush()
        before = await st.last_committed_seq()
        async with st.transaction() as tx:
            await tx.execute("UPDATE people SET id = 42 WHERE id = 1")
        mid = await st.last_committed_seq()
        async with st.transaction() as tx:
            await tx.execute("UPDATE pairs SET b = 2, note = 'moved' WHERE a = 'x'")
        after = await st.last_committed_seq()
        await st.flush()
        db_path = st.db_path
    assert (mid - before, after - mid) == (2, 2)
    messages = await read_agent_stream(nats_server.url, AGENT)
    by_seq = {c.seq: c for c in flatten(messages)}
    d1, u1 = by_seq[before + 1], by_seq[before + 2]
    assert (d1.op, d1.table, d1.values) == ("D", "people", [1])
    assert (u1.op, u1.table, u1.values) == ("U", "people", [42, "ann"])
    assert d1.record_index == u1.record_index
    d2, u2 = by_seq[mid + 1], by_seq[mid + 2]
    assert (d2.op, d2.values) == ("D", ["x", 1])
    assert (u2.op, u2.values) == ("U", ["x", 2, "moved"])
    assert d2.record_index == u2.record_index
    replicated = replay(flatten(messages))
    assert_rows_identical(replicated["people"], local_rows(db_path, "people"))
    assert_rows_identical(replicated["pairs"], local_rows(db_path, "pairs"))


# --------------------------------------------------------------------------- transactions


async def test_transactions_are_never_split_across_records(nats_server: NatsServer, tmp_path: Path) -> None:
    ranges: list[tuple[int, int]] = []

    async def noise(st: AgentStorage, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            await st.write_data("log", {"msg": f"noise {i}"})
            i += 1
            await asyncio.sleep(0)

    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(
            st,
            "CREATE TABLE acct (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
            "CREATE TABLE log (id INTEGER PRIMARY KEY, msg TEXT)",
            always=["acct", "log"],
        )
        await st.batch_write([{"table": "acct", "data": {"id": i, "balance": 100}} for i in range(20)])
        stop = asyncio.Event()
        background = asyncio.create_task(noise(st, stop))
        try:
            for round_ in range(15):
                async with st.transaction() as tx:
                    first = int((await tx.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'"))[0]["seq"])
                    a, b = round_ % 20, (round_ * 7 + 3) % 20
                    await tx.execute("UPDATE acct SET balance = balance - 10 WHERE id = ?", (a,))
                    await tx.execute("UPDATE acct SET balance = balance + 10 WHERE id = ?", (b,))
                    await tx.execute("INSERT INTO log (msg) VALUES (?)", (f"transfer {a}->{b}",))
                    await tx.execute("UPDATE acct SET balance = balance WHERE id = 0")  # no-op, not captured
                    last = int((await tx.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'"))[0]["seq"])
                ranges.append((first + 1, last))
                # a batch is one transaction too (its items may be new or existing rows)
                got = await st.batch_write(
                    [{"table": "log", "data": {"msg": f"batch {round_}.{k}"}} for k in range(4)]
                    + [{"table": "acct", "data": {"id": round_ % 20, "balance": 500 + round_}}]
                )
                assert len(got) == 5
        finally:
            stop.set()
            await background
        await st.flush(timeout=15)
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last_seq)
    changes = flatten(messages)
    by_seq = {c.seq: c for c in changes}
    for round_ in range(15):  # the batches, found on the stream by their content
        wanted = [f"batch {round_}.{k}" for k in range(4)]
        logged = [c for c in changes if c.table == "log" and c.op == "U" and c.values[1] in wanted]
        assert [c.values[1] for c in logged] == wanted
        lo, hi = logged[0].seq, logged[-1].seq + 1
        assert [c.seq for c in logged] == list(range(lo, hi)), f"batch {round_} is not contiguous"
        assert (by_seq[hi].table, by_seq[hi].op, by_seq[hi].values) == ("acct", "U", [round_ % 20, 500 + round_])
        ranges.append((lo, hi))
    assert len(ranges) == 30
    for lo, hi in ranges:
        assert hi - lo >= 2
        holders = records_holding(messages, set(range(lo, hi + 1)))
        assert len(holders) == 1, f"transaction {lo}-{hi} split over records {holders}"
    replicated = replay(changes)
    assert_rows_identical(replicated["acct"], local_rows(db_path, "acct"))
    assert_rows_identical(replicated["log"], local_rows(db_path, "log"))


async def test_batch_write_is_one_record(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(
            st,
            "CREATE TABLE a (id TEXT PRIMARY KEY, v)",
            "CREATE TABLE b (id INTEGER PRIMARY KEY, v)",
            always=["a", "b"],
        )
        for round_ in range(10):
            before = await st.last_committed_seq()
            await st.batch_write([{"table": "a" if k % 2 else "b", "data": {"v": f"{round_}.{k}"}} for k in range(30)])
            after = await st.last_committed_seq()
            assert after - before == 30
            await st.write_data("b", {"v": "between"})
            await st.flush()
            messages = await read_agent_stream(nats_server.url, AGENT)
            holders = records_holding(messages, set(range(before + 1, after + 1)))
            assert len(holders) == 1, f"batch {before + 1}-{after} split over {holders}"
            assert {c.table for c in flatten([messages[holders[0]]]) if before < c.seq <= after} == {"a", "b"}


async def test_transaction_larger_than_a_record_is_sent_in_parts(nats_server: NatsServer, tmp_path: Path) -> None:
    limit = 4096
    async with storage(tmp_path, nats_server.url, max_record_bytes=limit) as st:
        await create_tables(st, "CREATE TABLE big (id INTEGER PRIMARY KEY, body TEXT, data BLOB)", always=["big"])
        await st.write_data("big", {"id": -1, "body": "small"})
        await st.flush()
        spans: list[tuple[int, int]] = []
        before = await st.last_committed_seq()
        async with st.transaction() as tx:
            for i in range(200):
                await tx.execute(
                    "INSERT INTO big (id, body, data) VALUES (?, ?, ?)", (i, f"{i:04d}" + "x" * 96, b"\1" * 20)
                )
        spans.append((before + 1, await st.last_committed_seq()))
        await st.flush()
        before = await st.last_committed_seq()
        await st.batch_write([{"table": "big", "data": {"id": i, "body": "y" * 150}} for i in range(150)])
        spans.append((before + 1, await st.last_committed_seq()))
        await st.write_data("big", {"id": 10_000, "body": "after"})
        await st.flush()
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last_seq)
    for lo, hi in spans:
        parts = [messages[i] for i in records_holding(messages, set(range(lo, hi + 1)))]
        assert len(parts) >= 3, f"{hi - lo + 1} changes of ~130 bytes in only {len(parts)} record(s)"
        assert parts[0].record.first_seq == lo, "the transaction's first part must start at its first change"
        # the last part ends the group, which may hold later transactions committed before it was closed
        assert parts[-1].record.last_seq >= hi, "the transaction's last part must hold its last change"
        for prev, nxt in itertools.pairwise(parts):
            assert nxt.record.first_seq == prev.record.last_seq + 1, "parts are not contiguous"
        assert [p.record.final for p in parts] == [False] * (len(parts) - 1) + [True]
        for p in parts:
            assert len(p.data) < limit + 1024, f"part of {len(p.data)} bytes, limit {limit}"
    # the records around the big transactions are ordinary final records
    outside = [m for m in messages if all(not lo <= m.record.first_seq <= hi for lo, hi in spans)]
    assert outside and all(m.record.final for m in outside)
    assert_rows_identical(replay(flatten(messages))["big"], local_rows(db_path, "big"))


# --------------------------------------------------------------------------- visibility

SECRET = "SECRET-" + uuid.uuid4().hex
ONDEMAND = "ONDEMAND-" + uuid.uuid4().hex


async def test_private_and_on_demand_tables_never_reach_the_stream(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(
            st,
            "CREATE TABLE pub (id INTEGER PRIMARY KEY, v TEXT)",
            "CREATE TABLE secret_diary (id INTEGER PRIMARY KEY, v TEXT)",
            "CREATE TABLE secret_keys (id TEXT PRIMARY KEY, v BLOB)",
            "CREATE TABLE od_notes (id INTEGER PRIMARY KEY, v TEXT)",
            always=["pub"],
        )
        await st.set_visibility("secret_keys", "private")
        await st.set_visibility("od_notes", "on_demand")
        for i in range(40):
            await st.write_data("secret_diary", {"v": f"{SECRET} diary {i}"})
            await st.write_data("secret_keys", {"v": f"{SECRET} key {i}".encode()})
            await st.write_data("od_notes", {"v": f"{ONDEMAND} note {i}"})
            await st.write_data("pub", {"v": f"public {i}"})
        await st.batch_write(
            [{"table": "secret_diary", "data": {"v": f"{SECRET} batch {k}"}} for k in range(20)]
            + [{"table": "pub", "data": {"v": f"public batch {k}"}} for k in range(20)]
            + [{"table": "od_notes", "data": {"v": f"{ONDEMAND} batch {k}"}} for k in range(20)]
        )
        async with st.transaction() as tx:
            await tx.execute("UPDATE secret_diary SET v = v || ' edited'")
            await tx.execute("DELETE FROM secret_keys WHERE rowid % 2 = 0")
            await tx.execute("UPDATE od_notes SET v = v || ' edited'")
            await tx.execute("DELETE FROM od_notes WHERE id < 5")
            await tx.execute("UPDATE pub SET v = v || ' edited' WHERE id <= 10")
        conn = external_connection(st.db_path)
        try:
            conn.execute("INSERT INTO secret_diary (v) VALUES (?)", (f"{SECRET} external",))
            conn.execute("INSERT INTO od_notes (v) VALUES (?)", (f"{ONDEMAND} external",))
            conn.execute("INSERT INTO pub (v) VALUES ('external')")
        finally:
            conn.close()
        await st.flush(timeout=15)
        health = await st.health_check()
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    assert health["tables"]["always"] == ["pub"]
    assert health["tables"]["on_demand"] == ["od_notes"]
    assert health["tables"]["private"] == ["secret_diary", "secret_keys"]

    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last_seq)
    for m in messages:
        for needle in (b"secret_diary", b"secret_keys", SECRET.encode(), ONDEMAND.encode(), b"SECRET-"):
            assert needle not in m.data, f"{needle!r} on the wire in stream message {m.stream_seq}"
        assert {layout.table for layout in m.record.layouts.values()} <= {"pub", "od_notes"}
    changes = flatten(messages)
    for c in changes:
        for v in c.values:
            text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
            assert "SECRET" not in text and "ONDEMAND" not in text, f"change {c.seq} carries {v!r}"
    od = [c for c in changes if c.table == "od_notes"]
    assert len(od) == 1, f"on_demand table appears {len(od)} times: {[c.op for c in od]}"
    assert od[0].op == "V" and od[0].values == ["on_demand"] and od[0].layout.visibility == "on_demand"
    pub_changes = [c for c in changes if c.table == "pub"]
    assert {c.op for c in pub_changes} == {"S", "U"}
    assert len(pub_changes) == 1 + 40 + 20 + 10 + 1
    assert len(changes) == len(pub_changes) + 1
    assert_rows_identical(replay(changes)["pub"], local_rows(db_path, "pub"))


async def test_declaring_always_snapshots_existing_rows_and_private_stops_capture(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE late (id TEXT PRIMARY KEY, v)")
        initial = {f"k{i}": i * 1.5 for i in range(6)}
        for k, v in initial.items():
            await st.write_data("late", {"id": k, "v": v})
        assert await st.last_committed_seq() == 0, "an undeclared (private) table was captured"
        await st.set_visibility("late", "always")
        assert await st.last_committed_seq() == 1 + len(initial)
        await st.write_data("late", {"id": "k0", "v": "changed"})
        await st.write_data("late", {"id": "new", "v": None})
        async with st.transaction() as tx:
            await tx.execute("DELETE FROM late WHERE id = 'k1'")
        await st.flush()
        await st.set_visibility("late", "private")
        x_seq = await st.last_committed_seq()
        await st.write_data("late", {"id": "while-private", "v": SECRET})
        async with st.transaction() as tx:
            await tx.execute("UPDATE late SET v = 'private edit' WHERE id = 'k2'")
        assert await st.last_committed_seq() == x_seq, "a table set back to private is still captured"
        await st.flush()
        messages = await read_agent_stream(nats_server.url, AGENT)
        late = changes_of(messages, "late")
        ops = [c.op for c in late]
        assert ops == ["S"] + ["U"] * len(initial) + ["U", "U", "D", "X"]
        snapshot = {c.values[0]: c.values[1] for c in late[1 : 1 + len(initial)]}
        assert snapshot.keys() == initial.keys()
        assert all(same_value(snapshot[k], v) for k, v in initial.items())
        assert late[-1].seq == x_seq and late[-1].values == []
        assert all(SECRET.encode() not in m.data for m in messages)
        # declaring it again snapshots what was written while private: the replica converges
        await st.set_visibility("late", "always")
        await st.flush()
        db_path = st.db_path
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last_seq)
    assert_rows_identical(replay(flatten(messages))["late"], local_rows(db_path, "late"))


# --------------------------------------------------------------------------- other processes

SQLITE3_CLI = shutil.which("sqlite3")


async def _run_other_process(db_path: Path, script: str) -> None:
    if SQLITE3_CLI:
        argv = [SQLITE3_CLI, str(db_path)]
    else:  # no CLI: a plain Python process with the stdlib sqlite3 module
        argv = [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.executescript(sys.stdin.read()); c.close()",
            str(db_path),
        ]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(script.encode()), 30)
    assert proc.returncode == 0 and not err, f"{argv[0]} failed ({proc.returncode}): {err.decode()} {out.decode()}"


async def test_raw_write_from_another_process_is_captured_in_one_record(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE jobs (id INTEGER PRIMARY KEY, state TEXT, payload BLOB)", always=["jobs"])
        for i in range(5):
            await st.write_data("jobs", {"id": i, "state": "new"})
        await st.flush()
        script = (
            "PRAGMA busy_timeout = 10000;\n"
            "BEGIN IMMEDIATE;\n"
            + "".join(
                f"INSERT INTO jobs (id, state, payload) VALUES ({1000 + i}, 'ext', x'00ff{i:02x}');\n"
                for i in range(40)
            )
            + "UPDATE jobs SET state = 'claimed' WHERE id IN (1, 2);\n"
            "UPDATE jobs SET id = 2000 WHERE id = 3;\n"
            "DELETE FROM jobs WHERE id = 4;\n"
            "COMMIT;\n"
        )
        stop = asyncio.Event()

        async def agent_writes() -> int:
            n = 0
            while not stop.is_set():
                await st.write_data("jobs", {"id": 5000 + n, "state": "agent"})
                n += 1
                await asyncio.sleep(0.001)
            return n

        writer = asyncio.create_task(agent_writes())
        try:
            await _run_other_process(st.db_path, script)
        finally:
            stop.set()
            agent_rows = await writer
        await st.flush(timeout=15)  # the other process did not wake the publisher: it polled
        last_seq = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    assert agent_rows > 0
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last_seq)
    changes = flatten(messages)

    def is_external(c: Change) -> bool:
        key = c.values[0] if c.values else None
        return c.op in ("U", "D") and (key in (1, 2, 3, 4, 2000) or (isinstance(key, int) and 1000 <= key < 1040))

    external = [c for c in changes if is_external(c) and c.seq > 5 + 1]
    assert len(external) == 40 + 2 + 2 + 1
    assert {c.record_index for c in external} == {external[0].record_index}, "the external transaction was split"
    seqs = [c.seq for c in external]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "the external transaction is interleaved"
    assert [c.op for c in external[-5:]] == ["U", "U", "D", "U", "D"]
    assert external[0].values == [1000, "ext", b"\x00\xff\x00"]
    assert_rows_identical(replay(changes)["jobs"], local_rows(db_path, "jobs"))


# --------------------------------------------------------------------------- epochs


async def test_reopen_keeps_epoch_and_a_deleted_database_starts_a_new_epoch(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    ddl = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, ddl, always=["t"])
        for i in range(5):
            await st.write_data("t", {"id": i, "v": "first life"})
        await st.flush()
        epoch1 = st.epoch
        last1 = await st.last_committed_seq()
        db_path = st.db_path
    async with storage(tmp_path, nats_server.url) as st:
        assert st.epoch == epoch1
        await st.write_data("t", {"id": 99, "v": "reopened"})
        assert await st.last_committed_seq() == last1 + 1
        await st.flush()
        last1 += 1
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    async with storage(tmp_path, nats_server.url) as st:
        epoch2 = st.epoch
        assert epoch2 != epoch1
        assert await st.last_committed_seq() == 0
        await create_tables(st, ddl, always=["t"])
        await st.write_data("t", {"id": 1, "v": "second life"})
        await st.flush()
        last2 = await st.last_committed_seq()
    messages = await read_agent_stream(nats_server.url, AGENT)
    secret2 = msg_id_secret(db_path)  # the new database's own secret
    assert_exactly_once(messages, AGENT, epoch1, last1)
    assert_exactly_once(messages, AGENT, epoch2, last2, secret=secret2)
    new = [m for m in messages if m.record.epoch == epoch2]
    assert new[0].record.first_seq == 1
    assert new[0].msg_id == msg_id(AGENT, epoch2, 1, new[0].record.last_seq, secret=secret2)
    old_ids = {m.msg_id for m in messages if m.record.epoch == epoch1}
    assert not old_ids & {m.msg_id for m in new}  # the new epoch's 1..n never reuse the old epoch's ids
    assert [m.record.epoch for m in messages] == [epoch1] * (len(messages) - len(new)) + [epoch2] * len(new)
    assert_rows_identical(replay(flatten(new))["t"], local_rows(db_path, "t"))


@pytest.mark.parametrize("agent_id", ["a", "agent_with-dash_and_underscore", "0" * 64])
async def test_any_valid_agent_id_publishes_on_its_subject(
    nats_server: NatsServer, tmp_path: Path, agent_id: str
) -> None:
    async with storage(tmp_path, nats_server.url, agent_id=agent_id) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY)", always=["t"])
        await st.write_data("t", {"id": 7})
        await st.flush()
        epoch = st.epoch
    messages = await read_agent_stream(nats_server.url, agent_id)
    assert_exactly_once(messages, agent_id, epoch, 2)
    assert await read_agent_stream(nats_server.url, "somebody-else") == []
