"""The change feed's wire format: what `GET /relay/changes` sends and `subscribe()` reads.

One table of one agent, as the HTPC applies it. A feed message is one JSON
object, either a change or a control message:

- change: `{"op": "insert"|"update"|"delete", "table": t, "key": {pk: v},
  "row": {col: v} | null, "offset": o, "last": bool}`. Values carry the wire
  tags of change records and query answers (`encode_value`: BLOB, non-finite
  REAL, TEXT that is not UTF-8). `row` is the whole row for insert and update,
  null for delete. `offset` is the offset after the change's whole transaction;
  `last` is true on the transaction's final change in this table, so a reader
  applies the changes up to a `last` together (a transaction is never split
  across responses).
- `{"control": "schema", "table", "columns", "types", "pk", "offset"}`: the
  first message of a snapshot (the table as it is now).
- `{"control": "up-to-date", "offset": o}`: everything up to `o` was sent;
  resume from `o`.
- `{"control": "must-refetch", "reason": text}`: the offset cannot be
  continued (the agent's database was replaced, it was resynced, the table's
  schema changed, the offset is unknown or too old): start over from a
  snapshot (no offset).

An offset is `<feed_id>_<n>`: `feed_id` names one continuous history of an
agent's central copy (a new one starts with a new epoch, a resync or a
restore), `n` counts the transactions applied in it. Offsets are opaque to
clients: compare them only for equality.

Over Server-Sent Events each message is one event (`event: change` or
`event: control`, one `data:` line); an `id:` line (the offset) comes only on a
transaction's final change and on `up-to-date`, so an EventSource that
reconnects with `Last-Event-ID` resumes at a transaction boundary.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from .change_record import SQLiteValue, decode_value, encode_value

__all__ = [
    "Change",
    "FeedEvent",
    "FeedOffset",
    "FeedProtocolError",
    "FeedSchema",
    "MustRefetch",
    "UpToDate",
    "decode_feed_message",
    "encode_feed_message",
    "sse_event",
]

FEED_ID_RE = re.compile(r"[0-9a-f]{16}")
_OFFSET_RE = re.compile(r"(?P<feed>[0-9a-f]{16})_(?P<n>0|[1-9][0-9]{0,18})")
ChangeOp = Literal["insert", "update", "delete"]
_OPS: frozenset[str] = frozenset(("insert", "update", "delete"))


class FeedProtocolError(ValueError):
    """A feed message or offset that does not follow this format."""


@dataclass(frozen=True)
class FeedOffset:
    """A position in one agent's feed: `n` transactions into the history named `feed_id`."""

    feed_id: str
    n: int

    @classmethod
    def parse(cls, text: str) -> FeedOffset:
        m = _OFFSET_RE.fullmatch(text)
        if m is None:
            raise FeedProtocolError(f"invalid feed offset {text[:80]!r} (expected <16 hex digits>_<number>)")
        n = int(m["n"])
        if n >= 2**63:
            raise FeedProtocolError(f"invalid feed offset {text[:80]!r} (number too large)")
        return cls(m["feed"], n)

    def __str__(self) -> str:
        return f"{self.feed_id}_{self.n}"


@dataclass(frozen=True)
class Change:
    """One row change of a followed table, in the agent's commit order."""

    op: ChangeOp
    table: str
    key: Mapping[str, SQLiteValue]
    row: Mapping[str, SQLiteValue] | None  # the whole row (insert, update); None for delete
    offset: str  # the offset after this change's transaction
    last: bool  # the final change of its transaction in this table


@dataclass(frozen=True)
class FeedSchema:
    """The table's layout, first in a snapshot."""

    table: str
    columns: tuple[str, ...]
    types: tuple[str, ...]
    pk: tuple[str, ...]
    offset: str  # the snapshot's offset (its rows follow, then up-to-date)


@dataclass(frozen=True)
class UpToDate:
    """Everything up to `offset` was delivered."""

    offset: str


@dataclass(frozen=True)
class MustRefetch:
    """The offset cannot be continued; the feed starts over from a snapshot."""

    reason: str


FeedEvent = Change | FeedSchema | UpToDate | MustRefetch


def encode_feed_message(event: FeedEvent) -> bytes:
    """A feed message as JSON bytes (values of keys and rows given as SQLite values)."""
    if isinstance(event, Change):
        obj: dict[str, Any] = {
            "op": event.op,
            "table": event.table,
            "key": {k: encode_value(v) for k, v in event.key.items()},
            "row": {k: encode_value(v) for k, v in event.row.items()} if event.row is not None else None,
            "offset": event.offset,
            "last": event.last,
        }
    elif isinstance(event, FeedSchema):
        obj = {
            "control": "schema",
            "table": event.table,
            "columns": list(event.columns),
            "types": list(event.types),
            "pk": list(event.pk),
            "offset": event.offset,
        }
    elif isinstance(event, UpToDate):
        obj = {"control": "up-to-date", "offset": event.offset}
    else:
        obj = {"control": "must-refetch", "reason": event.reason}
    return orjson.dumps(obj)


def _values(raw: Any, what: str) -> dict[str, SQLiteValue]:
    if not isinstance(raw, dict):
        raise FeedProtocolError(f"{what} is not an object")
    try:
        return {str(k): decode_value(v) for k, v in raw.items()}
    except ValueError as exc:
        raise FeedProtocolError(f"{what}: {exc}") from None


def _str_tuple(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
        raise FeedProtocolError(f"{what} is not a list of strings")
    return tuple(raw)


def _offset(raw: Any) -> str:
    if not isinstance(raw, str):
        raise FeedProtocolError("offset is not a string")
    FeedOffset.parse(raw)
    return raw


def decode_feed_message(data: bytes | str | Mapping[str, Any]) -> FeedEvent:
    """A feed message (JSON text or an already parsed object) as its typed event; FeedProtocolError if it is
    not one."""
    if isinstance(data, Mapping):
        obj: Any = data
    else:
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise FeedProtocolError("feed message is not JSON") from None
    if not isinstance(obj, dict):
        raise FeedProtocolError("feed message is not an object")
    control = obj.get("control")
    if control is None:
        op = obj.get("op")
        if op not in _OPS:
            raise FeedProtocolError(f"unknown change op {op!r}")
        table = obj.get("table")
        if not isinstance(table, str):
            raise FeedProtocolError("change without a table")
        row_raw = obj.get("row")
        row = _values(row_raw, "row") if row_raw is not None else None
        if (row is None) != (op == "delete"):
            raise FeedProtocolError(f"a {op} change {'needs' if op != 'delete' else 'has no'} row")
        key = _values(obj.get("key"), "key")
        return Change(op, table, key, row, _offset(obj.get("offset")), obj.get("last") is True)
    if control == "up-to-date":
        return UpToDate(_offset(obj.get("offset")))
    if control == "must-refetch":
        return MustRefetch(str(obj.get("reason") or "the offset cannot be continued"))
    if control == "schema":
        table = obj.get("table")
        if not isinstance(table, str):
            raise FeedProtocolError("schema without a table")
        return FeedSchema(
            table,
            _str_tuple(obj.get("columns"), "columns"),
            _str_tuple(obj.get("types"), "types"),
            _str_tuple(obj.get("pk"), "pk"),
            _offset(obj.get("offset")),
        )
    raise FeedProtocolError(f"unknown control message {control!r}")


def sse_event(event: FeedEvent, data: bytes | None = None) -> bytes:
    """One Server-Sent Event for a feed message (`data`: its JSON if already encoded).

    `id:` (the offset) only at a transaction boundary: a change with `last`, and up-to-date.
    """
    body = data if data is not None else encode_feed_message(event)
    kind = b"change" if isinstance(event, Change) else b"control"
    out = b"event: " + kind + b"\ndata: " + body + b"\n"
    if (isinstance(event, Change) and event.last) or isinstance(event, UpToDate):
        out += b"id: " + event.offset.encode("ascii") + b"\n"
    return out + b"\n"
