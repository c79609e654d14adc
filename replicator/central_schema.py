"""The layout of an agent's central copy: its replication tables and the metadata of its data tables.

Every `<data_dir>/agents/<agent_id>.db` holds, next to the agent's tables under
their own names:

- `_cr_state`: key/value replication state (epoch, watermark, counters, blocked, the last resync, the agent's
  own newest status report);
- `_cr_tables`: one `TableMeta` per data table (where it comes from, its visibility and columns);
- `_cr_epochs`: retired epochs (an agent database that was replaced), whose late records are stale;
- `_cr_relay_seen`: stream sequences of applied relay records (relay records carry no sequence of their own);
- `_cr_feed`, `_cr_feed_meta`: the change feed's log (its layout and rules are in feed_log.py).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

from agent_client import quote_identifier, safe_declared_type

STATE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _cr_state (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _cr_tables (name TEXT PRIMARY KEY, source TEXT NOT NULL, visibility TEXT NOT NULL,"
    " columns TEXT NOT NULL, types TEXT NOT NULL, pk TEXT NOT NULL, sql TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _cr_epochs (epoch TEXT PRIMARY KEY, retired_at REAL NOT NULL) WITHOUT ROWID",
    # Relay records carry no sequence: the stream sequences of those applied (and maybe not yet acked) dedup them.
    "CREATE TABLE IF NOT EXISTS _cr_relay_seen (stream_seq INTEGER PRIMARY KEY) WITHOUT ROWID",
    # Records that arrived ahead of their turn (an earlier one is missing): acked in JetStream so they take no
    # room in the consumer's ack-pending window, and read back from the stream by sequence once it is their turn.
    "CREATE TABLE IF NOT EXISTS _cr_ahead (stream_seq INTEGER PRIMARY KEY, epoch TEXT, first_seq INTEGER NOT NULL,"
    " last_seq INTEGER NOT NULL, arrived_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS _cr_ahead_turn ON _cr_ahead (epoch, first_seq)",
)


@dataclass(frozen=True)
class TableMeta:
    """One data table of a central copy, as recorded in `_cr_tables`."""

    name: str
    source: str  # "agent" (replicated) or "relay" (written over HTTP)
    visibility: str  # "always" or "on_demand"
    columns: tuple[str, ...]
    types: tuple[str, ...]
    pk: tuple[str, ...]
    sql: str | None


def create_schema(conn: sqlite3.Connection) -> None:
    for stmt in STATE_SCHEMA:
        conn.execute(stmt)


def load_state(conn: sqlite3.Connection) -> dict[str, Any]:
    return dict(conn.execute("SELECT key, value FROM _cr_state").fetchall())


def save_state(conn: sqlite3.Connection, values: dict[str, Any], *, clear: tuple[str, ...] = ()) -> None:
    """Write state keys (None is stored as NULL) and delete the keys in `clear`."""
    conn.executemany("INSERT OR REPLACE INTO _cr_state (key, value) VALUES (?, ?)", list(values.items()))
    if clear:
        conn.executemany("DELETE FROM _cr_state WHERE key = ?", [(k,) for k in clear])


def load_tables(conn: sqlite3.Connection) -> dict[str, TableMeta]:
    rows = conn.execute("SELECT name, source, visibility, columns, types, pk, sql FROM _cr_tables")
    return {
        r[0]: TableMeta(
            r[0], r[1], r[2], tuple(orjson.loads(r[3])), tuple(orjson.loads(r[4])), tuple(orjson.loads(r[5])), r[6]
        )
        for r in rows
    }


def save_table(conn: sqlite3.Connection, meta: TableMeta) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO _cr_tables (name, source, visibility, columns, types, pk, sql) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            meta.name,
            meta.source,
            meta.visibility,
            orjson.dumps(meta.columns).decode(),
            orjson.dumps(meta.types).decode(),
            orjson.dumps(meta.pk).decode(),
            meta.sql,
        ),
    )


def drop_table(conn: sqlite3.Connection, name: str) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {quote_identifier(name)}")
    conn.execute("DELETE FROM _cr_tables WHERE name = ?", (name,))


def load_retired(conn: sqlite3.Connection) -> frozenset[str]:
    return frozenset(r[0] for r in conn.execute("SELECT epoch FROM _cr_epochs"))


def retire_epoch(conn: sqlite3.Connection, epoch: str, at: float) -> None:
    conn.execute("INSERT OR REPLACE INTO _cr_epochs (epoch, retired_at) VALUES (?, ?)", (epoch, at))


def count_ahead(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM _cr_ahead").fetchone()[0])


def add_ahead(conn: sqlite3.Connection, stream_seq: int, epoch: str | None, first: int, last: int, at: float) -> bool:
    """Remember a record that came ahead of its turn; False if it was remembered already (a redelivery)."""
    cur = conn.execute(
        "INSERT OR IGNORE INTO _cr_ahead (stream_seq, epoch, first_seq, last_seq, arrived_at) VALUES (?, ?, ?, ?, ?)",
        (stream_seq, epoch, first, last, at),
    )
    return cur.rowcount > 0


def drop_ahead(conn: sqlite3.Connection, stream_seq: int) -> bool:
    return conn.execute("DELETE FROM _cr_ahead WHERE stream_seq = ?", (stream_seq,)).rowcount > 0


def drop_ahead_of_epoch(conn: sqlite3.Connection, epoch: str | None) -> int:
    return conn.execute("DELETE FROM _cr_ahead WHERE epoch IS ?", (epoch,)).rowcount


def drop_ahead_below(conn: sqlite3.Connection, epoch: str | None, first_seq: int) -> int:
    """Forget the remembered records of `epoch` that end below `first_seq` (a resync superseded them)."""
    return conn.execute("DELETE FROM _cr_ahead WHERE epoch IS ? AND last_seq < ?", (epoch, first_seq)).rowcount


def due_ahead(conn: sqlite3.Connection, epoch: str | None, watermark: int, limit: int) -> list[int]:
    """Stream sequences of remembered records whose turn has come (they start at or below watermark + 1)."""
    rows = conn.execute(
        "SELECT stream_seq FROM _cr_ahead WHERE epoch IS ? AND first_seq <= ? ORDER BY first_seq, stream_seq LIMIT ?",
        (epoch, watermark + 1, limit),
    )
    return [int(r[0]) for r in rows]


def oldest_ahead(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT min(arrived_at) FROM _cr_ahead").fetchone()
    return float(row[0]) if row and row[0] is not None else None


def agent_table_ddl(meta: TableMeta) -> str:
    """CREATE TABLE for a replicated table (declared types kept where they are safe to paste)."""
    q = quote_identifier
    cols = ", ".join(f"{q(c)} {safe_declared_type(t)}".rstrip() for c, t in zip(meta.columns, meta.types, strict=True))
    return f"CREATE TABLE {q(meta.name)} ({cols}, PRIMARY KEY ({', '.join(map(q, meta.pk))}))"


def relay_table_ddl(meta: TableMeta) -> str:
    """CREATE TABLE for a table first written over the HTTP relay (untyped; `id` is its key if present)."""
    q = quote_identifier
    defs = ", ".join(f"{q(c)} PRIMARY KEY" if c in meta.pk else q(c) for c in meta.columns)
    return f"CREATE TABLE IF NOT EXISTS {q(meta.name)} ({defs})"
