"""The wire contract: change records on `agents.<agent_id>.changes`.

Defined once here and imported by the replicator, so both ends can never
disagree about a field. A record carries a run of consecutive change sequence
numbers of one agent database (`epoch`); the replicator applies it in one
central transaction. Values keep their SQLite storage class exactly: JSON
numbers, strings and null carry INTEGER, REAL, TEXT and NULL, and the three
things JSON cannot say are tagged objects: BLOBs `{"b": base64}`, non-finite
REALs `{"f": "inf"|"-inf"|"nan"}` and TEXT whose bytes are not UTF-8
`{"t": base64}` (see `InvalidText`).

Three kinds of record share the agents' subjects: `changes` (a run of an
agent's changes, `ChangeRecord`), `relay` (rows written through the HTTP relay,
`RelayRecord`) and `status` (what an agent's publisher reports about itself,
`AgentStatusRecord`; never sequenced).

This module is the only place that knows the layout of a record: the
publisher builds its bytes with `change_json`, `layout_json` and
`change_record_bytes`, the replicator reads them with `decode_record` and
`decode_values`, and every message id is made by `msg_id`/`status_msg_id`/`relay_msg_id` (keyed: see there).
`sqlite_text` is the text factory every reader of agent data uses, so TEXT
that is not UTF-8 is read as `InvalidText` instead of failing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

from .agent_id import AGENT_ID_PATTERN
from .errors import RecordDecodeError
from .identifiers import is_valid_identifier

RECORD_VERSION: Literal[1] = 1

#: Change operations. U: upsert the full row image; D: delete by primary key;
#: S: (re)create the table empty from `sql` (a snapshot's rows follow);
#: X: the table is no longer replicated, drop the central copy;
#: V: announce a non-replicated table's visibility (values = [visibility]);
#: R: resync: everything before this change is replaced by the snapshot that follows (S + U ... V ...),
#: values = [request_id]; its layout id is 0 and need not be in `layouts`. Only ever the first change of a record.
Op = Literal["U", "D", "S", "X", "V", "R"]

#: The layout id of an R change (it names no table).
RESYNC_LAYOUT_ID = 0
#: A resync request id: 32 lowercase hex characters.
RESYNC_REQUEST_ID_PATTERN = r"^[0-9a-f]{32}$"

#: The range of SQLite's INTEGER storage class.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

SQLiteValue = int | float | str | bytes | None

_INF = math.inf


class InvalidText(bytes):
    """TEXT whose bytes are not UTF-8.

    SQLite stores such a value without complaint, but Python's sqlite3 cannot
    decode it into a `str`; its bytes travel as they are, tagged so the other
    end knows the storage class is TEXT and not BLOB.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"InvalidText({bytes(self)!r})"


def sqlite_text(data: bytes) -> str | InvalidText:
    """The text factory of every connection that reads agent data: `str` for UTF-8, else `InvalidText`.

    Python's default factory raises "Could not decode to UTF-8" for TEXT that is not UTF-8, which made such a
    value impossible to read, publish or query; with this one it travels as `{"t": base64}`.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return InvalidText(data)


def fetch_all_text(conn: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """All rows of `sql`, TEXT decoded by Python's own (fast) factory; read again with `sqlite_text` (InvalidText
    for TEXT that is not UTF-8) only when a value needs it, so a hot path keeps its speed."""
    factory = conn.text_factory
    conn.text_factory = str
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "Could not decode to UTF-8" not in str(exc):
            raise
    finally:
        conn.text_factory = factory
    conn.text_factory = sqlite_text
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.text_factory = factory


class TableLayout(BaseModel):
    """Column layout of a replicated table at the time of a change."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    table: StrictStr
    columns: list[StrictStr]
    pk: list[StrictStr]
    #: declared column types (affinity); the HTPC mirrors them, constraints stay with the agent
    types: list[StrictStr] = []
    sql: StrictStr | None = None
    visibility: Literal["always", "on_demand", "private"] = "always"

    @model_validator(mode="after")
    def _check(self) -> TableLayout:
        if not is_valid_identifier(self.table):
            raise ValueError(f"invalid table name {self.table!r}")
        for col in self.columns:
            if not is_valid_identifier(col):
                raise ValueError(f"invalid column name {col!r}")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("duplicate column names")
        if not set(self.pk) <= set(self.columns):
            raise ValueError("primary key columns must be columns")
        if self.types and len(self.types) != len(self.columns):
            raise ValueError("types must match columns")
        return self


class ChangeRecord(BaseModel):
    """A run of changes `first_seq..last_seq` from one agent database.

    `final` is False only for a part of a local transaction too large for one
    message: the replicator holds its central transaction open until the part
    with `final=True` arrives, so the transaction still lands all at once.
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = RECORD_VERSION
    kind: Literal["changes"] = "changes"
    agent_id: str = Field(pattern=f"^{AGENT_ID_PATTERN}$")
    epoch: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    first_seq: StrictInt = Field(ge=1)
    last_seq: StrictInt = Field(ge=1)
    final: StrictBool = True
    committed_at: float | None = None
    layouts: dict[str, TableLayout]
    changes: list[tuple[StrictInt, Op, StrictInt, list[Any]]]

    @model_validator(mode="after")
    def _check(self) -> ChangeRecord:
        if self.last_seq < self.first_seq:
            raise ValueError("last_seq < first_seq")
        if len(self.changes) != self.last_seq - self.first_seq + 1:
            raise ValueError("changes do not cover first_seq..last_seq exactly")
        expected = self.first_seq
        for seq, op, layout_id, values in self.changes:
            if seq != expected:
                raise ValueError(f"change sequence {seq} out of order (expected {expected})")
            expected += 1
            if op == "R":
                _check_resync_change(seq, layout_id, values, first=seq == self.first_seq)
                continue
            layout = self.layouts.get(str(layout_id))
            if layout is None:
                raise ValueError(f"change {seq} names unknown layout {layout_id}")
            if op == "U" and len(values) != len(layout.columns):
                raise ValueError(f"change {seq}: row has {len(values)} values, layout has {len(layout.columns)}")
            if op == "D" and len(values) != len(layout.pk):
                raise ValueError(f"change {seq}: key has {len(values)} values, primary key {len(layout.pk)}")
            if op == "S" and not layout.sql:
                raise ValueError(f"change {seq}: schema change without sql")
        return self

    @property
    def resync_request(self) -> str | None:
        """The request id when this is a resync record (its first change is R), else None."""
        if self.changes and self.changes[0][1] == "R":
            request_id = self.changes[0][3][0]
            return str(request_id)
        return None


def _check_resync_change(seq: int, layout_id: int, values: list[Any], *, first: bool) -> None:
    if not first:
        raise ValueError(f"change {seq}: a resync (R) must be the first change of its record")
    if layout_id != RESYNC_LAYOUT_ID:
        raise ValueError(f"change {seq}: a resync (R) has layout {RESYNC_LAYOUT_ID}, not {layout_id}")
    if len(values) != 1 or not isinstance(values[0], str) or not re.fullmatch(RESYNC_REQUEST_ID_PATTERN, values[0]):
        raise ValueError(f"change {seq}: a resync (R) carries exactly its request id (32 lowercase hex)")


class RelayRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table: StrictStr
    data: dict[str, Any]


class RelayRecord(BaseModel):
    """Rows written through the HTTP relay by agents that only speak HTTP.

    They have no local change log, so they carry no sequence numbers; the
    replicator applies them in stream order, each record in one transaction.
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = RECORD_VERSION
    kind: Literal["relay"] = "relay"
    agent_id: str = Field(pattern=f"^{AGENT_ID_PATTERN}$")
    timestamp: float | None = None
    rows: list[RelayRow] = Field(min_length=1)


class AgentStatusRecord(BaseModel):
    """What an agent's publisher reports about itself (kind `status`, on the agent's changes subject).

    Sent after it (re)connects, whenever `blocked` changes and every 30 s while it has a backlog or is blocked.
    Never sequenced: the HTPC keeps the newest one per agent (lag against what exists, and why it is stuck).
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = RECORD_VERSION
    kind: Literal["status"] = "status"
    agent_id: str = Field(pattern=f"^{AGENT_ID_PATTERN}$")
    epoch: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    #: the newest committed change sequence of the agent's database
    last_seq: StrictInt = Field(ge=0)
    #: the newest sequence JetStream acknowledged
    acked_seq: StrictInt = Field(ge=0)
    #: why the publisher cannot send (None while it can)
    blocked: StrictStr | None = None
    #: bytes the local change log takes on disk
    log_bytes: StrictInt = Field(ge=0)
    #: when the agent made this report (unix time)
    at: float


AnyRecord = ChangeRecord | RelayRecord | AgentStatusRecord


def encode_value(value: SQLiteValue) -> Any:
    """SQLite value -> JSON-able value (tags only where JSON cannot carry it)."""
    if isinstance(value, InvalidText):
        return {"t": base64.b64encode(value).decode("ascii")}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return {"f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    return value


def decode_value(value: Any) -> SQLiteValue:
    """JSON value -> SQLite value; raises ValueError on anything that is not one."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise ValueError("booleans are not SQLite values")
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"integer {value} does not fit in 64 bits")
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, dict) and len(value) == 1:
        if "b" in value and isinstance(value["b"], str):
            try:
                return base64.b64decode(value["b"], validate=True)
            except ValueError as exc:
                raise ValueError(f"bad base64 blob: {exc}") from None
        if "f" in value and value["f"] in ("inf", "-inf", "nan"):
            return float(value["f"])
        if "t" in value and isinstance(value["t"], str):
            try:
                return InvalidText(base64.b64decode(value["t"], validate=True))
            except ValueError as exc:
                raise ValueError(f"bad base64 text: {exc}") from None
    raise ValueError(f"not a SQLite value: {value!r}")


def encode_values(values: Iterable[SQLiteValue]) -> list[Any]:
    """A row of SQLite values -> its wire form; the values themselves (as a list) when none needs a tag.

    The common row (integers, finite REALs, text, NULL) is checked once and not copied value by value.
    """
    out = list(values)
    for v in out:
        t = type(v)
        if t is float:
            if v == _INF or v == -_INF or v != v:
                return [encode_value(x) for x in out]
        elif t is not int and t is not str and v is not None:
            return [encode_value(x) for x in out]
    return out


def decode_values(values: list[Any]) -> list[SQLiteValue]:
    """A wire row -> SQLite values; returns `values` itself when nothing in it is tagged (the common case).

    Raises ValueError like decode_value.
    """
    for v in values:
        t = type(v)
        if t is dict or t is bool or t is list or (t is int and not INT64_MIN <= v <= INT64_MAX):
            return [decode_value(x) for x in values]
    return values


def encode_record(record: AnyRecord) -> bytes:
    if isinstance(record, AgentStatusRecord):  # `blocked: null` says "not blocked" in so many words
        return orjson.dumps(record.model_dump())
    return orjson.dumps(record.model_dump(exclude_none=True))


def decode_record(data: bytes) -> AnyRecord:
    """Parse and validate a record; values inside stay wire-encoded (see decode_value)."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise RecordDecodeError(f"record is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RecordDecodeError("record is not a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != RECORD_VERSION:  # `true` and `1.0` equal 1 in Python
        raise RecordDecodeError(f"unknown record version {version!r} (this build reads {RECORD_VERSION})")
    kind = obj.get("kind", "changes")
    if kind == "changes":
        fast = _fast_change_record(obj)
        if fast is not None:
            return fast
    try:
        if kind == "changes":
            return ChangeRecord.model_validate(obj)
        if kind == "relay":
            return RelayRecord.model_validate(obj)
        if kind == "status":
            return AgentStatusRecord.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise RecordDecodeError(f"invalid {kind} record: {where}: {first.get('msg')}") from None
    raise RecordDecodeError(f"unknown record kind {kind!r}")


# ---------------------------------------------------------------- the fast path of decode_record
# A change record is what the HTPC reads most (pydantic's validation was a quarter of its apply time). The fast
# path accepts only a record whose every field has exactly the JSON type the model wants and passes every check
# of the model; anything else, odd or wrong, goes the model's way, which then accepts it or says what is wrong.
# So it can only be faster, never more lenient: what it builds is what `ChangeRecord.model_validate` would.

_CHANGE_FIELDS = frozenset(ChangeRecord.model_fields)
_LAYOUT_FIELDS = frozenset(TableLayout.model_fields)
_CHANGE_REQUIRED = frozenset(("agent_id", "epoch", "first_seq", "last_seq", "layouts", "changes"))
_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)
_EPOCH_RE = re.compile(r"[0-9a-f]{8,64}")
_OPS = frozenset(("U", "D", "S", "X", "V", "R"))
_VISIBILITIES = frozenset(("always", "on_demand", "private"))
_FAST_INT_BOUND = 2**63  # StrictInt takes bigger ones too: those go the model's way
_FAST_FLOAT_INT_BOUND = 2**53  # an integer for a float field: only where float() is exact
#: Layouts already validated (a layout repeats in every record of its table): its JSON -> the frozen model.
_LAYOUT_CACHE: dict[bytes, TableLayout] = {}
_LAYOUT_CACHE_MAX = 4096
_M = TypeVar("_M", bound=BaseModel)


def _str_list(value: Any) -> bool:
    return type(value) is list and all(type(x) is str for x in value)


def _fast_layout(raw: Any) -> TableLayout | None:
    """The layout as TableLayout would validate it, or None to let the model judge it."""
    if type(raw) is not dict:
        return None
    try:
        key = orjson.dumps(raw)  # the same JSON text: the same layout, validated before
    except orjson.JSONEncodeError:  # e.g. an integer over 64 bits (not from orjson.loads, but from a caller)
        return None
    cached = _LAYOUT_CACHE.get(key)
    if cached is not None:
        return cached
    if not raw.keys() <= _LAYOUT_FIELDS:
        return None
    table: Any = raw.get("table")
    columns: Any = raw.get("columns")
    pk: Any = raw.get("pk")
    types: Any = raw.get("types", [])
    sql = raw.get("sql")
    visibility = raw.get("visibility", "always")
    if type(table) is not str or not _str_list(columns) or not _str_list(pk) or not _str_list(types):
        return None
    if (sql is not None and type(sql) is not str) or type(visibility) is not str or visibility not in _VISIBILITIES:
        return None
    if (
        not is_valid_identifier(table)
        or not all(is_valid_identifier(c) for c in columns)
        or len(set(columns)) != len(columns)
        or not set(pk) <= set(columns)
        or (types and len(types) != len(columns))
    ):
        return None
    layout = _built(
        TableLayout,
        set(raw),
        {"table": table, "columns": columns, "pk": pk, "types": types, "sql": sql, "visibility": visibility},
    )
    if len(_LAYOUT_CACHE) >= _LAYOUT_CACHE_MAX:
        _LAYOUT_CACHE.clear()
    _LAYOUT_CACHE[key] = layout
    return layout


def _fast_int(value: Any) -> bool:
    return type(value) is int and -_FAST_INT_BOUND < value < _FAST_INT_BOUND


def _fast_change_record(obj: dict[str, Any]) -> ChangeRecord | None:
    """The record as ChangeRecord would validate it, or None to let the model judge it (see above)."""
    keys = obj.keys()
    if not keys <= _CHANGE_FIELDS or not keys >= _CHANGE_REQUIRED:
        return None
    version, kind = obj.get("v", RECORD_VERSION), obj.get("kind", "changes")
    if type(version) is not int or version != RECORD_VERSION or type(kind) is not str or kind != "changes":
        return None
    agent_id, epoch = obj["agent_id"], obj["epoch"]
    first_seq, last_seq = obj["first_seq"], obj["last_seq"]
    final = obj.get("final", True)
    committed_at = obj.get("committed_at")
    raw_layouts, raw_changes = obj["layouts"], obj["changes"]
    if type(agent_id) is not str or _AGENT_ID_RE.fullmatch(agent_id) is None:
        return None
    if type(epoch) is not str or _EPOCH_RE.fullmatch(epoch) is None:
        return None
    if not _fast_int(first_seq) or not _fast_int(last_seq) or first_seq < 1 or last_seq < first_seq:
        return None
    if type(final) is not bool:
        return None
    if committed_at is not None:
        if type(committed_at) is int and -_FAST_FLOAT_INT_BOUND < committed_at < _FAST_FLOAT_INT_BOUND:
            committed_at = float(committed_at)
        elif type(committed_at) is not float:
            return None
    if type(raw_layouts) is not dict or type(raw_changes) is not list:
        return None
    if len(raw_changes) != last_seq - first_seq + 1:
        return None
    layouts: dict[str, TableLayout] = {}
    for lid, raw in raw_layouts.items():
        layout = _fast_layout(raw)
        if layout is None:
            return None
        layouts[lid] = layout
    changes: list[tuple[int, Any, int, list[Any]]] = []
    expected = first_seq
    row_layout, row_width = None, -1  # the layout id of the last row upserted and its width
    for change in raw_changes:
        if type(change) is not list or len(change) != 4:
            return None
        seq, op, layout_id, values = change
        if seq != expected or type(seq) is not int or type(values) is not list:
            return None
        expected += 1
        if op == "U" and layout_id == row_layout and type(layout_id) is int:  # the common run of rows
            if len(values) != row_width:
                return None
            changes.append((seq, op, layout_id, values))
            continue
        if type(op) is not str or op not in _OPS or not _fast_int(layout_id):
            return None
        if op == "R":
            if seq != first_seq or layout_id != RESYNC_LAYOUT_ID or len(values) != 1:
                return None
            if not isinstance(values[0], str) or not re.fullmatch(RESYNC_REQUEST_ID_PATTERN, values[0]):
                return None
        else:
            layout = layouts.get(str(layout_id))
            if layout is None:
                return None
            if op == "U":
                if len(values) != len(layout.columns):
                    return None
                row_layout, row_width = layout_id, len(layout.columns)
            elif op == "D":
                if len(values) != len(layout.pk):
                    return None
            elif op == "S" and not layout.sql:
                return None
        changes.append((seq, op, layout_id, values))
    fields = _header(agent_id, epoch, first_seq, last_seq, final, committed_at)
    fields["layouts"] = layouts
    fields["changes"] = changes
    return _built(ChangeRecord, set(obj), fields)


def _header(
    agent_id: str, epoch: str, first_seq: int, last_seq: int, final: bool, committed_at: float | None
) -> dict[str, Any]:
    """A change record's fields before `layouts` and `changes`, in wire order: the one place both the fast
    decoder and `change_record_bytes` take them from."""
    return {
        "v": RECORD_VERSION,
        "kind": "changes",
        "agent_id": agent_id,
        "epoch": epoch,
        "first_seq": first_seq,
        "last_seq": last_seq,
        "final": final,
        "committed_at": committed_at,
    }


def _built(model: type[_M], fields_set: set[str], values: dict[str, Any]) -> _M:
    """An instance of `model` holding `values` (every field, already validated), as model_construct makes one
    but without its per-field bookkeeping (a quarter of a one-row record's decoding)."""
    instance = model.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__", fields_set)
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def change_json(seq: int, op: str, layout_id: int, values: Iterable[SQLiteValue]) -> bytes:
    """One change of a record, `[seq, op, layout, values]`, as JSON bytes (values wire-encoded here)."""
    return orjson.dumps([seq, op, layout_id, encode_values(values)])


def layout_json(
    *,
    table: str,
    columns: Sequence[str],
    types: Sequence[str],
    pk: Sequence[str],
    sql: str | None,
    visibility: str,
) -> bytes:
    """A table layout as it appears in a record's `layouts`, as JSON bytes (made once per layout, then reused)."""
    return orjson.dumps(
        {
            "table": table,
            "columns": list(columns),
            "types": list(types),
            "pk": list(pk),
            "sql": sql,
            "visibility": visibility,
        }
    )


def change_record_bytes(
    *,
    agent_id: str,
    epoch: str,
    first_seq: int,
    last_seq: int,
    final: bool,
    committed_at: float,
    layouts_json: Mapping[int, bytes],
    changes_json: Sequence[bytes],
) -> bytes:
    """The bytes of a change record, from layouts (`layout_json`) and changes (`change_json`) already encoded.

    The publisher encodes each change once while it packs records by size; this only joins the parts, so a
    record costs no second serialisation. `decode_record` reads the result.
    """
    header = orjson.dumps(_header(agent_id, epoch, first_seq, last_seq, final, committed_at))
    layouts = b",".join(b'"%d":%s' % (lid, layouts_json[lid]) for lid in sorted(layouts_json))
    return b"".join((header[:-1], b',"layouts":{', layouts, b'},"changes":[', b",".join(changes_json), b"]}"))


#: Hex characters of the MAC in a message id (128 bits): unguessable without the secret.
MSG_ID_MAC_HEX = 32
#: The shortest secret a message id may be keyed with.
MIN_SECRET_BYTES = 16


def _mac(secret: bytes, text: str) -> str:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a message id secret needs at least {MIN_SECRET_BYTES} bytes")
    return hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:MSG_ID_MAC_HEX]


def msg_id(agent_id: str, epoch: str, first_seq: int, last_seq: int, *, secret: bytes, nonce: str | None = None) -> str:
    """The JetStream dedup id of a change record: `<agent_id>:<mac>`.

    `mac` is HMAC-SHA256(secret, "<epoch>:<first>-<last>") in hex, cut to 32 characters; `secret` is the agent
    database's own (change_log.msg_id_secret). The same changes always get the same id, and nobody without the
    secret can compute it (JetStream deduplicates over the whole stream, so a guessable id could be taken by
    another agent first). A `nonce` gives the same changes a fresh id (after a duplicate PubAck nobody earned).
    """
    text = f"{epoch}:{first_seq}-{last_seq}" if nonce is None else f"{epoch}:{first_seq}-{last_seq}:{nonce}"
    return f"{agent_id}:{_mac(secret, text)}"


def status_msg_id(agent_id: str, epoch: str, *, secret: bytes, nonce: str) -> str:
    """The JetStream dedup id of a status record: `<agent_id>:<mac>`, fresh for every report (`nonce`).

    `mac` is HMAC-SHA256(secret, "<epoch>:status:<nonce>"): the agent's own id form (the HTPC accepts only that
    on its subject), never equal to a change record's id, never a duplicate of an earlier report.
    """
    return f"{agent_id}:{_mac(secret, f'{epoch}:status:{nonce}')}"


def relay_msg_id(agent_id: str, idempotency_key: str, *, secret: bytes) -> str:
    """The JetStream dedup id of a relay write: `relay:<agent_id>:<mac>`.

    `mac` is HMAC-SHA256(secret, agent_id + NUL + idempotency_key) in hex, cut to 32 characters; `secret` is
    the HTPC's own. The same Idempotency-Key of the same agent always gets the same id; no agent can compute it.
    """
    return f"relay:{agent_id}:{_mac(secret, agent_id + chr(0) + idempotency_key)}"
