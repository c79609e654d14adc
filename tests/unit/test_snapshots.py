"""Snapshots of real central SQLite files: consistent while a writer commits, atomic, pruned, verified on the way
back (a damaged, incomplete or foreign snapshot is refused by name and leaves nothing behind)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import orjson
import pytest

from replicator.central_store import CentralStore
from replicator.data_dir import DataDir
from replicator.errors import SnapshotFailed
from replicator.snapshots import (
    MANIFEST,
    Snapshots,
    forget_stream_positions,
    list_snapshots,
    put_in_place,
    read_manifest,
    stage,
    stamp_of,
    verify,
    write_snapshot,
)
from tests.support.faults import resize_tmpfs, small_tmpfs


def _store(root: Path, agents: tuple[str, ...] = ("a", "b")) -> tuple[DataDir, CentralStore]:
    """A central store whose agents each hold table t, with watermark == count(t) after every commit."""
    data = DataDir(root)
    store = CentralStore(data)
    for agent in agents:
        rep = store.replica(agent)
        rep.begin()
        rep.conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        rep.state.epoch = f"epoch-{agent}"
        rep.commit()
    return data, store


def _write(store: CentralStore, agent: str, n: int) -> None:
    rep = store.replicas[agent]
    for _ in range(n):
        rep.begin()
        rep.conn.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(300),))
        rep.state.watermark += 1
        rep.commit()


def _floor(value: int | None) -> object:
    async def floor() -> int | None:
        return value

    return floor


def _rows(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])
    finally:
        conn.close()


def test_each_file_is_copied_as_of_one_commit_while_the_writer_goes_on(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            _write(store, "a", 1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen: set[int] = set()
        for i in range(8):
            manifest = write_snapshot(data, data.snapshots / stamp_of(1_700_000_000 + i), 7)
            (entry,) = manifest.agents
            assert entry.watermark is not None
            # The watermark and the rows were written in the same commits: a consistent copy agrees with itself.
            assert _rows(data.snapshots / manifest.stamp / entry.path) == entry.watermark
            seen.add(entry.watermark)
    finally:
        stop.set()
        thread.join()
        store.close()
    assert len(seen) > 1, "the writer committed between snapshots"
    newest = list_snapshots(data)[0]
    assert verify(newest).stream_seq == 7
    assert sorted(p.name for p in (newest / "agents").iterdir()) == ["a.db"]  # one file each: no -wal, no -shm


def test_manifest_names_every_file_with_its_state(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data")
    _write(store, "a", 5)
    _write(store, "b", 2)
    store.close()
    (data.root / "dead_letters.db").touch()
    sqlite3.connect(data.dead_letters_db).execute("CREATE TABLE d (x)").connection.close()
    manifest = write_snapshot(data, data.snapshots / "x", 42, now=1_700_000_000.5)
    assert manifest.stamp == "20231114T221320.500Z" and manifest.stream_seq == 42
    assert [(f.path, f.agent_id, f.epoch, f.watermark) for f in manifest.files] == [
        ("agents/a.db", "a", "epoch-a", 5),
        ("agents/b.db", "b", "epoch-b", 2),
        ("dead_letters.db", None, None, None),
    ]
    on_disk = orjson.loads((data.snapshots / "x" / MANIFEST).read_bytes())
    assert on_disk["stream_seq"] == 42 and len(on_disk["files"]) == 3
    for f in manifest.files:
        assert (data.snapshots / "x" / f.path).stat().st_size == f.size


def test_a_failed_snapshot_leaves_nothing_that_looks_whole(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    store.close()
    (data.root / "dead_letters.db").mkdir()  # cannot be opened as a database: the copy fails half-way
    with pytest.raises(SnapshotFailed, match=r"dead_letters\.db"):
        write_snapshot(data, data.snapshots / stamp_of(1_700_000_000), 1)
    assert list(data.snapshots.iterdir()) == []  # neither the snapshot nor its temporary directory


def test_a_damaged_agent_file_is_left_out_and_named(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    store.close()
    data.agent_db("broken").write_bytes(b"this is not a database" * 100)
    manifest = write_snapshot(data, data.snapshots / stamp_of(1_700_000_000), 1)
    assert [f.agent_id for f in manifest.agents] == ["a"]
    assert len(manifest.skipped) == 1 and manifest.skipped[0].startswith("agents/broken.db: ")
    assert "left out as damaged: agents/broken.db" in manifest.describe()
    assert verify(data.snapshots / manifest.stamp) == manifest


async def test_take_prunes_to_keep_and_clears_leftovers(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    leftover = data.snapshots / ".tmp-20240101T000000.000Z-dead"
    leftover.mkdir(parents=True)
    foreign = data.snapshots / "keep-me"
    foreign.mkdir()
    snapshots = Snapshots(data, _floor(3), interval_s=0, keep=2)  # type: ignore[arg-type]
    snapshots.start()
    assert not leftover.exists()
    taken = []
    for _ in range(4):
        _write(store, "a", 1)
        taken.append(await snapshots.take())
    store.close()
    assert list_snapshots(data) == [taken[3], taken[2]]
    assert foreign.exists()
    assert snapshots.taken == 4 and snapshots.last is not None and snapshots.last.agents[0].watermark == 4
    backup = await snapshots.take(tmp_path / "elsewhere")
    assert verify(backup).agents[0].watermark == 4 and list_snapshots(data) == [taken[3], taken[2]]
    await snapshots.stop()


async def test_take_needs_the_consumers_position(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    store.close()
    snapshots = Snapshots(data, _floor(None), interval_s=0, keep=2)  # type: ignore[arg-type]
    with pytest.raises(SnapshotFailed, match="position in the stream is unknown"):
        await snapshots.take()
    assert list_snapshots(data) == []


async def test_periodic_snapshots_skip_when_nothing_was_applied(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    store.close()
    floor = {"value": 5}

    async def ack_floor() -> int | None:
        return floor["value"]

    snapshots = Snapshots(data, ack_floor, interval_s=0.05, keep=5)
    snapshots.start()
    try:
        for _ in range(200):
            if snapshots.skipped >= 2:
                break
            await asyncio.sleep(0.02)
        assert snapshots.taken == 1 and snapshots.skipped >= 2
        floor["value"] = 6
        for _ in range(200):
            if snapshots.taken == 2:
                break
            await asyncio.sleep(0.02)
    finally:
        await snapshots.stop()
    assert [read_manifest(p).stream_seq for p in list_snapshots(data)] == [6, 5]


def _snapshot(tmp_path: Path) -> tuple[DataDir, Path]:
    data, store = _store(tmp_path / "data")
    _write(store, "a", 3)
    store.close()
    path = data.snapshots / stamp_of(1_700_000_000)
    write_snapshot(data, path, 9)
    return data, path


def _damage(kind: str, path: Path) -> None:
    target = path / "agents" / "a.db"
    manifest = path / MANIFEST
    if kind == "flipped byte":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 1
        target.write_bytes(bytes(raw))
    elif kind == "missing file":
        target.unlink()
    elif kind == "no manifest":
        manifest.unlink()
    elif kind == "traversal":
        manifest.write_text(manifest.read_text().replace('"agents/a.db"', '"../a.db"'))
    elif kind == "state edited":
        body = orjson.loads(manifest.read_bytes())
        body["files"][0]["watermark"] = 99
        manifest.write_bytes(orjson.dumps(body))
    elif kind == "wrong agent":
        body = orjson.loads(manifest.read_bytes())
        body["files"][0]["agent_id"] = "b"
        manifest.write_bytes(orjson.dumps(body))
    elif kind == "not sqlite":
        junk = b"x" * 4096
        target.write_bytes(junk)
        body = orjson.loads(manifest.read_bytes())
        body["files"][0].update(size=len(junk), sha256=hashlib.sha256(junk).hexdigest())
        manifest.write_bytes(orjson.dumps(body))


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("flipped byte", "is damaged"),
        ("missing file", "is missing: the snapshot or backup is incomplete"),
        ("no manifest", "has no manifest.json"),
        ("traversal", "not a valid manifest"),
        ("state edited", "the manifest says"),
        ("wrong agent", "does not match its agent id"),
        ("not sqlite", "not a readable SQLite database"),
    ],
)
def test_a_bad_snapshot_is_refused_by_name_and_leaves_nothing(tmp_path: Path, kind: str, message: str) -> None:
    data, path = _snapshot(tmp_path)
    _damage(kind, path)
    with pytest.raises(SnapshotFailed, match=message):
        verify(path)
    with pytest.raises(SnapshotFailed, match=message):
        stage(path, data)
    assert not list(data.root.glob(".staging-*"))


def test_stage_and_put_in_place(tmp_path: Path) -> None:
    data, path = _snapshot(tmp_path)
    with pytest.raises(SnapshotFailed, match="move it aside first"):
        put_in_place(stage(path, data)[0], data)
    for leftover in data.root.glob(".staging-*"):
        shutil.rmtree(leftover)
    aside = data.set_aside("20240101-000000")
    assert aside is not None and (aside / "agents" / "a.db").exists()
    staging, manifest = stage(path, data)
    put_in_place(staging, data)
    assert not staging.exists()
    assert _rows(data.agent_db("a")) == 3 and manifest.stream_seq == 9
    reopened = CentralStore(data)
    try:
        assert reopened.replicas["a"].state.watermark == 3 and reopened.replicas["a"].state.epoch == "epoch-a"
    finally:
        reopened.close()


def test_forget_stream_positions(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    rep = store.replicas["a"]
    rep.conn.execute("INSERT INTO _cr_relay_seen (stream_seq) VALUES (5), (6)")
    rep.conn.execute("INSERT INTO _cr_ahead VALUES (7, 'e', 10, 11, 0.0)")
    store.close()
    path = data.snapshots / stamp_of(1_700_000_000)
    write_snapshot(data, path, 9)
    staging, _manifest = stage(path, data)
    forget_stream_positions(staging)
    conn = sqlite3.connect(staging / "agents" / "a.db")
    try:
        assert conn.execute(
            "SELECT (SELECT count(*) FROM _cr_relay_seen), (SELECT count(*) FROM _cr_ahead)"
        ).fetchone() == (
            0,
            0,
        )
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (0,)
    finally:
        conn.close()


async def test_a_full_disk_fails_the_snapshot_cleanly_and_the_next_one_works(tmp_path: Path) -> None:
    data, store = _store(tmp_path / "data", ("a",))
    _write(store, "a", 3000)  # about 1 MiB
    with small_tmpfs(data.snapshots, "256k") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not permitted here")
        snapshots = Snapshots(data, _floor(4), interval_s=0, keep=2)  # type: ignore[arg-type]
        with pytest.raises(SnapshotFailed, match=r"disk is full|No space left"):
            await snapshots.take()
        assert list(data.snapshots.iterdir()) == [] and snapshots.failed == 1 and snapshots.last_error
        resize_tmpfs(data.snapshots, "8m")
        path = await snapshots.take()
        assert verify(path).agents[0].watermark == 3000 and snapshots.last_error is None
    store.close()
