"""Read an agent's change records back from the AGENT_CHANGES stream, and compare them with SQLite.

Everything here talks to a real nats-server (ordered consumer, no mocks) and to real SQLite files, so the
agent-side tests can check what actually went over the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, PubAck

from agent_client import (
    STREAM_NAME,
    AgentStatusRecord,
    AgentStorage,
    ChangeRecord,
    TableLayout,
    changes_subject,
    decode_record,
    decode_value,
    ensure_stream,
    msg_id,
)

SQLiteValue = int | float | str | bytes | None


@dataclass(frozen=True)
class StreamMessage:
    """One message of an agent's subject, as stored by JetStream."""

    stream_seq: int
    msg_id: str | None
    data: bytes
    record: ChangeRecord


@dataclass(frozen=True)
class StatusMessage:
    """One agent status record (kind `status`) of an agent's subject."""

    stream_seq: int
    msg_id: str | None
    record: AgentStatusRecord


#: The layout an R change (resync, layout id 0) is given by `flatten`: it names no table.
RESYNC_LAYOUT = TableLayout(table="_resync", columns=[], pk=[])


@dataclass(frozen=True)
class Change:
    """One change of a record, with its values decoded (agent_client.decode_value)."""

    seq: int
    op: str
    layout: TableLayout
    values: list[SQLiteValue]
    record_index: int

    @property
    def table(self) -> str:
        return self.layout.table


@contextlib.asynccontextmanager
async def jetstream(url: str) -> AsyncIterator[JetStreamContext]:
    """A short-lived client connection (no reconnects: a test wants to see failures)."""
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3, name="test-stream-reader")
    try:
        yield nc.jetstream(timeout=10)
    finally:
        await nc.close()


async def subject_message_count(js: JetStreamContext, subject: str) -> int:
    try:
        info = await js.stream_info(STREAM_NAME, subjects_filter=subject)
    except nats.js.errors.NotFoundError:
        return 0
    return int((info.state.subjects or {}).get(subject, 0))


async def stream_message_count(url: str) -> int:
    """Messages in the whole AGENT_CHANGES stream (0 if it does not exist yet)."""
    async with jetstream(url) as js:
        try:
            info = await js.stream_info(STREAM_NAME)
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.state.messages)


async def set_max_msg_size(url: str, size: int) -> None:
    """Bound one message of the AGENT_CHANGES stream to `size` bytes (-1: no bound), as an HTPC started with
    `--max-record-bytes` does; the stream is created first (the agent's own config) if it does not exist."""
    async with jetstream(url) as js:
        await ensure_stream(js)
        config = (await js.stream_info(STREAM_NAME)).config
        config.max_msg_size = size
        await js.update_stream(config)


async def _read_subject(
    url: str, agent_id: str, timeout: float
) -> list[tuple[int, str | None, bytes, ChangeRecord | AgentStatusRecord]]:
    """Every message on `agents.<agent_id>.changes`, in stream order: (stream seq, msg id, data, record).

    Uses an ordered (ephemeral, flow-controlled) consumer from the first message and reads until the
    consumer reports nothing pending. Raises if a message is neither a change record nor a status record.
    """
    subject = changes_subject(agent_id)
    out: list[tuple[int, str | None, bytes, ChangeRecord | AgentStatusRecord]] = []
    async with jetstream(url) as js:
        expected = await subject_message_count(js, subject)
        if expected == 0:
            return out
        sub = await js.subscribe(subject, stream=STREAM_NAME, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        try:
            while True:
                msg = await sub.next_msg(timeout=timeout)
                meta = msg.metadata
                record = decode_record(msg.data)
                if not isinstance(record, ChangeRecord | AgentStatusRecord):
                    raise AssertionError(f"stream message {meta.sequence.stream} is not an agent's record")
                headers = msg.headers or {}
                out.append((meta.sequence.stream, headers.get("Nats-Msg-Id"), msg.data, record))
                if len(out) >= expected and meta.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    seqs = [m[0] for m in out]
    if seqs != sorted(set(seqs)):
        raise AssertionError(f"ordered consumer delivered stream sequences out of order: {seqs}")
    return out


async def read_agent_stream(url: str, agent_id: str, timeout: float = 10.0) -> list[StreamMessage]:
    """Every change record on `agents.<agent_id>.changes`, in stream order (status records left out)."""
    return [
        StreamMessage(seq, mid, data, rec)
        for seq, mid, data, rec in await _read_subject(url, agent_id, timeout)
        if isinstance(rec, ChangeRecord)
    ]


async def read_agent_statuses(url: str, agent_id: str, timeout: float = 10.0) -> list[StatusMessage]:
    """Every agent status record on `agents.<agent_id>.changes`, in stream order."""
    return [
        StatusMessage(seq, mid, rec)
        for seq, mid, _data, rec in await _read_subject(url, agent_id, timeout)
        if isinstance(rec, AgentStatusRecord)
    ]


async def publish_raw(url: str, subject: str, payload: bytes, message_id: str) -> PubAck:
    """Publish bytes by hand with a Nats-Msg-Id header (to probe JetStream dedup)."""
    async with jetstream(url) as js:
        return await js.publish(subject, payload, headers={"Nats-Msg-Id": message_id}, timeout=10)


def flatten(messages: Iterable[StreamMessage]) -> list[Change]:
    """All changes of all records, in stream order, values decoded."""
    out: list[Change] = []
    for index, message in enumerate(messages):
        record = message.record
        for seq, op, layout_id, values in record.changes:
            layout = RESYNC_LAYOUT if op == "R" else record.layouts[str(layout_id)]
            decoded = [decode_value(v) for v in values] if op in ("U", "D") else list(values)
            out.append(Change(seq, op, layout, decoded, index))
    return out


def msg_id_secret(db_path: Path) -> bytes:
    """The message id secret of an agent database (to check the ids its records went out under)."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return bytes(conn.execute("SELECT key FROM _cr_secret WHERE id = 1").fetchone()[0])
    finally:
        conn.close()


def assert_exactly_once(
    messages: list[StreamMessage], agent_id: str, epoch: str, last_seq: int, *, secret: bytes | None = None
) -> None:
    """Records of `epoch` cover 1..last_seq exactly once, in order, each with a keyed Nats-Msg-Id
    `<agent_id>:<32 hex>` (with `secret`, exactly msg_id() of its range)."""
    mine = [m for m in messages if m.record.epoch == epoch]
    seen: list[int] = []
    shape = re.compile(re.escape(agent_id) + ":[0-9a-f]{32}")
    for m in mine:
        rec = m.record
        assert rec.agent_id == agent_id, f"record of agent {rec.agent_id!r} on {agent_id!r}'s subject"
        assert m.msg_id is not None and shape.fullmatch(m.msg_id), f"stream seq {m.stream_seq}: id {m.msg_id!r}"
        if secret is not None:
            assert m.msg_id == msg_id(agent_id, epoch, rec.first_seq, rec.last_seq, secret=secret), (
                f"stream seq {m.stream_seq}: Nats-Msg-Id {m.msg_id!r} does not name {rec.first_seq}-{rec.last_seq}"
            )
        seen.extend(seq for seq, _op, _lid, _vals in rec.changes)
    duplicates = sorted({s for s in seen if seen.count(s) > 1}) if len(seen) != len(set(seen)) else []
    assert not duplicates, f"change sequences published twice: {duplicates[:20]}"
    breaks = [
        f"stream #{b.stream_seq} ({b.record.first_seq}-{b.record.last_seq}) after "
        f"#{a.stream_seq} ({a.record.first_seq}-{a.record.last_seq})"
        for a, b in itertools.pairwise(mine)
        if b.record.first_seq != a.record.last_seq + 1
    ]
    assert not breaks, f"records out of order on the stream ({len(mine)} records): {'; '.join(breaks[:10])}"
    assert seen == list(range(1, last_seq + 1)), (
        f"stream holds {len(seen)} changes ({seen[:3]}..{seen[-3:]}), expected exactly 1..{last_seq}"
    )


def same_value(a: object, b: object) -> bool:
    """Equal with the same Python type; floats compared bit-for-bit in sign (so 0.0 != -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return a == b


def replay(changes: Iterable[Change]) -> dict[str, dict[tuple[Any, ...], dict[str, SQLiteValue]]]:
    """Apply changes as the HTPC would: R starts over (a resync), S recreates a table empty, U upserts,
    D deletes, X forgets."""
    tables: dict[str, dict[tuple[Any, ...], dict[str, SQLiteValue]]] = {}
    for ch in changes:
        layout = ch.layout
        if ch.op == "R":
            tables.clear()
        elif ch.op == "S":
            tables[layout.table] = {}
        elif ch.op == "X":
            tables.pop(layout.table, None)
        elif ch.op == "U":
            row = dict(zip(layout.columns, ch.values, strict=True))
            key = tuple(_key_part(row[c]) for c in layout.pk)
            tables.setdefault(layout.table, {})[key] = row
        elif ch.op == "D":
            key = tuple(_key_part(v) for v in ch.values)
            tables.get(layout.table, {}).pop(key, None)
    return tables


def _key_part(value: SQLiteValue) -> Any:
    # Keys are compared by type and value, so 1 and 1.0 (or 0.0 and -0.0) stay distinct.
    return (type(value).__name__, value)


def local_rows(db_path: Path, table: str) -> dict[tuple[Any, ...], dict[str, SQLiteValue]]:
    """A table of the agent's SQLite file, keyed like replay() (read with a separate connection)."""
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        cols = conn.execute("SELECT name, pk FROM pragma_table_info(?)", (table,)).fetchall()
        names = [str(c[0]) for c in cols]
        pk = [str(c[0]) for c in sorted((c for c in cols if c[1] > 0), key=lambda c: int(c[1]))]
        quoted = ", ".join(f'"{n}"' for n in names)
        out: dict[tuple[Any, ...], dict[str, SQLiteValue]] = {}
        for values in conn.execute(f'SELECT {quoted} FROM "{table}"'):
            row = dict(zip(names, values, strict=True))
            out[tuple(_key_part(row[c]) for c in pk)] = row
        return out
    finally:
        conn.close()


def assert_rows_identical(
    replicated: dict[tuple[Any, ...], dict[str, SQLiteValue]], local: dict[tuple[Any, ...], dict[str, SQLiteValue]]
) -> None:
    assert replicated.keys() == local.keys(), (
        f"keys differ: only on stream {sorted(replicated.keys() - local.keys(), key=repr)[:5]}, "
        f"only local {sorted(local.keys() - replicated.keys(), key=repr)[:5]}"
    )
    for key, row in local.items():
        other = replicated[key]
        assert other.keys() == row.keys(), f"row {key}: columns {sorted(other)} != {sorted(row)}"
        for col, value in row.items():
            assert same_value(other[col], value), (
                f"row {key} column {col}: stream has {other[col]!r} ({type(other[col]).__name__}), "
                f"local has {value!r} ({type(value).__name__})"
            )


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> None:
    """Poll an (async or sync) predicate until true, failing after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def storage(tmp_path: Path, url: str | None, agent_id: str = "agent-1", **kwargs: Any) -> AgentStorage:
    """An AgentStorage on `tmp_path/agents` (not yet opened; use `async with`)."""
    return AgentStorage(agent_id, tmp_path / "agents", nats_url=url, **kwargs)


async def create_tables(st: AgentStorage, *ddl: str, always: Iterable[str] = ()) -> None:
    """Run DDL in one local transaction, then declare the given tables `always`."""
    async with st.transaction() as tx:
        for statement in ddl:
            await tx.execute(statement)
    for table in always:
        await st.set_visibility(table, "always")


def changes_of(messages: Iterable[StreamMessage], table: str) -> list[Change]:
    return [c for c in flatten(messages) if c.table == table]
