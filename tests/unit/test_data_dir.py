"""The data directory's layout is named in one place, and one process owns it at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from replicator.data_dir import DataDir, DataDirInUse
from replicator.settings import Settings


def test_paths(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    assert d.agents == tmp_path / "data" / "agents"
    assert d.agent_db("agent-a") == tmp_path / "data" / "agents" / "agent-a.db"
    assert d.dead_letters_db == tmp_path / "data" / "dead_letters.db"
    assert d.nats == tmp_path / "data" / "nats"
    assert d.auth == tmp_path / "data" / "auth"
    assert d.lock_file == tmp_path / "data" / ".lock"
    assert d.backup("20240101-000000") == tmp_path / "data" / "rebuild-backup-20240101-000000"
    db = d.dead_letters_db
    assert d.central_files() == [d.agents, db, db.with_name("dead_letters.db-wal"), db.with_name("dead_letters.db-shm")]


def test_settings_name_the_same_layout(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).data == DataDir(tmp_path)


def test_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "fresh")  # created by lock()
    with d.lock():
        assert d.lock_file.exists()
        with pytest.raises(DataDirInUse, match="in use by another replicator process"), DataDir(d.root).lock():
            pass
    with d.lock():  # released on exit: a later owner gets it
        pass


def _central_store(d: DataDir, marker: str) -> None:
    d.agents.mkdir(parents=True)
    d.agent_db("a").write_text(marker)
    d.dead_letters_db.write_text(marker)


def test_set_aside_moves_the_whole_central_store_and_never_overwrites(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    d.root.mkdir()
    assert d.set_aside("20240101-000000") is None  # nothing to move: no empty backup directory
    assert d.rebuild_backups() == []
    _central_store(d, "first")
    first = d.set_aside("20240101-000000")
    assert first == d.backup("20240101-000000")
    assert (first / "agents" / "a.db").read_text() == "first" and (first / "dead_letters.db").read_text() == "first"
    assert not any(path.exists() for path in d.central_files())
    _central_store(d, "second")
    second = d.set_aside("20240101-000000")  # the same second: a suffix, the first one stays as it was
    assert second == d.backup("20240101-000000-2")
    assert (second / "agents" / "a.db").read_text() == "second" and (first / "agents" / "a.db").read_text() == "first"


def test_prune_rebuild_backups_keeps_the_newest(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    for stamp in ("20240102-000000", "20240101-000000-10", "20240101-000000", "20240101-000000-2"):
        d.backup(stamp).mkdir(parents=True)
    (d.root / "rebuild-backup-notes").mkdir()  # not one of ours: never touched
    assert [p.name for p in d.rebuild_backups()] == [
        "rebuild-backup-20240101-000000",
        "rebuild-backup-20240101-000000-2",
        "rebuild-backup-20240101-000000-10",
        "rebuild-backup-20240102-000000",
    ]
    removed = d.prune_rebuild_backups(2)
    assert [p.name for p in removed] == ["rebuild-backup-20240101-000000", "rebuild-backup-20240101-000000-2"]
    assert [p.name for p in d.rebuild_backups()] == [
        "rebuild-backup-20240101-000000-10",
        "rebuild-backup-20240102-000000",
    ]
    assert d.prune_rebuild_backups(0) and d.rebuild_backups() == []
    assert (d.root / "rebuild-backup-notes").is_dir()


def test_staging_is_inside_the_data_dir_and_fresh(tmp_path: Path) -> None:
    d = DataDir(tmp_path / "data")
    a, b = d.staging(), d.staging()
    assert a.parent == d.root and a.name.startswith(".staging-") and a != b
