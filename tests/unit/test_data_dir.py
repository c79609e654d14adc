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
