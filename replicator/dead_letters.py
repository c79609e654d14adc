"""Records the replicator could not decode or apply, kept with their reason.

A dead letter is committed here before its message is terminated in
JetStream, so a record is never both gone from the stream and unrecorded.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    agent_id TEXT,
    subject TEXT NOT NULL,
    stream_seq INTEGER,
    reason TEXT NOT NULL,
    payload BLOB NOT NULL
)
"""

MAX_PAYLOAD_KEPT = 1024 * 1024


class DeadLetterStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.execute(_SCHEMA)

    def add(self, *, agent_id: str | None, subject: str, stream_seq: int | None, reason: str, payload: bytes) -> int:
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO dead_letters (at, agent_id, subject, stream_seq, reason, payload) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), agent_id, subject, stream_seq, reason, payload[:MAX_PAYLOAD_KEPT]),
            )
            return int(cur.lastrowid or 0)

    def list(self, *, agent_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, at, agent_id, subject, stream_seq, reason, length(payload), substr(payload, 1, 200) "
            "FROM dead_letters"
        )
        params: tuple[Any, ...] = ()
        if agent_id is not None:
            sql += " WHERE agent_id = ?"
            params = (agent_id,)
        sql += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(sql, (*params, limit)).fetchall()
        return [
            {
                "id": r[0],
                "at": r[1],
                "agent_id": r[2],
                "subject": r[3],
                "stream_seq": r[4],
                "reason": r[5],
                "payload_bytes": r[6],
                "payload_preview": bytes(r[7]).decode("utf-8", "replace"),
            }
            for r in rows
        ]

    def counts(self) -> dict[str | None, int]:
        with self._lock:
            rows = self._conn.execute("SELECT agent_id, count(*) FROM dead_letters GROUP BY agent_id").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def total(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()
