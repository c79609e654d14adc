"""The central copy: one SQLite file per agent, applied record by record.

`<data_dir>/agents/<agent_id>.db` holds the agent's replicated tables under
their own names plus its replication state (see central_schema). A record's
changes and the new watermark are written in the same transaction, so after
any crash the watermark says exactly what is applied. Values are stored as
they arrived: the agent already applied its column affinities, and
re-applying the same declared types is idempotent.

A resync record (the agent's fresh full copy, see resync.py) replaces the
agent's copy inside the agent's open transaction: its tables are dropped and
refilled by the snapshot, and since a multi-part transaction stays open until
its final part, readers see the old copy or the new one, never a mix.

Every applied record that touched data tables is also appended to the copy's
feed log (feed_log.py) in the same transaction, with each upsert labelled an
insert or an update; a new epoch and a resync start a new feed.

A central file that cannot be opened as a database (corrupt) is moved to
`<data_dir>/quarantine/` and started afresh; the coordinator then resyncs the
agent (`CentralStore.take_quarantined`).

Which records to apply is the sequencer's decision; this module only applies
them. Everything here is synchronous and runs on the consumer's single apply
thread, which owns `CentralStore.replicas`; readers on the event loop use the
published `StoreView`, and their own read-only connections.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from types import MappingProxyType
from typing import Any

from agent_client import (
    AgentStatusRecord,
    ChangeRecord,
    InvalidText,
    RelayRecord,
    SQLiteValue,
    TableLayout,
    decode_values,
    encode_values,
    is_valid_agent_id,
    quote_identifier,
    upsert_sql,
)

from . import central_schema as schema
from . import feed_log
from .central_schema import TableMeta
from .data_dir import DataDir
from .errors import RecordRejected
from .feed_log import FEED_KEEP_BYTES, FEED_KEEP_UNITS, FEED_TRIM_SLACK, UnitBuilder
from .relay_row import check_relay_columns, relay_row
from .replica_state import ReplicaState
from .sequencer import Position, RecordHeader, Verdict
from .store_view import AgentView, StoreView, TableView

log = logging.getLogger("replicator.central_store")

# Verdicts under which a record of the current epoch counts towards the highest sequence seen.
_SEEN_AHEAD = (Verdict.APPLY, Verdict.GAP, Verdict.BLOCKED)

# SQLite result codes (primary, `code & 0xff`) that say something about this machine, not about the record:
# a full disk, an I/O error, no more file descriptors, memory, a lock. Applying again later can succeed, so
# these are never a reason to dead-letter a record.
_ENVIRONMENT_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        8,  # SQLITE_READONLY
        10,  # SQLITE_IOERR
        11,  # SQLITE_CORRUPT
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)
_PAGE_MARGIN_BYTES = 16 * 1024 * 1024
# Result codes that say the file is not a (sound) database: it is quarantined and the agent resynced.
_DAMAGED_CODES = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_SIDE_FILES = ("-wal", "-shm", "-journal")
_SQLITE_HEADER = b"SQLite format 3\x00"
#: Most parameters one key lookup binds (SQLite allows 32766 since 3.32; older builds 999).
_MAX_KEY_PARAMS = 999
#: Value types bound as they are (decode_values would return such a row unchanged but for an oversized integer).
_PLAIN_TYPES = frozenset({int, float, str, type(None)})


def is_damaged(exc: BaseException) -> bool:
    """True for a central file that is not a sound database (corrupt, not SQLite, nonsense state)."""
    if isinstance(exc, sqlite3.DatabaseError):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            return "not a database" in str(exc) or "malformed" in str(exc)
        return (code & 0xFF) in _DAMAGED_CODES
    return isinstance(exc, ValueError | TypeError)  # the state table holds what this code never writes


@dataclass(frozen=True)
class Quarantined:
    """A central file set aside because it could not be opened; its agent needs a resync."""

    agent_id: str
    moved_to: Path
    reason: str


def is_environment_error(exc: BaseException) -> bool:
    """True for an error of the machine (disk full, I/O, too many open files), False for one of the data."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:
            return isinstance(exc, sqlite3.OperationalError) and "disk" in str(exc)
        return (code & 0xFF) in _ENVIRONMENT_CODES
    return isinstance(exc, OSError | MemoryError)


def _rejected(exc: sqlite3.Error, what: str) -> Exception:
    """The record's fault (RecordRejected: dead-lettered) unless the machine's (re-raised as is: retried)."""
    if is_environment_error(exc):
        return exc
    return RecordRejected(f"{what}: {exc}")


def _decoded(values: list[Any]) -> list[SQLiteValue]:
    try:
        return decode_values(values)
    except ValueError as exc:
        raise RecordRejected(f"bad value: {exc}") from None


def _text_casts(row: list[SQLiteValue]) -> tuple[int, ...]:
    """Positions of TEXT values that are not UTF-8 (stored with their exact bytes, as TEXT)."""
    return tuple(i for i, v in enumerate(row) if type(v) is InvalidText)


def _bound(row: list[SQLiteValue], casts: tuple[int, ...]) -> list[SQLiteValue]:
    """The row as bound: InvalidText as its plain bytes (the SQL casts them to TEXT)."""
    if not casts:
        return row
    out = list(row)
    for i in casts:
        out[i] = bytes(out[i])  # type: ignore[arg-type]
    return out


def _placeholder(i: int, casts: tuple[int, ...]) -> str:
    return "CAST(? AS TEXT)" if i in casts else "?"


def _header_damage(path: Path) -> str | None:
    """Why the file at `path` cannot be a SQLite database, judged by its first bytes (None: it may be one)."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_SQLITE_HEADER))
    except FileNotFoundError:
        return None
    if not head or head == _SQLITE_HEADER:
        return None
    return f"not a SQLite database (it starts with {head[:16]!r})"


def _shallow_copy(state: ReplicaState) -> ReplicaState:
    """What `ReplicaState.restore` needs to undo one record: its fields as they are (the tables mapping copied;
    TableMeta is frozen). `ReplicaState.copy` does the same through dataclasses.replace, at several times the
    cost, once per applied record."""
    saved = object.__new__(ReplicaState)
    saved.__dict__.update(state.__dict__)
    saved.tables = dict(state.tables)
    return saved


def _optional_int(value: Any) -> int | None:
    return int(value) if value is not None else None


def _optional_float(value: Any) -> float | None:
    return float(value) if value is not None else None


class AgentReplica:
    """The central copy of one agent: its SQLite file and its in-memory `ReplicaState`."""

    def __init__(self, agent_id: str, path: Path, *, max_bytes: int | None = None, max_record_bytes: int = 0) -> None:
        self.agent_id = agent_id
        self.path = path
        self.max_bytes = max_bytes  # this agent's quota for its central copy (None: unbounded)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA foreign_keys = OFF")
            self.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            if max_bytes is not None:
                # A hard stop past the quota, never reached by a record the quota check let through.
                hard = max_bytes + 2 * max_record_bytes + _PAGE_MARGIN_BYTES
                conn.execute(f"PRAGMA max_page_count = {hard // self.page_size + 1}")
            schema.create_schema(conn)
            feed_log.create_schema(conn)
            self.state = _load_state(conn)
            st = os.stat(path)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        self.file_id = (st.st_dev, st.st_ino)  # to notice the file deleted or replaced under us
        self._stmt_cache: dict[tuple[str, str, tuple[str, ...], tuple[int, ...]], str] = {}
        self._room: int | None = None  # bytes the open transaction may still add under the quota (estimate)
        # Body bytes the feed log may keep: a quarter of the quota at most (the log counts in the file's size).
        self.feed_keep_bytes = min(FEED_KEEP_BYTES, max_bytes // 4) if max_bytes is not None else FEED_KEEP_BYTES
        self._updating: set[str] = set()  # tables whose last run of upserts had updates: labelled row by row

    # -------------------------------------------------------------- state
    @property
    def in_txn(self) -> bool:
        return self.state.in_transaction

    def position(self) -> Position:
        return self.state.position()

    def observe(self, header: RecordHeader, verdict: Verdict) -> None:
        """Note that a record of this agent arrived (before it is applied, whatever its verdict)."""
        state = self.state
        state.last_seen = time.time()
        if (
            verdict in _SEEN_AHEAD
            and header.kind == "changes"
            and header.epoch == state.epoch
            and not (state.open_group and header.first_seq != state.watermark + 1)
        ):
            state.head_seq = max(state.head_seq, header.last_seq)

    # -------------------------------------------------------------- records ahead of their turn
    def keep_ahead(self, header: RecordHeader, stream_seq: int) -> None:
        """Remember (in the open transaction) a record that must wait for an earlier one."""
        now = time.time()
        if schema.add_ahead(self.conn, stream_seq, header.epoch, header.first_seq, header.last_seq, now):
            self.state.ahead += 1
            self.state.ahead_since = self.state.ahead_since or now

    def settle_ahead(self, stream_seq: int) -> None:
        """A remembered record was applied, skipped or dead-lettered: forget it (in the open transaction)."""
        if schema.drop_ahead(self.conn, stream_seq):
            self.state.ahead -= 1
            if not self.state.ahead:
                self.state.ahead_since = None

    def due_ahead(self, limit: int) -> list[int]:
        """Stream sequences of remembered records whose turn has come, in order."""
        if not self.state.ahead:
            return []
        return schema.due_ahead(self.conn, self.state.epoch, self.state.watermark, limit)

    def used_bytes(self) -> int:
        """Bytes of the agent's file in use (free pages are reused before the file grows)."""
        pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        free = int(self.conn.execute("PRAGMA freelist_count").fetchone()[0])
        return (pages - free) * self.page_size

    def check_quota(self, record: ChangeRecord | RelayRecord, record_bytes: int) -> None:
        """Refuse a record that could take this agent's copy past its quota (deletions always pass)."""
        if self.max_bytes is None:
            return
        if isinstance(record, ChangeRecord) and all(op in ("D", "X") for _seq, op, _l, _v in record.changes):
            return
        # The file's size bounds what is in use: the free-page count is read only when that bound is close.
        # Within one transaction, the room read at its first record is spent record by record (each may add up
        # to twice its size): the file is asked again only when that estimate runs out.
        need = 2 * record_bytes
        if self._room is not None and self._room >= need:
            self._room -= need
            return
        pages = int(self.conn.execute("PRAGMA page_count").fetchone()[0])
        if pages * self.page_size + need <= self.max_bytes:
            self._room = self.max_bytes - pages * self.page_size - need
            return
        self._room = None
        used = self.used_bytes()
        if used + 2 * record_bytes > self.max_bytes:
            raise RecordRejected(
                f"agent {self.agent_id} is over its storage quota: {used} bytes used, this record may add up to "
                f"{2 * record_bytes}, the limit is {self.max_bytes} (--max-agent-bytes)"
            )

    def set_blocked(self, reason: str | None) -> None:
        """This agent's order is broken by a dead letter (reason), or no more (None); stored at commit."""
        self.state.blocked = reason

    def note_status(self, rec: AgentStatusRecord) -> bool:
        """Keep the agent's report about itself (in the open transaction) unless a newer one is kept already."""
        state = self.state
        if state.agent_reported_at is not None and rec.at < state.agent_reported_at:
            return False
        state.agent_epoch = rec.epoch
        state.agent_last_seq = rec.last_seq
        state.agent_acked_seq = rec.acked_seq
        state.agent_blocked = rec.blocked
        state.agent_reported_at = rec.at
        return True

    def begin(self) -> None:
        if not self.in_txn:
            self._room = None
            self.conn.execute("BEGIN IMMEDIATE")
            self.state.begin()

    def commit(self) -> None:
        if not self.in_txn:
            return
        state = self.state
        if state.changes_moved() or state.records_applied != state.committed().records_applied:
            state.applied_at = time.time()  # not for a status report or a block alone: nothing was applied
        values: dict[str, Any] = {
            "epoch": state.epoch,
            "watermark": state.watermark,
            "committed_at": state.committed_at,
            "applied_at": state.applied_at,
            "records_applied": state.records_applied,
            "changes_applied": state.changes_applied,
            "last_resync": state.last_resync,
            "resyncs": state.resyncs,
            "agent_epoch": state.agent_epoch,
            "agent_last_seq": state.agent_last_seq,
            "agent_acked_seq": state.agent_acked_seq,
            "agent_blocked": state.agent_blocked,
            "agent_reported_at": state.agent_reported_at,
        }
        done = state.committed()
        clear: tuple[str, ...] = ()
        if state.blocked != done.blocked:
            if state.blocked is None:
                clear = ("blocked",)
            else:
                values["blocked"] = state.blocked
        # Only what changed since the last commit (the committed state mirrors the file; a key never written
        # reads as its default): a one-record commit writes 4-5 keys, not 14.
        if done is not state:
            values = {k: v for k, v in values.items() if k == "blocked" or getattr(done, k) != v}
        schema.save_state(self.conn, values, clear=clear)
        self.conn.execute("COMMIT")
        state.commit()

    def rollback(self) -> None:
        """Undo the open transaction: its SQL and every in-memory change since `begin`.

        SQLite may have rolled the transaction back itself (a full disk does that); then there is
        nothing left to undo in the file, only in memory.
        """
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        finally:
            self.state.rollback()
            self._stmt_cache.clear()

    # -------------------------------------------------------------- multi-part transactions
    def begin_group(self) -> None:
        """Before the first part of a multi-part transaction (inside the open transaction): a savepoint, so that
        a part that can never be applied takes the whole local transaction back, and only it."""
        self.conn.execute("SAVEPOINT grp")
        self.state.begin_group()

    def end_group(self) -> None:
        """The final part was applied: the multi-part transaction is whole."""
        if self.state.in_group:
            self.conn.execute("RELEASE grp")
            self.state.end_group()

    def abandon_group(self) -> None:
        """A part was rejected: undo every part applied so far (SQL and state); records before it stay."""
        if self.state.in_group:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK TO grp")
                self.conn.execute("RELEASE grp")
            self.state.abandon_group()
            self._stmt_cache.clear()

    @property
    def txn_lost(self) -> bool:
        """SQLite ended our open transaction by itself (e.g. on a full disk): everything in it must be retried."""
        return self.in_txn and not self.conn.in_transaction

    @contextmanager
    def record_savepoint(self) -> Iterator[None]:
        """Apply one record: if the block raises, its SQL and every in-memory change are undone."""
        self.conn.execute("SAVEPOINT rec")
        state = self.state
        saved = _shallow_copy(state)
        try:
            yield
        except BaseException:
            state.restore(saved)
            self._stmt_cache.clear()
            if self.conn.in_transaction:  # else SQLite rolled everything back already: see txn_lost
                self.conn.execute("ROLLBACK TO rec")
                self.conn.execute("RELEASE rec")
            raise
        self.conn.execute("RELEASE rec")

    def _save_table(self, meta: TableMeta) -> None:
        schema.save_table(self.conn, meta)
        self.state.tables[meta.name] = meta
        self._stmt_cache.clear()

    def _forget_table(self, name: str) -> None:
        schema.drop_table(self.conn, name)
        self.state.tables.pop(name, None)
        self._stmt_cache.clear()

    # -------------------------------------------------------------- the feed log (feed_log.py)
    def _new_feed(self) -> None:
        """Start a new feed in the open transaction: empty log, new id; offsets of the old one must refetch."""
        feed_id, floor = feed_log.start_new_feed(self.conn)
        state = self.state
        state.feed_id = feed_id
        state.feed_n = state.feed_floor = floor
        state.feed_rows = state.feed_bytes = 0
        state.feed_open = False

    def _log(self, unit: UnitBuilder | None, final: bool) -> None:
        """Append what a record changed to the feed log (in the open transaction). A record that changed no data
        table writes nothing, unless it is the final part of a multi-part transaction whose earlier parts
        were logged (its row closes their unit)."""
        state = self.state
        if unit is None or state.feed_quiet or not (unit or (final and state.feed_open)):
            return
        body = unit.body()
        n = feed_log.append(self.conn, final, unit.tables(), body, time.time())
        state.feed_rows += 1
        state.feed_bytes += len(body)
        state.feed_open = not final
        if final:
            state.feed_n = n
            if state.feed_rows > FEED_KEEP_UNITS or state.feed_bytes > self.feed_keep_bytes:
                self._trim_feed()

    def _trim_feed(self) -> None:
        """Drop the oldest whole units, leaving room for FEED_TRIM_SLACK rows and a quarter of the byte bound."""
        state = self.state
        trimmed = feed_log.trim(
            self.conn, state.feed_n, FEED_KEEP_UNITS - FEED_TRIM_SLACK, self.feed_keep_bytes - self.feed_keep_bytes // 4
        )
        if trimmed is not None:
            floor, rows, body_bytes = trimmed
            state.feed_floor = floor
            state.feed_rows -= rows
            state.feed_bytes -= body_bytes

    # -------------------------------------------------------------- change records
    def apply_changes(self, rec: ChangeRecord) -> None:
        """Apply the part of `rec` above the watermark inside the open transaction (a new epoch starts over)."""
        state = self.state
        if rec.epoch != state.epoch:
            self._reset_epoch(rec.epoch)
        skip = state.watermark
        layouts = rec.layouts
        changes = rec.changes
        n = len(changes)
        # Changes run first_seq..last_seq one by one (decode_record checks it): skip those applied already.
        i = max(0, skip - rec.first_seq + 1)
        applied = 0
        unit = None if state.feed_quiet else UnitBuilder()  # a resync's refill is not logged
        while i < n:
            _seq, op, layout_id, values = changes[i]
            if op == "R":  # the start of a resync: apply_resync did its work before
                applied += 1
                i += 1
                continue
            lid = str(layout_id)
            layout = layouts[lid]
            if op == "U":
                # A run of upserts into the same table: one executemany.
                j = i + 1
                while j < n and changes[j][1] == "U" and changes[j][2] == layout_id:
                    j += 1
                run = [c[3] for c in changes[i:j]] if j > i + 1 else [values]
                labels = self._upsert_run(layout, run)
                if unit is not None:
                    unit.upserts(lid, layout, run, labels)
                applied += j - i
                i = j
                continue
            if op == "D":
                self._delete(layout, _decoded(values))
                if unit is not None:
                    unit.delete(lid, layout, values)
            elif op == "S":
                self._create_from_layout(layout)
                if unit is not None:
                    unit.schema(layout.table)
            elif op == "X":
                meta = state.tables.get(layout.table)
                if meta is not None and meta.source == "agent":
                    self._forget_table(layout.table)
                    if unit is not None:
                        unit.schema(layout.table)
            elif op == "V":
                self._announce(layout)
                if unit is not None:
                    unit.schema(layout.table)
            applied += 1
            i += 1
        state.watermark = rec.last_seq
        state.head_seq = max(state.head_seq, rec.last_seq)
        state.committed_at = rec.committed_at
        state.records_applied += 1
        state.changes_applied += applied
        state.open_group = not rec.final
        if state.open_group and not state.group_started:
            state.group_started = time.monotonic()
        if not state.open_group:
            state.group_started = 0.0
        self._log(unit, rec.final)
        if rec.final:
            state.feed_quiet = False  # a resync's transaction ends with this record: later ones are logged

    def _upsert_run(self, layout: TableLayout, rows: list[list[Any]]) -> str:
        """Write whole rows into the layout's table, in as few executemany calls as can be; the feed's labels:
        "" when every row was new (an insert), else one "i" (insert) or "u" (update: its key was there) per row.

        Rows of plain values (integers, finite REALs, text, NULL: nearly all) go to SQLite as they arrived,
        judged by one pass over their value types; a row with a tagged value (BLOB, non-finite REAL, TEXT that
        is not UTF-8), a boolean, or an integer SQLite cannot hold is decoded value by value (`decode_values`
        refuses the last two, and the record is rejected).
        """
        if set(map(type, chain.from_iterable(rows))) <= _PLAIN_TYPES:
            try:
                return self._write_rows(layout, (), rows)
            except OverflowError:  # an integer beyond 64 bits: refused below, by the value check (the record undone)
                pass
        parts: list[tuple[str, int]] = []
        pending: list[list[SQLiteValue]] = []
        pending_casts: tuple[int, ...] | None = None
        for values in rows:
            row = _decoded(values)
            casts = _text_casts(row) if row is not values else ()
            if casts != pending_casts:
                if pending_casts is not None:
                    parts.append((self._write_rows(layout, pending_casts, pending), len(pending)))
                pending, pending_casts = [], casts
            pending.append(_bound(row, casts))
        if pending_casts is not None:
            parts.append((self._write_rows(layout, pending_casts, pending), len(pending)))
        if not any(labels for labels, _count in parts):
            return ""
        return "".join(labels or "i" * count for labels, count in parts)

    def _write_rows(self, layout: TableLayout, casts: tuple[int, ...], rows: list[list[Any]]) -> str:
        """Write rows of one statement shape; their labels as `_upsert_run` says.

        A run is first tried as one `INSERT OR IGNORE` executemany in a savepoint: when it inserted every row,
        all were new (the common case: no read at all). Otherwise (or at once when the table's last run had
        updates) the keys already there are found by one SELECT for the whole run and the rows written by one
        `INSERT OR REPLACE` executemany. One row, or rows with values bound as casts: `INSERT OR IGNORE`, and
        the `INSERT OR REPLACE` where it was ignored.
        """
        insert, replace = self._insert_sql(layout, casts), self._replace_sql(layout, casts)
        conn = self.conn
        table = layout.table
        try:
            if len(rows) > 1 and table not in self._updating:
                conn.execute("SAVEPOINT ins")
                try:
                    all_new = conn.executemany(insert, rows).rowcount == len(rows)
                except BaseException:
                    self._undo_savepoint("ins")
                    raise
                if all_new:
                    conn.execute("RELEASE ins")
                    self._updating.discard(table)
                    return ""
                self._undo_savepoint("ins")
            if len(rows) > 1 and not casts:
                labels = self._labels_of_run(layout, rows)
                conn.executemany(replace, rows)
            else:
                labels = []
                for row in rows:
                    if conn.execute(insert, row).rowcount:
                        labels.append("i")
                    else:
                        conn.execute(replace, row)
                        labels.append("u")
        except sqlite3.Error as exc:
            raise _rejected(exc, "cannot apply rows") from exc
        if "u" not in labels:
            self._updating.discard(table)
            return ""
        self._updating.add(table)
        return "".join(labels)

    def _labels_of_run(self, layout: TableLayout, rows: list[list[Any]]) -> list[str]:
        """The label of each row of a run about to be written: "u" where INSERT OR REPLACE will find its key
        there already (in the table: one SELECT joins the run's keys to it, compared under the key columns'
        affinity as the insert compares them, and answers the keys found as they were bound; or earlier in the
        run), else "i"."""
        pk_at = [layout.columns.index(c) for c in layout.pk]
        found: set[Any] = set()
        if len(pk_at) == 1:
            j = pk_at[0]
            keys: list[Any] = [row[j] for row in rows]
            params: list[Any] = keys
        else:
            keys = [tuple(row[j] for j in pk_at) for row in rows]
            params = [v for key in keys for v in key]
        width = len(pk_at)
        step = max(1, _MAX_KEY_PARAMS // width)
        for start in range(0, len(keys), step):
            chunk = params[start * width : (start + step) * width]
            answer = self.conn.execute(self._keys_sql(layout, len(chunk) // width), chunk)
            if width == 1:
                found.update([r[0] for r in answer.fetchall()])
            else:
                found.update(answer)
        labels = []
        for key in keys:
            if key in found:
                labels.append("u")
            else:
                labels.append("i")
                found.add(key)
        return labels

    def _keys_sql(self, layout: TableLayout, n: int) -> str:
        """SELECT, of n keys bound in order, those whose key is in the layout's table (as bound)."""
        cache_key = ("K", layout.table, tuple(layout.pk), (n,))
        sql = self._stmt_cache.get(cache_key)
        if sql is not None:
            return sql
        q = quote_identifier
        width = len(layout.pk)
        one = "(" + ", ".join("?" * width) + ")"
        names = ", ".join(f"k{j}" for j in range(width))
        on = " AND ".join(f"t.{q(c)} = k.k{j}" for j, c in enumerate(layout.pk))
        values = ", ".join([one] * n)
        sql = f"WITH k({names}) AS (VALUES {values}) SELECT {names} FROM k JOIN {q(layout.table)} AS t ON {on}"
        self._stmt_cache[cache_key] = sql
        return sql

    def _undo_savepoint(self, name: str) -> None:
        if self.conn.in_transaction:  # else SQLite rolled everything back already: see txn_lost
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")

    def apply_resync(self, rec: ChangeRecord) -> None:
        """Replace the agent's copy with the fresh one `rec` starts (inside the open transaction)."""
        self.reset_for_resync(rec)
        self.apply_changes(rec)

    def reset_for_resync(self, rec: ChangeRecord) -> None:
        """Make way for the fresh copy a resync record starts (inside the open transaction; apply it next).

        Every table the agent replicates is dropped (relay-written tables stay), records remembered ahead that
        the snapshot supersedes are forgotten, an older epoch is retired, the watermark is set just before the
        resync and `blocked` is cleared; `rec` is then applied as usual (its S and U changes refill the tables).
        A new feed starts, empty: the resync's records up to its final part are not logged.
        """
        state = self.state
        if rec.epoch != state.epoch and state.epoch is not None:
            schema.retire_epoch(self.conn, state.epoch, time.time())
            state.retired = state.retired | {state.epoch}
            schema.drop_ahead_of_epoch(self.conn, state.epoch)  # they can never be applied now
        schema.drop_ahead_below(self.conn, rec.epoch, rec.first_seq)
        state.ahead = schema.count_ahead(self.conn)
        state.ahead_since = schema.oldest_ahead(self.conn) if state.ahead else None
        for name, meta in list(state.tables.items()):
            if meta.source == "agent":
                self._forget_table(name)
        if rec.epoch != state.epoch:
            state.head_seq = 0
        state.epoch = rec.epoch
        state.watermark = rec.first_seq - 1
        state.open_group = False  # whatever part was open is superseded: this record starts the transaction anew
        state.blocked = None
        state.last_resync = rec.resync_request
        state.resyncs += 1
        self._new_feed()  # the feed starts again after the fresh copy: its refill is not logged
        state.feed_quiet = True

    def _reset_epoch(self, epoch: str) -> None:
        """A new agent database: drop everything replicated from the old one and start over."""
        state = self.state
        if state.epoch is not None:
            schema.retire_epoch(self.conn, state.epoch, time.time())
            state.retired = state.retired | {state.epoch}
            state.ahead -= schema.drop_ahead_of_epoch(self.conn, state.epoch)  # they can never be applied now
            state.ahead_since = schema.oldest_ahead(self.conn) if state.ahead else None
        for name, meta in list(state.tables.items()):
            if meta.source == "agent":
                self._forget_table(name)
        state.epoch = epoch
        state.watermark = 0
        state.head_seq = 0
        self._new_feed()  # a new history: offsets of the old database must refetch

    def _table_for(self, layout: TableLayout) -> TableMeta:
        meta = self.state.tables.get(layout.table)
        if meta is None or meta.source != "agent" or meta.visibility != "always":
            raise RecordRejected(f"table {layout.table!r} is not replicated here (no schema change seen for it)")
        if meta.columns != tuple(layout.columns) or meta.pk != tuple(layout.pk):
            raise RecordRejected(
                f"schema mismatch for {layout.table!r}: record has columns {layout.columns}, "
                f"central copy has {list(meta.columns)}"
            )
        return meta

    def _replace_sql(self, layout: TableLayout, casts: tuple[int, ...] = ()) -> str:
        """INSERT OR REPLACE of a whole replicated row (the agent sends every column); the values at `casts`
        are bound as bytes and stored as TEXT (text that is not UTF-8, kept byte for byte)."""
        return self._row_sql("REPLACE", layout, casts)

    def _insert_sql(self, layout: TableLayout, casts: tuple[int, ...] = ()) -> str:
        """INSERT OR IGNORE of a whole row: it writes nothing when the key is there (an update, see _write_rows)."""
        return self._row_sql("IGNORE", layout, casts)

    def _row_sql(self, conflict: str, layout: TableLayout, casts: tuple[int, ...]) -> str:
        key = (conflict, layout.table, tuple(layout.columns), casts)
        sql = self._stmt_cache.get(key)
        if sql is None:
            self._table_for(layout)
            q = quote_identifier
            marks = ", ".join(_placeholder(i, casts) for i in range(len(layout.columns)))
            sql = f"INSERT OR {conflict} INTO {q(layout.table)} ({', '.join(map(q, layout.columns))}) VALUES ({marks})"
            self._stmt_cache[key] = sql
        return sql

    def _delete(self, layout: TableLayout, key: list[SQLiteValue]) -> None:
        self._table_for(layout)
        q = quote_identifier
        casts = _text_casts(key)
        where = " AND ".join(f"{q(c)} IS {_placeholder(i, casts)}" for i, c in enumerate(layout.pk))
        try:
            self.conn.execute(f"DELETE FROM {q(layout.table)} WHERE {where}", _bound(key, casts))
        except sqlite3.Error as exc:
            raise _rejected(exc, f"cannot delete from {layout.table}") from exc

    def _create_from_layout(self, layout: TableLayout) -> None:
        if not layout.columns or not layout.pk:
            raise RecordRejected(f"schema change for {layout.table!r} has no columns or no primary key")
        types = tuple(layout.types) or ("",) * len(layout.columns)
        meta = TableMeta(layout.table, "agent", "always", tuple(layout.columns), types, tuple(layout.pk), layout.sql)
        try:
            self.conn.execute(f"DROP TABLE IF EXISTS {quote_identifier(layout.table)}")
            self.conn.execute(schema.agent_table_ddl(meta))
        except sqlite3.Error as exc:
            raise _rejected(exc, f"cannot create {layout.table!r}") from exc
        self._save_table(meta)

    def _announce(self, layout: TableLayout) -> None:
        existing = self.state.tables.get(layout.table)
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
    def apply_relay(self, rec: RelayRecord, stream_seq: int | None = None) -> bool:
        """Write a relay record's rows in the open transaction; False if this stream seq was applied before."""
        if stream_seq is not None:
            seen = self.conn.execute("INSERT OR IGNORE INTO _cr_relay_seen (stream_seq) VALUES (?)", (stream_seq,))
            if seen.rowcount == 0:
                return False  # committed before, its ack was lost: a redelivery
        unit = None if self.state.feed_quiet else UnitBuilder()
        for row in rec.rows:
            self._relay_row(row.table, row.data, unit)
        # Inside an agent's open multi-part transaction the row joins its unit (they commit together).
        self._log(unit, not self.state.open_group)
        self.state.records_applied += 1
        self.state.changes_applied += len(rec.rows)
        return True

    def _relay_row(self, table: str, data: dict[str, Any], unit: UnitBuilder | None) -> None:
        values = relay_row(table, data)
        q = quote_identifier
        meta = self.state.tables.get(table)
        if meta is None:
            # SQLite compares table names without case: `Notes` would write `notes`, whoever owns it.
            same = next((m for name, m in self.state.tables.items() if name.lower() == table.lower()), None)
            if same is not None:
                raise RecordRejected(f"table {table!r} is named {same.name!r} here: use that name")
        if meta is None:
            cols = tuple(values)
            meta = TableMeta(table, "relay", "always", cols, ("",) * len(cols), ("id",) if "id" in values else (), None)
            try:
                self.conn.execute(schema.relay_table_ddl(meta))
            except sqlite3.Error as exc:
                raise _rejected(exc, f"cannot create relay table {table!r}") from exc
            self._save_table(meta)
            if unit is not None:
                unit.schema(table)
        elif meta.source != "relay":
            # The agent's own table: only its change records write it, or the central copy would differ
            # from the agent's for good. (The API refuses this too, but only against what is applied.)
            raise RecordRejected(f"table {table!r} belongs to agent {self.agent_id} and is written only by it")
        missing = check_relay_columns(table, meta.columns, values)
        if missing:
            try:
                for col in missing:
                    self.conn.execute(f"ALTER TABLE {q(table)} ADD COLUMN {q(col)}")
            except sqlite3.Error as exc:
                raise _rejected(exc, f"cannot add columns to {table!r}") from exc
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
            if unit is not None:
                unit.schema(table)
        if meta.pk and not all(c in values for c in meta.pk):
            raise RecordRejected(f"row for {table} lacks its primary key {list(meta.pk)}")
        columns = list(values)
        try:
            found = None
            if unit is not None and meta.pk:
                where = " AND ".join(f"{q(c)} IS ?" for c in meta.pk)
                key_values = [values[c] for c in meta.pk]
                found = self.conn.execute(f"SELECT rowid FROM {q(table)} WHERE {where}", key_values).fetchone()
            cur = self.conn.execute(upsert_sql(table, columns, meta.pk), [values[c] for c in columns])
            if unit is None:
                return
            rowid = found[0] if found is not None else cur.lastrowid
            stored = self.conn.execute(
                f"SELECT {', '.join(map(q, meta.columns))} FROM {q(table)} WHERE rowid = ?", (rowid,)
            ).fetchone()
        except sqlite3.Error as exc:
            raise _rejected(exc, f"cannot write relay row into {table}") from exc
        if stored is None:
            return  # nothing was written (cannot happen: a row was inserted or its key found)
        row = dict(zip(meta.columns, encode_values(stored), strict=True))
        key = {c: row[c] for c in meta.pk} if meta.pk else {"rowid": rowid}
        unit.relay(table, "u" if found is not None else "i", key, row)

    # -------------------------------------------------------------- views
    def view(self) -> AgentView:
        """An immutable snapshot of this replica as of its last commit (last_seen and head_seq are live).

        An agent inside an open multi-part transaction shows what it was before the transaction began.
        """
        live = self.state
        done = live.committed()
        return AgentView(
            agent_id=self.agent_id,
            path=self.path,
            epoch=done.epoch,
            watermark=done.watermark,
            head_seq=live.head_seq,
            committed_at=done.committed_at,
            applied_at=done.applied_at,
            last_seen=live.last_seen,
            records_applied=done.records_applied,
            changes_applied=done.changes_applied,
            blocked=done.blocked,
            waiting=done.ahead,
            waiting_since=done.ahead_since,
            resyncs=done.resyncs,
            last_resync=done.last_resync,
            agent_blocked=done.agent_blocked,
            agent_last_seq=done.agent_last_seq,
            agent_reported_at=done.agent_reported_at,
            file_id=self.file_id,
            feed_id=done.feed_id,
            feed_n=done.feed_n,
            tables=MappingProxyType(
                {
                    name: TableView(m.name, m.source, m.visibility, m.columns, m.types, m.pk, m.sql)
                    for name, m in done.tables.items()
                }
            ),
        )

    def close(self) -> None:
        if self.in_txn:
            self.rollback()
        self.conn.close()


def _load_state(conn: sqlite3.Connection) -> ReplicaState:
    """The replica's state as its file holds it (ValueError/TypeError: values this code never writes)."""
    saved = schema.load_state(conn)
    watermark = int(saved.get("watermark", 0))
    ahead = schema.count_ahead(conn)
    feed = feed_log.load_position(conn)
    return ReplicaState(
        epoch=saved.get("epoch"),
        watermark=watermark,
        head_seq=watermark,
        committed_at=_optional_float(saved.get("committed_at")),
        applied_at=_optional_float(saved.get("applied_at")),
        last_seen=_optional_float(saved.get("applied_at")),
        records_applied=int(saved.get("records_applied", 0)),
        changes_applied=int(saved.get("changes_applied", 0)),
        blocked=saved.get("blocked"),
        ahead=ahead,
        ahead_since=schema.oldest_ahead(conn) if ahead else None,
        tables=schema.load_tables(conn),
        retired=schema.load_retired(conn),
        last_resync=saved.get("last_resync"),
        resyncs=int(saved.get("resyncs") or 0),
        agent_epoch=saved.get("agent_epoch"),
        agent_last_seq=_optional_int(saved.get("agent_last_seq")),
        agent_acked_seq=_optional_int(saved.get("agent_acked_seq")),
        agent_blocked=saved.get("agent_blocked"),
        agent_reported_at=_optional_float(saved.get("agent_reported_at")),
        feed_id=feed.feed_id,
        feed_n=feed.head,
        feed_floor=feed.floor,
        feed_rows=feed.rows,
        feed_bytes=feed.body_bytes,
    )


class CentralStore:
    """All agents' central copies under `<data_dir>/agents/`.

    The apply thread owns `replicas`; code on the event loop reads only `view`,
    the immutable snapshot published after each batch (`publish_view`).
    """

    def __init__(self, data_dir: DataDir, *, max_agent_bytes: int | None = None, max_record_bytes: int = 0) -> None:
        self.data_dir = data_dir
        self.max_agent_bytes = max_agent_bytes
        self.max_record_bytes = max_record_bytes
        data_dir.agents.mkdir(parents=True, exist_ok=True)
        self.replicas: dict[str, AgentReplica] = {}
        self._quarantined: list[Quarantined] = []
        self._lock = threading.Lock()  # guards the view's composition and the quarantine list (both threads)
        self._base = StoreView()  # the replicas' committed state as of the last publish
        self._marks: Mapping[str, tuple[str, float]] = MappingProxyType({})  # agent -> resync (reason, since)
        self._view = self._base
        try:
            for path in sorted(data_dir.agents.glob("*.db")):
                if is_valid_agent_id(path.stem):
                    self.replica(path.stem)
        except BaseException:
            self.close()
            raise
        self.publish_view()

    @property
    def view(self) -> StoreView:
        """The latest published snapshot (safe to read from any thread)."""
        return self._view

    def publish_view(self, agents: Iterable[str] | None = None) -> StoreView:
        """Snapshot the replicas' committed state for readers (called by the owner after each batch).

        With `agents`, only those are snapshotted again; the others keep their previous view.
        """
        if agents is None:
            views = {a: rep.view() for a, rep in self.replicas.items()}
        else:
            views = dict(self._base.agents)
            for agent in agents:
                rep = self.replicas.get(agent)
                if rep is not None:
                    views[agent] = rep.view()
                else:
                    views.pop(agent, None)
        with self._lock:
            self._base = StoreView(MappingProxyType({a: views[a] for a in sorted(views)}))
            self._view = self._compose()
            return self._view

    def mark_resyncs(self, marks: Mapping[str, tuple[str, float]]) -> None:
        """Show which agents wait for a resync (agent -> (reason, requested at)); from the coordinator, any thread."""
        with self._lock:
            self._marks = MappingProxyType(dict(marks))
            self._view = self._compose()

    def _compose(self) -> StoreView:
        """The published base with the resync marks on it (under the lock)."""
        if not self._marks:
            return self._base
        # Only the marked agents change: the replicas' own views carry no resync mark.
        agents = dict(self._base.agents)
        for agent_id, (reason, since) in self._marks.items():
            view = agents.get(agent_id)
            if view is not None:
                agents[agent_id] = dataclasses.replace(view, resync_pending=reason, resync_requested_at=since)
        return StoreView(MappingProxyType(agents))

    def path_for(self, agent_id: str) -> Path:
        return self.data_dir.agent_db(agent_id)

    def position(self, agent_id: str) -> Position:
        """Where an agent's copy stands; a fresh Position for an agent not seen yet (nothing is created)."""
        rep = self.replicas.get(agent_id)
        return rep.position() if rep is not None else Position()

    def replica(self, agent_id: str) -> AgentReplica:
        """The agent's central copy, opened (or created) on first use; a damaged file is quarantined."""
        rep = self.replicas.get(agent_id)
        if rep is None:
            if not is_valid_agent_id(agent_id):
                raise RecordRejected(f"invalid agent id {agent_id!r}")
            rep = self._open(agent_id)
            self.replicas[agent_id] = rep
        return rep

    def reopen(self, agent_id: str) -> AgentReplica:
        """Close the agent's copy (its open transaction rolled back) and open its file again, or a new one
        when the file is gone (deleted under us: what the old connection wrote went with it)."""
        old = self.replicas.pop(agent_id, None)
        if old is not None:
            try:
                old.close()
            except sqlite3.Error as exc:
                log.warning("closing the lost central copy of %s: %s", agent_id, exc)
        return self.replica(agent_id)

    def take_quarantined(self) -> list[Quarantined]:
        """The central files set aside since the last call (their agents need a resync)."""
        with self._lock:
            taken, self._quarantined = self._quarantined, []
        return taken

    def _open(self, agent_id: str) -> AgentReplica:
        path = self.path_for(agent_id)
        if not path.exists():
            self._set_aside_orphans(agent_id, path)  # a -wal left without its database must not meet a new one
        damage = _header_damage(path)  # before SQLite touches it (and its side files)
        if damage is None:
            try:
                return self._new_replica(agent_id, path)
            except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
                if not is_damaged(exc):
                    raise
                damage = f"{type(exc).__name__}: {exc}"
        moved = self._quarantine(agent_id, path)
        log.error("central copy of %s is damaged (%s): moved to %s; it will be resynced", agent_id, damage, moved)
        with self._lock:
            self._quarantined.append(Quarantined(agent_id, moved, damage))
        return self._new_replica(agent_id, path)

    def _new_replica(self, agent_id: str, path: Path) -> AgentReplica:
        return AgentReplica(agent_id, path, max_bytes=self.max_agent_bytes, max_record_bytes=self.max_record_bytes)

    def _quarantine(self, agent_id: str, path: Path) -> Path:
        """Move the agent's file and its side files to `quarantine/<agent>-<stamp>.db*`; the new path."""
        target_dir = self.data_dir.quarantine
        target_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = target_dir / f"{agent_id}-{stamp}.db"
        n = 1
        while target.exists():
            n += 1
            target = target_dir / f"{agent_id}-{stamp}-{n}.db"
        for suffix in ("", *_SIDE_FILES):
            src = path.with_name(path.name + suffix)
            if src.exists():
                src.rename(target.with_name(target.name + suffix))
        return target

    def _set_aside_orphans(self, agent_id: str, path: Path) -> None:
        if any(path.with_name(path.name + suffix).exists() for suffix in _SIDE_FILES):
            moved = self._quarantine(agent_id, path)
            log.warning("central copy of %s: side files without their database moved to %s", agent_id, moved)

    def forget_relay_seen(self, ack_floor: int) -> None:
        """Relay records at or below the consumer's ack floor are never redelivered: drop their dedup entries."""
        for rep in list(self.replicas.values()):
            if not rep.in_txn:
                try:
                    rep.conn.execute("DELETE FROM _cr_relay_seen WHERE stream_seq <= ?", (ack_floor,))
                except sqlite3.Error:  # housekeeping only (e.g. a full disk): next time
                    continue

    def agent_ids(self) -> list[str]:
        """The agents of the published view."""
        return self._view.agent_ids()

    def close(self) -> None:
        try:
            for rep in self.replicas.values():
                try:
                    rep.close()
                except sqlite3.Error:
                    rep.conn.close()
        finally:
            self.replicas.clear()
