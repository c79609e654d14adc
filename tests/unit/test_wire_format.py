"""The wire format (agent_client/change_record.py): what the publisher builds, decode_record reads back, exactly."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent_client import (
    INT64_MAX,
    INT64_MIN,
    AgentStatusRecord,
    ChangeRecord,
    InvalidText,
    RecordDecodeError,
    decode_record,
    decode_value,
    decode_values,
    encode_record,
    encode_value,
    msg_id,
    relay_msg_id,
    sqlite_text,
    status_msg_id,
)
from agent_client.change_record import change_json, change_record_bytes, encode_values, layout_json

EPOCH = "0123456789abcdef"
NOTES_SQL = "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, data BLOB, r REAL)"


def same(a: Any, b: Any) -> bool:
    """Equal with the same storage class; nan equals nan and -0.0 differs from 0.0."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return bool(a == b)


def same_row(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def notes_layout() -> bytes:
    return layout_json(
        table="notes",
        columns=("id", "body", "data", "r"),
        types=("INTEGER", "TEXT", "BLOB", "REAL"),
        pk=("id",),
        sql=NOTES_SQL,
        visibility="always",
    )


def record(
    changes: list[tuple[int, str, int, tuple[Any, ...]]], layouts: dict[int, bytes], *, final: bool = True
) -> bytes:
    return change_record_bytes(
        agent_id="agent-7",
        epoch=EPOCH,
        first_seq=changes[0][0],
        last_seq=changes[-1][0],
        final=final,
        committed_at=changes[-1][0] + 0.25,
        layouts_json=layouts,
        changes_json=[change_json(*c) for c in changes],
    )


# --------------------------------------------------------------------------- the bytes themselves

# What the publisher put on the wire before the format moved here (captured from it): the builder must
# keep producing exactly these bytes. (Keying the message ids changed only the Nats-Msg-Id header, not these.)
GOLDEN = (
    b'{"v":1,"kind":"changes","agent_id":"agent-7","epoch":"0123456789abcdef","first_seq":10,"last_seq":15,'
    b'"final":true,"committed_at":1700000000.75,"layouts":{"3":{"table":"notes","columns":["id","body","data","r"],'
    b'"types":["INTEGER","TEXT","BLOB","REAL"],"pk":["id"],'
    b'"sql":"CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, data BLOB, r REAL)","visibility":"always"},'
    b'"5":{"table":"side","columns":["k"],"types":["TEXT"],"pk":["k"],"sql":"CREATE TABLE side (k TEXT PRIMARY KEY)",'
    b'"visibility":"on_demand"}},"changes":[[10,"S",3,[]],'
    b'[11,"U",3,[1,"h\xc3\xa9llo \xe2\x98\x83",{"b":"AAH/"},-0.0]],[12,"U",3,[2,null,null,{"f":"inf"}]],'
    b'[13,"U",3,[-9223372036854775808,"",{"b":""},1.5e+300]],[14,"D",3,[1]],[15,"V",5,["on_demand"]]]}'
)


def test_builder_produces_the_publishers_bytes() -> None:
    side = layout_json(
        table="side", columns=["k"], types=["TEXT"], pk=["k"], sql="CREATE TABLE side (k TEXT PRIMARY KEY)",
        visibility="on_demand",
    )  # fmt: skip
    changes = [
        change_json(10, "S", 3, ()),
        change_json(11, "U", 3, (1, "héllo \u2603", b"\x00\x01\xff", -0.0)),
        change_json(12, "U", 3, (2, None, None, math.inf)),
        change_json(13, "U", 3, (INT64_MIN, "", b"", 1.5e300)),
        change_json(14, "D", 3, (1,)),
        change_json(15, "V", 5, ("on_demand",)),
    ]
    payload = change_record_bytes(
        agent_id="agent-7",
        epoch=EPOCH,
        first_seq=10,
        last_seq=15,
        final=True,
        committed_at=1700000000.75,
        layouts_json={5: side, 3: notes_layout()},  # any order in: ascending layout ids out
        changes_json=changes,
    )
    assert payload == GOLDEN
    rec = decode_record(payload)
    assert isinstance(rec, ChangeRecord)
    assert [c[0] for c in rec.changes] == list(range(10, 16))


def test_final_false_and_layout_fields_survive() -> None:
    rec = decode_record(record([(4, "U", 7, (1, "a", None, 0.5))], {7: notes_layout()}, final=False))
    assert isinstance(rec, ChangeRecord)
    assert rec.final is False
    assert (rec.first_seq, rec.last_seq, rec.committed_at) == (4, 4, 4.25)
    layout = rec.layouts["7"]
    assert (layout.table, layout.columns, layout.types, layout.pk) == (
        "notes",
        ["id", "body", "data", "r"],
        ["INTEGER", "TEXT", "BLOB", "REAL"],
        ["id"],
    )
    assert (layout.sql, layout.visibility) == (NOTES_SQL, "always")


# --------------------------------------------------------------------------- round trip, every storage class

invalid_text = st.tuples(st.binary(max_size=20), st.binary(max_size=20)).map(
    lambda p: InvalidText(p[0] + b"\xff" + p[1])  # 0xff never occurs in UTF-8
)
sqlite_values = st.one_of(
    st.none(),
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, 0, -1, 2**53 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    st.sampled_from(["", "é", "☃", "𝄞", "\x00", '"\\', '{"b": "AA=="}']),
    st.binary(max_size=40),
    invalid_text,
)


@given(
    rows=st.integers(1, 6).flatmap(
        lambda w: st.lists(st.lists(sqlite_values, min_size=w, max_size=w), min_size=1, max_size=8)
    )
)
def test_every_sqlite_value_round_trips_through_a_record(rows: list[list[Any]]) -> None:
    width = len(rows[0])
    columns = [f"c{i}" for i in range(width)]
    layout = layout_json(table="t", columns=columns, types=[""] * width, pk=["c0"], sql="CREATE TABLE t (...)",
                         visibility="always")  # fmt: skip
    changes = [(100 + i, "U", 2, tuple(row)) for i, row in enumerate(rows)]
    changes.append((100 + len(rows), "D", 2, (rows[0][0],)))
    rec = decode_record(record(changes, {2: layout}))
    assert isinstance(rec, ChangeRecord)
    decoded = [decode_values(values) for _seq, _op, _lid, values in rec.changes]
    for (seq, op, _lid, sent), (got_seq, got_op, got_lid, _), got in zip(changes, rec.changes, decoded, strict=True):
        assert (got_seq, got_op, got_lid) == (seq, op, 2)
        assert same_row(got, list(sent)), (sent, got)


@given(st.lists(sqlite_values, max_size=12))
def test_fast_path_encodes_like_value_by_value(row: list[Any]) -> None:
    assert orjson.dumps(encode_values(row)) == orjson.dumps([encode_value(v) for v in row])
    assert same_row(decode_values(orjson.loads(orjson.dumps(encode_values(row)))), row)


def test_plain_rows_are_not_tagged_and_decode_to_themselves() -> None:
    row: list[Any] = [1, "x", None, 2.5]
    assert encode_values(row) == row
    wire = orjson.loads(orjson.dumps(row))
    assert decode_values(wire) is wire


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (b"\x00\xff", {"b": "AP8="}),
        (InvalidText(b"caf\xe9"), {"t": "Y2Fm6Q=="}),
        (math.inf, {"f": "inf"}),
        (-math.inf, {"f": "-inf"}),
        (INT64_MAX, INT64_MAX),
        ("é", "é"),
    ],
)
def test_tags(value: Any, wire: Any) -> None:
    assert encode_value(value) == wire
    assert same(decode_value(wire), value)


def test_invalid_text_is_text_not_a_blob() -> None:
    got = decode_value({"t": "/w=="})
    assert type(got) is InvalidText and got == b"\xff"
    assert type(decode_value({"b": "/w=="})) is bytes


# --------------------------------------------------------------------------- malformed input


def header(**override: Any) -> dict[str, Any]:
    obj: dict[str, Any] = orjson.loads(record([(1, "U", 1, (1, "a", None, 0.5))], {1: notes_layout()}))
    obj.update(override)
    return obj


@pytest.mark.parametrize(
    "payload",
    [b"", b"{not json", b"[1, 2]", b'"v"', b"\xff\xfe", b'{"v": 1, "kind": "changes"'],
    ids=["empty", "bad-json", "array", "string", "not-utf8", "truncated"],
)
def test_bad_json_is_a_decode_error(payload: bytes) -> None:
    with pytest.raises(RecordDecodeError):
        decode_record(payload)


@pytest.mark.parametrize("version", [2, 0, "1", True, 1.0, None, [1]])
def test_unknown_version_is_a_decode_error(version: Any) -> None:
    with pytest.raises(RecordDecodeError, match="version"):
        decode_record(orjson.dumps(header(v=version)))


def test_missing_version_is_a_decode_error() -> None:
    obj = header()
    del obj["v"]
    with pytest.raises(RecordDecodeError, match="version"):
        decode_record(orjson.dumps(obj))


@pytest.mark.parametrize(
    "override",
    [
        {"kind": "other"},
        {"agent_id": "Bad Id"},
        {"epoch": "xyz"},
        {"first_seq": 0},
        {"last_seq": 5},
        {"final": "yes"},
        {"changes": [[1, "U", 9, [1, "a", None, 0.5]]]},
        {"changes": [[1, "Q", 1, [1]]]},
        {"changes": [[1, "U", 1, [1]]]},
        {"layouts": {"1": {"table": "_cr_log", "columns": ["id"], "pk": ["id"]}}},
    ],
    ids=["kind", "agent", "epoch", "first0", "range", "final", "layout", "op", "width", "table-name"],
)
def test_bad_shape_is_a_decode_error(override: dict[str, Any]) -> None:
    with pytest.raises(RecordDecodeError):
        decode_record(orjson.dumps(header(**override)))


@pytest.mark.parametrize(
    "bad",
    [
        2**63,
        -(2**63) - 1,
        True,
        [1],
        {"b": "not base64!"},
        {"t": "not base64!"},
        {"b": 1},
        {"t": None},
        {"f": "infinity"},
        {"x": "AA=="},
        {"b": "AA==", "t": "AA=="},
        {},
    ],
    ids=["int-high", "int-low", "bool", "list", "bad-b64", "bad-t64", "b-int", "t-null", "f-word", "x-tag",
         "two-tags", "empty-tag"],
)  # fmt: skip
def test_a_value_that_is_not_a_sqlite_value_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError):
        decode_value(bad)
    with pytest.raises(ValueError):
        decode_values([1, "ok", bad])


def test_out_of_range_integer_in_a_record_is_refused_when_its_values_are_read() -> None:
    payload = header(changes=[[1, "U", 1, [2**63, "a", None, 0.5]]])
    rec = decode_record(orjson.dumps(payload))
    assert isinstance(rec, ChangeRecord)
    with pytest.raises(ValueError, match="64 bits"):
        decode_values(rec.changes[0][3])


# --------------------------------------------------------------------------- message ids


SECRET = bytes(range(32))


def test_msg_ids_are_keyed_and_stable() -> None:
    """The contract the HTPC checks: `<agent>:<mac>`, mac = HMAC-SHA256(secret, "<epoch>:<first>-<last>")[:32]."""
    mid = msg_id("agent-7", EPOCH, 10, 15, secret=SECRET)
    assert mid == "agent-7:341839642e7ca1db793bfeed30a728e6"  # pinned: a change here breaks every retransmit
    assert mid == "agent-7:" + hmac.new(SECRET, f"{EPOCH}:10-15".encode(), hashlib.sha256).hexdigest()[:32]
    assert mid == msg_id("agent-7", EPOCH, 10, 15, secret=SECRET)
    assert mid != msg_id("agent-7", EPOCH, 10, 16, secret=SECRET)
    assert mid != msg_id("agent-7", "fedcba9876543210", 10, 15, secret=SECRET)
    assert mid != msg_id("agent-7", EPOCH, 10, 15, secret=bytes(32))  # another database, another id
    assert EPOCH not in mid and "10-15" not in mid  # nothing an onlooker could predict


def test_a_nonce_gives_the_same_changes_a_fresh_id() -> None:
    plain = msg_id("agent-7", EPOCH, 10, 15, secret=SECRET)
    fresh = msg_id("agent-7", EPOCH, 10, 15, secret=SECRET, nonce="n1")
    assert fresh.startswith("agent-7:") and len(fresh) == len(plain) and fresh != plain
    assert fresh == msg_id("agent-7", EPOCH, 10, 15, secret=SECRET, nonce="n1")
    assert fresh != msg_id("agent-7", EPOCH, 10, 15, secret=SECRET, nonce="n2")


def test_relay_msg_ids_are_keyed_and_stable() -> None:
    """`relay:<agent>:<mac>`, mac = HMAC-SHA256(secret, agent + NUL + Idempotency-Key)[:32]."""
    rid = relay_msg_id("agent-7", "key-1", secret=SECRET)
    assert rid == "relay:agent-7:c4108e71feafaa33e61973d9baac128c"
    assert rid == "relay:agent-7:" + hmac.new(SECRET, b"agent-7\x00key-1", hashlib.sha256).hexdigest()[:32]
    assert rid == relay_msg_id("agent-7", "key-1", secret=SECRET)
    assert rid != relay_msg_id("agent-8", "key-1", secret=SECRET)
    assert rid != relay_msg_id("agent-7", "key-2", secret=SECRET)
    assert "key-1" not in rid
    # the NUL keeps (agent, key) pairs apart (an agent id has no NUL): ("ab", "c") and ("a", "bc") differ
    assert relay_msg_id("ab", "c", secret=SECRET).split(":")[2] != relay_msg_id("a", "bc", secret=SECRET).split(":")[2]


@pytest.mark.parametrize("secret", [b"", b"short"])
def test_message_ids_need_a_real_secret(secret: bytes) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        msg_id("agent-7", EPOCH, 1, 1, secret=secret)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        relay_msg_id("agent-7", "k", secret=secret)


# --------------------------------------------------------------------------- resync (R) and status records

REQUEST_ID = "0123456789abcdef0123456789abcdef"


def resync_record(changes: list[tuple[int, str, int, tuple[Any, ...]]]) -> bytes:
    return record(changes, {1: notes_layout()})


def test_a_record_starting_with_r_is_a_resync_record() -> None:
    data = resync_record([(7, "R", 0, (REQUEST_ID,)), (8, "S", 1, ()), (9, "U", 1, (1, "a", None, 0.5))])
    rec = decode_record(data)
    assert isinstance(rec, ChangeRecord)
    assert rec.resync_request == REQUEST_ID
    assert "0" not in rec.layouts  # an R names no table: layout 0 need not be in `layouts`
    plain = decode_record(resync_record([(8, "S", 1, ()), (9, "U", 1, (1, "a", None, 0.5))]))
    assert isinstance(plain, ChangeRecord) and plain.resync_request is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ([(7, "S", 1, ()), (8, "R", 0, (REQUEST_ID,))], "must be the first change"),
        ([(7, "R", 1, (REQUEST_ID,))], "has layout 0"),
        ([(7, "R", 0, ())], "exactly its request id"),
        ([(7, "R", 0, (REQUEST_ID, "x"))], "exactly its request id"),
        ([(7, "R", 0, (REQUEST_ID.upper(),))], "exactly its request id"),
        ([(7, "R", 0, (12,))], "exactly its request id"),
    ],
)
def test_malformed_resync_changes_are_rejected(
    changes: list[tuple[int, str, int, tuple[Any, ...]]], message: str
) -> None:
    with pytest.raises(RecordDecodeError, match=message):
        decode_record(resync_record(changes))


def status(**override: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "v": 1,
        "kind": "status",
        "agent_id": "agent-7",
        "epoch": EPOCH,
        "last_seq": 20,
        "acked_seq": 12,
        "blocked": "change 13 is too large",
        "log_bytes": 4096,
        "at": 1700000000.5,
    }
    obj.update(override)
    return obj


def test_status_record_round_trips_and_says_null_when_not_blocked() -> None:
    rec = decode_record(orjson.dumps(status()))
    assert isinstance(rec, AgentStatusRecord)
    assert (rec.last_seq, rec.acked_seq, rec.blocked, rec.log_bytes) == (20, 12, "change 13 is too large", 4096)
    assert decode_record(encode_record(rec)) == rec
    clear = AgentStatusRecord(agent_id="agent-7", epoch=EPOCH, last_seq=3, acked_seq=3, log_bytes=0, at=1.0)
    assert orjson.loads(encode_record(clear))["blocked"] is None  # on the wire in so many words
    assert decode_record(encode_record(clear)) == clear


@pytest.mark.parametrize(
    "override",
    [
        {"agent_id": "Agent 7"},
        {"epoch": "not-hex"},
        {"last_seq": -1},
        {"acked_seq": "12"},
        {"blocked": 5},
        {"log_bytes": 1.5},
        {"extra": 1},
        {"at": None},
    ],
)
def test_malformed_status_records_are_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(RecordDecodeError, match="invalid status record"):
        decode_record(orjson.dumps(status(**override)))


def test_status_msg_ids_are_the_agents_own_form_and_fresh_per_report() -> None:
    a = status_msg_id("agent-7", EPOCH, secret=SECRET, nonce="n1")
    assert a == "agent-7:" + hmac.new(SECRET, f"{EPOCH}:status:n1".encode(), hashlib.sha256).hexdigest()[:32]
    assert a != status_msg_id("agent-7", EPOCH, secret=SECRET, nonce="n2")
    assert a != status_msg_id("agent-7", EPOCH, secret=bytes(32), nonce="n1")
    # never the id of a change record (their MAC input is "<epoch>:<first>-<last>")
    assert all(a != msg_id("agent-7", EPOCH, f, f, secret=SECRET) for f in range(1, 50))


def test_sqlite_text_reads_utf8_as_str_and_anything_else_as_invalid_text() -> None:
    assert sqlite_text("café".encode()) == "café" and type(sqlite_text(b"abc")) is str
    got = sqlite_text(b"\xc3\xff(")
    assert type(got) is InvalidText and got == b"\xc3\xff("
    assert encode_value(got) == {"t": "w/8o"}
