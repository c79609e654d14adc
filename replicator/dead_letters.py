"""Records the replicator could not decode or apply, kept with their reason.

An operator retries one (the consumer applies it again) or discards it; what a
discard means is said in words (`discard_consequence`): a change record missing
from its agent's sequence makes the agent resync.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_client import (
    AgentStatusRecord,
    ChangeRecord,
    RecordDecodeError,
    RelayRecord,
    decode_record,
    relay_subject_agent,
    subject_agent,
)

from .errors import DeadLetterNotFound
from .store_view import StoreView

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


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter as stored: `payload` is the whole record only when `whole` (else its first bytes)."""

    id: int
    at: float
    agent_id: str | None
    subject: str
    stream_seq: int | None
    reason: str
    payload: bytes
    payload_bytes: int  # the record's full length

    @property
    def whole(self) -> bool:
        return len(self.payload) >= self.payload_bytes


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

    def get(self, dead_letter_id: int) -> DeadLetter:
        """The dead letter with that id, payload included (DeadLetterNotFound if there is none)."""
        with self._lock:
            row = self._conn.execute(
                "SELECT id, at, agent_id, subject, stream_seq, reason, payload, "
                "coalesce(payload_bytes, length(payload)) FROM dead_letters WHERE id = ?",
                (dead_letter_id,),
            ).fetchone()
        if row is None:
            raise DeadLetterNotFound(f"no dead letter {dead_letter_id} (retried, discarded, pruned or never stored)")
        payload = row[6] if isinstance(row[6], bytes) else str(row[6] or "").encode()
        return DeadLetter(row[0], row[1], row[2], row[3], row[4], row[5], payload, int(row[7]))

    def delete(self, dead_letter_id: int) -> bool:
        """Remove a dead letter (retried with success, or discarded); False if it was not there."""
        with self._lock:
            return self._conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,)).rowcount > 0

    def update_reason(self, dead_letter_id: int, reason: str) -> bool:
        """A retried dead letter failed again: keep it, with the new reason and time; False if it is gone."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE dead_letters SET reason = ?, at = ? WHERE id = ?",
                (reason[:MAX_REASON_CHARS], time.time(), dead_letter_id),
            )
            return cur.rowcount > 0

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


def discard_consequence(letter: DeadLetter, data: bytes | None, view: StoreView) -> tuple[str | None, str, str | None]:
    """What discarding `letter` means: (its agent, the consequence in words, why to resync the agent or None).

    `data` is the whole record (read back from the stream, or the stored payload when kept whole), None when
    only a cut payload is left. A change record in its agent's sequence (not covered by the central copy) is
    missing for good once discarded: the agent is resynced. A relay write is lost; anything else is nothing.
    """
    agent = letter.agent_id
    record: Any = None
    if data is not None:
        try:
            record = decode_record(data)
        except RecordDecodeError:
            record = None
    if isinstance(record, RelayRecord) or (record is None and relay_subject_agent(letter.subject) is not None):
        rows = f"{len(record.rows)} row(s)" if isinstance(record, RelayRecord) else "its rows"
        return agent, f"the relay write is dropped for good: {rows} of agent {agent} are not applied", None
    if isinstance(record, AgentStatusRecord):
        return agent, "nothing more: it was an agent's status report", None
    if agent is None or subject_agent(letter.subject) is None:
        return agent, "nothing more: it was not a record of any agent", None
    if record is None and data is not None:
        return agent, f"nothing more: it was not a record of agent {agent} ({letter.reason[:200]})", None
    if isinstance(record, ChangeRecord):
        if record.agent_id != agent:
            return agent, f"nothing more: it claimed to be agent {record.agent_id}'s, on {agent}'s subject", None
        copy = view.agent(agent)
        if copy is not None and copy.epoch == record.epoch and record.last_seq <= copy.watermark:
            return (
                agent,
                f"nothing more: changes {record.first_seq}-{record.last_seq} of agent {agent} are already "
                f"covered by its central copy (applied up to {copy.watermark})",
                None,
            )
        what = f"changes {record.first_seq}-{record.last_seq}"
    else:
        what = f"a change record of {letter.payload_bytes} bytes"
    return (
        agent,
        f"{what} of agent {agent} are dropped: its central copy is replaced by a fresh full copy from the agent "
        "(resync), and its later changes wait until then",
        f"dead letter {letter.id} ({what}) discarded by the operator",
    )


def _preview(value: bytes | str | None) -> str:
    """The start of a payload as text (an empty payload reads back as NULL, a text one as str)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return bytes(value).decode("utf-8", "replace")
