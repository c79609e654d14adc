"""Records the replicator could not decode or apply, kept with their reason.

A dead letter is committed here before its message is terminated in
JetStream, so a record is never both gone from the stream and unrecorded.
What one agent's key can make us keep is bounded: the first
`payload_bytes` of each payload (its full length is recorded) and the newest
`per_agent` dead letters of each agent (older ones are pruned, and counted).
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

DEFAULT_PAYLOAD_BYTES = 64 * 1024
DEFAULT_PER_AGENT = 1_000
MAX_REASON_CHARS = 2_000


class DeadLetterStore:
    def __init__(
        self, path: Path, *, payload_bytes: int = DEFAULT_PAYLOAD_BYTES, per_agent: int = DEFAULT_PER_AGENT
    ) -> None:
        self.path = path
        self.payload_bytes = payload_bytes
        self.per_agent = per_agent
        self.pruned = 0  # dead letters dropped to keep each agent within `per_agent`
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        self._conn.execute(_SCHEMA)
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(dead_letters)")}
        if "payload_bytes" not in columns:  # a store made before payloads were cut
            self._conn.execute("ALTER TABLE dead_letters ADD COLUMN payload_bytes INTEGER")
        self._conn.execute("CREATE INDEX IF NOT EXISTS dead_letters_by_agent ON dead_letters (agent_id, id)")

    def add(self, *, agent_id: str | None, subject: str, stream_seq: int | None, reason: str, payload: bytes) -> int:
        """Record a dead letter (raises sqlite3.Error if it cannot be stored: then it must not be terminated)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                cur = self._conn.execute(
                    "INSERT INTO dead_letters (at, agent_id, subject, stream_seq, reason, payload, payload_bytes) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        time.time(),
                        agent_id,
                        subject[:300],
                        stream_seq,
                        reason[:MAX_REASON_CHARS],
                        bytes(payload[: self.payload_bytes]),
                        len(payload),
                    ),
                )
                pruned = self._conn.execute(
                    "DELETE FROM dead_letters WHERE agent_id IS ? AND id <= "
                    "(SELECT id FROM dead_letters WHERE agent_id IS ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (agent_id, agent_id, self.per_agent),
                ).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self.pruned += max(pruned, 0)
            return int(cur.lastrowid or 0)

    def list(self, *, agent_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = (
            "SELECT id, at, agent_id, subject, stream_seq, reason, coalesce(payload_bytes, length(payload)), "
            "substr(payload, 1, 200) "
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
                "payload_preview": _preview(r[7]),
            }
            for r in rows
        ]

    def stored_bytes(self) -> int:
        """Bytes of payload kept (what the bounds bound)."""
        with self._lock:
            return int(self._conn.execute("SELECT coalesce(sum(length(payload)), 0) FROM dead_letters").fetchone()[0])

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


def _preview(value: bytes | str | None) -> str:
    """The start of a payload as text (an empty payload reads back as NULL, a text one as str)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", "replace")
