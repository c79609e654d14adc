"""The dead-letter store: what one agent can make the HTPC keep is bounded, and every payload lists."""

from __future__ import annotations

from pathlib import Path

from replicator.dead_letters import DeadLetterStore


def test_payloads_are_cut_and_each_agent_keeps_only_its_newest(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.db", payload_bytes=100, per_agent=3)
    try:
        for i in range(10):
            store.add(agent_id="junk", subject="agents.junk.changes", stream_seq=i, reason=f"r{i}", payload=b"x" * 5000)
        store.add(agent_id="other", subject="agents.other.changes", stream_seq=99, reason="r", payload=b"y")
        letters = store.list(agent_id="junk")
        assert [d["stream_seq"] for d in letters] == [9, 8, 7]
        assert all(d["payload_bytes"] == 5000 for d in letters)
        assert store.stored_bytes() == 3 * 100 + 1
        assert store.counts() == {"junk": 3, "other": 1} and store.pruned == 7
    finally:
        store.close()


def test_an_empty_or_text_payload_lists(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.db")
    try:
        store.add(agent_id="a", subject="agents.a.changes", stream_seq=1, reason="empty", payload=b"")
        store.add(agent_id=None, subject="x", stream_seq=None, reason="no agent", payload=b"\xff\xfe")
        listed = {d["reason"]: d for d in store.list()}
        assert listed["empty"]["payload_preview"] == "" and listed["empty"]["payload_bytes"] == 0
        assert listed["no agent"]["payload_preview"] == "\ufffd\ufffd"
    finally:
        store.close()


def test_an_older_store_gains_the_new_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "dl.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, agent_id TEXT, "
        "subject TEXT NOT NULL, stream_seq INTEGER, reason TEXT NOT NULL, payload BLOB NOT NULL)"
    )
    conn.execute("INSERT INTO dead_letters VALUES (1, 0, 'a', 's', 1, 'old', x'0102')")
    conn.commit()
    conn.close()
    store = DeadLetterStore(path)
    try:
        assert store.list()[0]["payload_bytes"] == 2
    finally:
        store.close()


def test_get_update_and_delete_one_dead_letter(tmp_path: Path) -> None:
    import pytest

    from replicator.errors import DeadLetterNotFound

    store = DeadLetterStore(tmp_path / "dl.db", payload_bytes=10)
    try:
        whole = store.add(agent_id="a", subject="agents.a.changes", stream_seq=7, reason="first", payload=b"12345")
        cut = store.add(agent_id="a", subject="agents.a.changes", stream_seq=8, reason="cut", payload=b"x" * 50)
        letter = store.get(whole)
        assert (letter.agent_id, letter.stream_seq, letter.payload, letter.payload_bytes) == ("a", 7, b"12345", 5)
        assert letter.whole and not store.get(cut).whole and store.get(cut).payload == b"x" * 10
        assert store.update_reason(whole, "again: still wrong")
        assert store.get(whole).reason == "again: still wrong" and store.get(whole).at >= letter.at
        assert store.delete(whole) and not store.delete(whole) and not store.update_reason(whole, "x")
        with pytest.raises(DeadLetterNotFound):
            store.get(whole)
        assert [d["id"] for d in store.list()] == [cut]
    finally:
        store.close()
