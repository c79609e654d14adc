"""The central copy: one SQLite file per agent, applied record by record.

`<data_dir>/agents/<agent_id>.db` holds the agent's replicated tables under
their own names plus its replication state (`_cr_state`, `_cr_tables`,
`_cr_epochs`). A record's changes and the new watermark are written in the
same transaction, so after any crash the watermark says exactly what is
applied. Values are stored as they arrived: the agent already applied its
column affinities, and re-applying the same declared types is idempotent.

Everything here is synchronous and runs on the consumer's single apply
thread; readers use their own read-only connections.
"""

from __future__ import annotations

import enum
import math
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import orjson

from agent_client import (
    ChangeRecord,
    RelayRecord,
    TableLayout,
    decode_value,
    is_valid_agent_id,
    is_valid_identifier,
    quote_identifier,
)

from .data_dir import DataDir
from .errors import RecordRejected
from .store_view import AgentView, StoreView, TableView

_STATE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS _cr_state (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _cr_tables (name TEXT PRIMARY KEY, source TEXT NOT NULL, visibility TEXT NOT NULL,"
    " columns TEXT NOT NULL, types TEXT NOT NULL, pk TEXT NOT NULL, sql TEXT) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS _cr_epochs (epoch TEXT PRIMARY KEY, retired_at REAL NOT NULL) WITHOUT ROWID",
    # Relay records carry no sequence: the stream sequences of those applied (and maybe not yet acked) dedup them.
    "CREATE TABLE IF NOT EXISTS _cr_relay_seen (stream_seq INTEGER PRIMARY KEY) WITHOUT ROWID",
)
_TYPE_RE = re.compile(r"[A-Za-z][A-Za-z0-9_ ]{0,40}(\(\s*[+-]?\d{1,10}\s*(,\s*[+-]?\d{1,10}\s*)?\))?")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class Outcome(enum.Enum):
    APPLIED = "applied"  # changes written in the open transaction; ack after commit
    HELD = "held"  # part of a multi-part transaction; ack after the final part commits
    DUPLICATE = "duplicate"  # already applied; ack
    STALE = "stale"  # from a retired epoch; ack
    GAP = "gap"  # an earlier record is missing; nak with delay


@dataclass
class TableMeta:
    name: str
    source: str  # "agent" (replicated) or "relay" (written over HTTP)
    visibility: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    pk: tuple[str, ...]
    sql: str | None


def _safe_type(decl: str) -> str:
    decl = decl.strip()
    return decl if decl and _TYPE_RE.fullmatch(decl) else ""


def _fast_decode(values: list[Any]) -> list[Any]:
    for v in values:
        t = type(v)
        if t is dict or t is bool or t is list or (t is int and not _I64_MIN <= v <= _I64_MAX):
            try:
                return [decode_value(x) for x in values]
            except ValueError as exc:
                raise RecordRejected(f"bad value: {exc}") from None
    return values


def relay_value(table: str, column: str, value: Any) -> Any:
    """A JSON value from the HTTP relay -> SQLite value (lists/dicts become JSON text)."""
    if value is None:
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordRejected(f"{table}.{column}: text is not valid Unicode (lone surrogate)") from None
        return value
    if isinstance(value, float):
        if not math.isfinite(value):  # NaN/Infinity/1e400 parse, but would reach the stream as null
            raise RecordRejected(f"{table}.{column}: {value} is not a finite number")
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not _I64_MIN <= value <= _I64_MAX:
            raise RecordRejected(f"{table}.{column}: integer does not fit in 64 bits")
        return value
    if isinstance(value, list | dict):
        try:
            return orjson.dumps(value).decode()
        except orjson.JSONEncodeError as exc:  # lone surrogates, nesting deeper than 255
            raise RecordRejected(f"{table}.{column}: cannot store as JSON text: {exc}") from None
    raise RecordRejected(f"{table}.{column}: unsupported value {type(value).__name__}")


class AgentReplica:
    """The central copy of one agent and its replication state."""

    def __init__(self, agent_id: str, path: Path) -> None:
        self.agent_id = agent_id
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.conn.execute("PRAGMA foreign_keys = OFF")
        for stmt in _STATE_SCHEMA:
            self.conn.execute(stmt)
        state = dict(self.conn.execute("SELECT key, value FROM _cr_state").fetchall())
        self.epoch: str | None = state.get("epoch")
        self.watermark: int = int(state.get("watermark", 0))
        self.committed_at: float | None = state.get("committed_at")
        self.applied_at: float | None = state.get("applied_at")
        self.records_applied: int = int(state.get("records_applied", 0))
        self.changes_applied: int = int(state.get("changes_applied", 0))
        self.blocked: str | None = state.get("blocked")  # why later changes wait behind a dead letter
        self.head_seq: int = self.watermark
        self.last_seen: float | None = self.applied_at
        self.tables: dict[str, TableMeta] = self._load_tables()
        self.in_txn = False
        self.open_group = False  # inside a multi-part transaction (final=False received)
        self.group_started = 0.0
        self._saved: tuple[Any, ...] | None = None
        self._stmt_cache: dict[tuple[str, str, tuple[str, ...]], str] = {}

    # -------------------------------------------------------------- state
    def _load_tables(self) -> dict[str, TableMeta]:
        rows = self.conn.execute("SELECT name, source, visibility, columns, types, pk, sql FROM _cr_tables")
        return {
            r[0]: TableMeta(
                r[0], r[1], r[2], tuple(orjson.loads(r[3])), tuple(orjson.loads(r[4])), tuple(orjson.loads(r[5])), r[6]
            )
            for r in rows
        }

    def _save_table(self, meta: TableMeta) -> None:
        self.conn.execute(
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
        self.tables[meta.name] = meta
        self._stmt_cache.clear()

    def _forget_table(self, name: str) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {quote_identifier(name)}")
        self.conn.execute("DELETE FROM _cr_tables WHERE name = ?", (name,))
        self.tables.pop(name, None)
        self._stmt_cache.clear()

    def begin(self) -> None:
        if not self.in_txn:
            self.conn.execute("BEGIN IMMEDIATE")
            self.in_txn = True
            self._saved = (self.epoch, self.watermark, self.committed_at, dict(self.tables))

    def commit(self) -> None:
        if not self.in_txn:
            return
        now = time.time()
        self.applied_at = now
        self.conn.executemany(
            "INSERT OR REPLACE INTO _cr_state (key, value) VALUES (?, ?)",
            [
                ("epoch", self.epoch),
                ("watermark", self.watermark),
                ("committed_at", self.committed_at),
                ("applied_at", now),
                ("records_applied", self.records_applied),
                ("changes_applied", self.changes_applied),
            ],
        )
        self.conn.execute("COMMIT")
        self.in_txn = False
        self._saved = None

    def rollback(self) -> None:
        if self.in_txn:
            self.conn.execute("ROLLBACK")
            self.in_txn = False
        if self._saved is not None:
            self.epoch, self.watermark, self.committed_at, self.tables = self._saved
            self._saved = None
            self._stmt_cache.clear()
        self.open_group = False
        self.group_started = 0.0

    def set_blocked(self, reason: str | None) -> None:
        """Record (inside the open transaction) that this agent's order is broken by a dead letter, or no more."""
        if reason is None:
            self.conn.execute("DELETE FROM _cr_state WHERE key = 'blocked'")
        else:
            self.conn.execute("INSERT OR REPLACE INTO _cr_state (key, value) VALUES ('blocked', ?)", (reason,))
        self.blocked = reason

    def savepoint(self) -> None:
        self.conn.execute("SAVEPOINT rec")

    def release(self) -> None:
        self.conn.execute("RELEASE rec")

    def rollback_savepoint(self, saved: tuple[Any, ...]) -> None:
        self.conn.execute("ROLLBACK TO rec")
        self.conn.execute("RELEASE rec")
        self.epoch, self.watermark, self.committed_at, self.tables, self.open_group = saved
        self._stmt_cache.clear()

    def snapshot_state(self) -> tuple[Any, ...]:
        return (self.epoch, self.watermark, self.committed_at, dict(self.tables), self.open_group)

    # -------------------------------------------------------------- change records
    def classify(self, rec: ChangeRecord) -> Outcome | None:
        """Decide what to do with a record before touching data; None means apply it."""
        self.last_seen = time.time()
        if rec.epoch != self.epoch:
            if self.epoch is not None and self._is_retired(rec.epoch):
                return Outcome.STALE
            if rec.first_seq != 1:
                return Outcome.GAP  # a new epoch must start from its first change
            return None
        if rec.last_seq <= self.watermark and not self.open_group:
            return Outcome.DUPLICATE
        if self.open_group and rec.first_seq != self.watermark + 1:
            return Outcome.DUPLICATE if rec.last_seq <= self.watermark else Outcome.GAP
        self.head_seq = max(self.head_seq, rec.last_seq)
        if rec.first_seq > self.watermark + 1:
            return Outcome.GAP
        return None

    def _is_retired(self, epoch: str) -> bool:
        return self.conn.execute("SELECT 1 FROM _cr_epochs WHERE epoch = ?", (epoch,)).fetchone() is not None

    def apply_changes(self, rec: ChangeRecord) -> Outcome:
        """Apply the part of `rec` above the watermark inside the open transaction."""
        if rec.epoch != self.epoch:
            self._reset_epoch(rec.epoch)
        skip = self.watermark
        layouts = rec.layouts
        pending: list[list[Any]] = []
        pending_sql: str | None = None

        def flush() -> None:
            nonlocal pending, pending_sql
            if pending:
                assert pending_sql is not None
                try:
                    self.conn.executemany(pending_sql, pending)
                except sqlite3.Error as exc:
                    raise RecordRejected(f"cannot apply rows: {exc}") from None
                pending, pending_sql = [], None

        applied = 0
        for seq, op, layout_id, values in rec.changes:
            if seq <= skip:
                continue
            layout = layouts[str(layout_id)]
            if op == "U":
                sql = self._upsert_sql(layout)
                if sql is not pending_sql and sql != pending_sql:
                    flush()
                    pending_sql = sql
                pending.append(_fast_decode(values))
            else:
                flush()
                if op == "D":
                    self._delete(layout, _fast_decode(values))
                elif op == "S":
                    self._create_from_layout(layout)
                elif op == "X":
                    if layout.table in self.tables and self.tables[layout.table].source == "agent":
                        self._forget_table(layout.table)
                elif op == "V":
                    self._announce(layout)
            applied += 1
        flush()
        self.watermark = rec.last_seq
        self.head_seq = max(self.head_seq, rec.last_seq)
        self.committed_at = rec.committed_at
        self.records_applied += 1
        self.changes_applied += applied
        self.open_group = not rec.final
        if self.open_group and not self.group_started:
            self.group_started = time.monotonic()
        if not self.open_group:
            self.group_started = 0.0
        return Outcome.HELD if self.open_group else Outcome.APPLIED

    def _reset_epoch(self, epoch: str) -> None:
        """A new agent database: drop everything replicated from the old one and start over."""
        if self.epoch is not None:
            self.conn.execute(
                "INSERT OR REPLACE INTO _cr_epochs (epoch, retired_at) VALUES (?, ?)", (self.epoch, time.time())
            )
        for name, meta in list(self.tables.items()):
            if meta.source == "agent":
                self._forget_table(name)
        self.epoch = epoch
        self.watermark = 0
        self.head_seq = 0

    def _table_for(self, layout: TableLayout) -> TableMeta:
        meta = self.tables.get(layout.table)
        if meta is None or meta.source != "agent" or meta.visibility != "always":
            raise RecordRejected(f"table {layout.table!r} is not replicated here (no schema change seen for it)")
        if meta.columns != tuple(layout.columns) or meta.pk != tuple(layout.pk):
            raise RecordRejected(
                f"schema mismatch for {layout.table!r}: record has columns {layout.columns}, "
                f"central copy has {list(meta.columns)}"
            )
        return meta

    def _upsert_sql(self, layout: TableLayout) -> str:
        key = ("U", layout.table, tuple(layout.columns))
        sql = self._stmt_cache.get(key)
        if sql is None:
            self._table_for(layout)
            q = quote_identifier
            sql = (
                f"INSERT OR REPLACE INTO {q(layout.table)} ({', '.join(map(q, layout.columns))}) "
                f"VALUES ({', '.join('?' * len(layout.columns))})"
            )
            self._stmt_cache[key] = sql
        return sql

    def _delete(self, layout: TableLayout, key: list[Any]) -> None:
        self._table_for(layout)
        q = quote_identifier
        where = " AND ".join(f"{q(c)} IS ?" for c in layout.pk)
        try:
            self.conn.execute(f"DELETE FROM {q(layout.table)} WHERE {where}", key)
        except sqlite3.Error as exc:
            raise RecordRejected(f"cannot delete from {layout.table}: {exc}") from None

    def _create_from_layout(self, layout: TableLayout) -> None:
        if not layout.columns or not layout.pk:
            raise RecordRejected(f"schema change for {layout.table!r} has no columns or no primary key")
        types = list(layout.types) or [""] * len(layout.columns)
        q = quote_identifier
        cols = ", ".join(f"{q(c)} {_safe_type(t)}".rstrip() for c, t in zip(layout.columns, types, strict=True))
        ddl = f"CREATE TABLE {q(layout.table)} ({cols}, PRIMARY KEY ({', '.join(map(q, layout.pk))}))"
        self.conn.execute(f"DROP TABLE IF EXISTS {q(layout.table)}")
        try:
            self.conn.execute(ddl)
        except sqlite3.Error as exc:
            raise RecordRejected(f"cannot create {layout.table!r}: {exc}") from None
        self._save_table(
            TableMeta(
                layout.table, "agent", "always", tuple(layout.columns), tuple(types), tuple(layout.pk), layout.sql
            )
        )

    def _announce(self, layout: TableLayout) -> None:
        existing = self.tables.get(layout.table)
        if existing is not None and existing.source == "agent":
            self._forget_table(layout.table)
        self._save_table(
            TableMeta(
                layout.table,
                "agent",
                "on_demand",
                tuple(layout.columns),
                tuple(layout.types) or ("",) * len(layout.columns),
                tuple(layout.pk),
                layout.sql,
            )
        )

    # -------------------------------------------------------------- relay records
    def apply_relay(self, rec: RelayRecord, stream_seq: int | None = None) -> Outcome:
        self.last_seen = time.time()
        if stream_seq is not None:
            seen = self.conn.execute("INSERT OR IGNORE INTO _cr_relay_seen (stream_seq) VALUES (?)", (stream_seq,))
            if seen.rowcount == 0:
                return Outcome.DUPLICATE  # committed before, its ack was lost: a redelivery
        for row in rec.rows:
            self._relay_row(row.table, row.data)
        self.records_applied += 1
        self.changes_applied += len(rec.rows)
        return Outcome.APPLIED

    def _relay_row(self, table: str, data: dict[str, Any]) -> None:
        if not is_valid_identifier(table):
            raise RecordRejected(f"invalid table name {table!r}")
        if not data:
            raise RecordRejected(f"empty row for {table!r}")
        for col in data:
            if not is_valid_identifier(col):
                raise RecordRejected(f"invalid column name {col!r} in {table!r}")
        values = {c: relay_value(table, c, v) for c, v in data.items()}
        q = quote_identifier
        meta = self.tables.get(table)
        if meta is None:
            pk = ("id",) if "id" in values else ()
            cols = tuple(values)
            defs = ", ".join(f"{q(c)} PRIMARY KEY" if c in pk else q(c) for c in cols)
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {q(table)} ({defs})")
            meta = TableMeta(table, "relay", "always", cols, ("",) * len(cols), pk, None)
            self._save_table(meta)
        elif meta.visibility != "always":
            raise RecordRejected(f"table {table!r} is {meta.visibility} on its agent and cannot be written here")
        missing = [c for c in values if c not in meta.columns]
        if missing:
            if meta.source != "relay":
                raise RecordRejected(f"{table} has no column(s) {', '.join(missing)}")
            for col in missing:
                self.conn.execute(f"ALTER TABLE {q(table)} ADD COLUMN {q(col)}")
            meta = TableMeta(
                table,
                "relay",
                "always",
                meta.columns + tuple(missing),
                meta.types + ("",) * len(missing),
                meta.pk,
                None,
            )
            self._save_table(meta)
        insert_cols = list(values)
        sql = f"INSERT INTO {q(table)} ({', '.join(map(q, insert_cols))}) VALUES ({', '.join('?' * len(insert_cols))})"
        if meta.pk:
            if not all(c in values for c in meta.pk):
                raise RecordRejected(f"row for {table} lacks its primary key {list(meta.pk)}")
            updates = [c for c in insert_cols if c not in meta.pk]
            target = ", ".join(map(q, meta.pk))
            if updates:
                sql += f" ON CONFLICT ({target}) DO UPDATE SET " + ", ".join(
                    f"{q(c)} = excluded.{q(c)}" for c in updates
                )
            else:
                sql += f" ON CONFLICT ({target}) DO NOTHING"
        try:
            self.conn.execute(sql, [values[c] for c in insert_cols])
        except sqlite3.Error as exc:
            raise RecordRejected(f"cannot write relay row into {table}: {exc}") from None

    # -------------------------------------------------------------- views
    def view(self) -> AgentView:
        """An immutable snapshot of this replica (its committed state when called between batches)."""
        return AgentView(
            agent_id=self.agent_id,
            path=self.path,
            epoch=self.epoch,
            watermark=self.watermark,
            head_seq=self.head_seq,
            committed_at=self.committed_at,
            applied_at=self.applied_at,
            last_seen=self.last_seen,
            records_applied=self.records_applied,
            changes_applied=self.changes_applied,
            blocked=self.blocked,
            tables=MappingProxyType(
                {
                    name: TableView(m.name, m.source, m.visibility, m.columns, m.types, m.pk, m.sql)
                    for name, m in self.tables.items()
                }
            ),
        )

    def describe(self) -> dict[str, Any]:
        by_vis: dict[str, list[str]] = {"always": [], "on_demand": []}
        for name, meta in sorted(self.tables.items()):
            by_vis.setdefault(meta.visibility, []).append(name)
        now = time.time()
        return {
            "agent_id": self.agent_id,
            "epoch": self.epoch,
            "watermark": self.watermark,
            "head_seq": self.head_seq,
            "lag_changes": max(0, self.head_seq - self.watermark),
            "replication_delay_s": (
                round(self.applied_at - self.committed_at, 6) if self.applied_at and self.committed_at else None
            ),
            "last_applied_at": self.applied_at,
            "last_seen": self.last_seen,
            "seconds_since_seen": round(now - self.last_seen, 3) if self.last_seen else None,
            "records_applied": self.records_applied,
            "changes_applied": self.changes_applied,
            "tables": by_vis,
        }

    def close(self) -> None:
        if self.in_txn:
            self.rollback()
        self.conn.close()


class CentralStore:
    """All agents' central copies under `<data_dir>/agents/`.

    The apply thread owns `replicas`; code on the event loop reads only `view`,
    the immutable snapshot published after each batch (`publish_view`).
    """

    def __init__(self, data_dir: DataDir) -> None:
        self.data_dir = data_dir
        data_dir.agents.mkdir(parents=True, exist_ok=True)
        self.replicas: dict[str, AgentReplica] = {}
        for path in sorted(data_dir.agents.glob("*.db")):
            if is_valid_agent_id(path.stem):
                self.replica(path.stem)
        self._view = StoreView()
        self.publish_view()

    @property
    def view(self) -> StoreView:
        """The latest published snapshot (safe to read from any thread)."""
        return self._view

    def publish_view(self) -> StoreView:
        """Snapshot every replica's committed state for readers (called by the owner after each batch)."""
        self._view = StoreView(MappingProxyType({a: self.replicas[a].view() for a in sorted(self.replicas)}))
        return self._view

    def path_for(self, agent_id: str) -> Path:
        return self.data_dir.agent_db(agent_id)

    def replica(self, agent_id: str) -> AgentReplica:
        rep = self.replicas.get(agent_id)
        if rep is None:
            if not is_valid_agent_id(agent_id):
                raise RecordRejected(f"invalid agent id {agent_id!r}")
            rep = AgentReplica(agent_id, self.path_for(agent_id))
            self.replicas[agent_id] = rep
        return rep

    def forget_relay_seen(self, ack_floor: int) -> None:
        """Relay records at or below the consumer's ack floor are never redelivered: drop their dedup entries."""
        for rep in list(self.replicas.values()):
            if not rep.in_txn:
                rep.conn.execute("DELETE FROM _cr_relay_seen WHERE stream_seq <= ?", (ack_floor,))

    def agent_ids(self) -> list[str]:
        return sorted(self.replicas)

    def describe(self) -> list[dict[str, Any]]:
        return [self.replicas[a].describe() for a in self.agent_ids()]

    def close(self) -> None:
        for rep in self.replicas.values():
            rep.close()
        self.replicas.clear()


def table_visibility(store: CentralStore, agent_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    return {a: {n: m.visibility for n, m in store.replica(a).tables.items()} for a in agent_ids if a in store.replicas}
