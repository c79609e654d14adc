"""The wire contract (agent_client.change_record): decoding rejects anything malformed, values round-trip."""

from __future__ import annotations

import copy
import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_client import (
    RECORD_VERSION,
    ChangeRecord,
    RecordDecodeError,
    RelayRecord,
    TableLayout,
    decode_record,
    decode_value,
    encode_record,
    encode_value,
    msg_id,
)
from tests.support.stream_reader import same_value

EPOCH = "0123456789abcdef"


def valid_record() -> dict[str, Any]:
    """A well-formed change record as the publisher sends it (as a JSON object)."""
    return {
        "v": RECORD_VERSION,
        "kind": "changes",
        "agent_id": "agent-7",
        "epoch": EPOCH,
        "first_seq": 10,
        "last_seq": 13,
        "final": True,
        "committed_at": 1700000000.5,
        "layouts": {
            "3": {
                "table": "notes",
                "columns": ["id", "body", "data"],
                "pk": ["id"],
                "sql": "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, data BLOB)",
                "visibility": "always",
            }
        },
        "changes": [
            [10, "S", 3, []],
            [11, "U", 3, [1, "hello", {"b": "AAE="}]],
            [12, "U", 3, [2, None, {"f": "-inf"}]],
            [13, "D", 3, [1]],
        ],
    }


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def test_valid_record_decodes_with_its_fields() -> None:
    rec = decode_record(dumps(valid_record()))
    assert isinstance(rec, ChangeRecord)
    assert (rec.agent_id, rec.epoch, rec.first_seq, rec.last_seq, rec.final) == ("agent-7", EPOCH, 10, 13, True)
    assert [c[1] for c in rec.changes] == ["S", "U", "U", "D"]
    assert rec.layouts["3"].columns == ["id", "body", "data"]
    # values stay wire-encoded in the record; decode_value turns them into SQLite values
    assert [decode_value(v) for v in rec.changes[1][3]] == [1, "hello", b"\x00\x01"]
    assert decode_value(rec.changes[2][3][2]) == -math.inf


def test_record_round_trips_through_encode_record() -> None:
    rec = decode_record(dumps(valid_record()))
    again = decode_record(encode_record(rec))
    assert again == rec
    assert orjson.loads(encode_record(rec))["changes"] == valid_record()["changes"]


def test_relay_record_decodes_and_needs_rows() -> None:
    relay = {"v": 1, "kind": "relay", "agent_id": "web-agent", "rows": [{"table": "t", "data": {"a": 1}}]}
    rec = decode_record(dumps(relay))
    assert isinstance(rec, RelayRecord)
    assert rec.rows[0].data == {"a": 1}
    with pytest.raises(RecordDecodeError):
        decode_record(dumps({**relay, "rows": []}))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"not json at all",
        b'{"v": 1, "kind": "changes",',
        b"\xff\xfe\x00",
        b"[1, 2, 3]",
        b'"a string"',
        b"null",
        b"42",
    ],
    ids=["empty", "truncated-brace", "text", "truncated-object", "binary", "array", "string", "null", "number"],
)
def test_bad_json_or_not_an_object_is_rejected(payload: bytes) -> None:
    with pytest.raises(RecordDecodeError):
        decode_record(payload)


@pytest.mark.parametrize("version", [None, 0, 2, "1", 1.5, 1.0, True])
def test_wrong_version_is_rejected(version: Any) -> None:
    obj = valid_record()
    if version is None:
        del obj["v"]
    else:
        obj["v"] = version
    with pytest.raises(RecordDecodeError, match="version"):
        decode_record(dumps(obj))


def _mutations() -> list[tuple[str, Any]]:
    """(id, function that breaks a valid record in one way)."""

    def set_(path: list[Any], value: Any) -> Any:
        def f(obj: dict[str, Any]) -> None:
            target = obj
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        return f

    def delete(key: str) -> Any:
        def f(obj: dict[str, Any]) -> None:
            del obj[key]

        return f

    return [
        ("unknown-kind", set_(["kind"], "snapshot")),
        ("missing-layouts", delete("layouts")),
        ("missing-changes", delete("changes")),
        ("missing-agent", delete("agent_id")),
        ("extra-field", set_(["extra"], 1)),
        ("bad-agent-id", set_(["agent_id"], "Agent 7")),
        ("agent-id-with-dot", set_(["agent_id"], "a.b")),
        ("bad-epoch", set_(["epoch"], "XYZ")),
        ("short-epoch", set_(["epoch"], "abc")),
        ("zero-first-seq", set_(["first_seq"], 0)),
        ("string-seq", set_(["first_seq"], "10")),
        ("float-seq", set_(["first_seq"], 10.0)),
        ("final-not-bool", set_(["final"], "yes")),
        ("final-int", set_(["final"], 0)),
        ("changes-not-list", set_(["changes"], {"10": "S"})),
        ("change-not-4-tuple", set_(["changes", 1], [11, "U", 3])),
        ("unknown-op", set_(["changes", 1, 1], "Z")),
        ("layout-not-int", set_(["changes", 1, 2], "3")),
        ("unknown-layout", set_(["changes", 1, 2], 4)),
        ("values-not-list", set_(["changes", 1, 3], "1,hello")),
        ("row-too-short", set_(["changes", 1, 3], [1, "hello"])),
        ("key-too-long", set_(["changes", 3, 3], [1, 2])),
        ("schema-without-sql", set_(["layouts", "3", "sql"], None)),
        ("layouts-not-object", set_(["layouts"], [1, 2])),
        ("layout-extra-field", set_(["layouts", "3", "owner"], "x")),
        ("bad-visibility", set_(["layouts", "3", "visibility"], "public")),
        ("pk-not-a-column", set_(["layouts", "3", "pk"], ["nope"])),
        ("duplicate-columns", set_(["layouts", "3", "columns"], ["id", "id", "data"])),
    ]


@pytest.mark.parametrize(("name", "mutate"), _mutations(), ids=[m[0] for m in _mutations()])
def test_wrong_shape_is_rejected(name: str, mutate: Any) -> None:
    obj = copy.deepcopy(valid_record())
    mutate(obj)
    with pytest.raises(RecordDecodeError):
        decode_record(dumps(obj))


@pytest.mark.parametrize(
    ("first", "last", "seqs"),
    [
        (10, 13, [10, 11, 13, 12]),  # reordered
        (10, 13, [10, 12, 13, 14]),  # gap at the start
        (10, 13, [10, 11, 11, 13]),  # duplicate
        (10, 13, [10, 11, 12]),  # too few for the range
        (10, 12, [10, 11, 12, 13]),  # too many for the range
        (13, 10, [13, 12, 11, 10]),  # last < first
        (9, 12, [10, 11, 12, 13]),  # shifted
    ],
)
def test_non_contiguous_sequences_are_rejected(first: int, last: int, seqs: list[int]) -> None:
    obj = valid_record()
    ops = [["S", []], ["U", [1, "a", None]], ["U", [2, "b", None]], ["D", [1]]]
    obj["first_seq"], obj["last_seq"] = first, last
    obj["changes"] = [[s, *ops[i % 4][:1], 3, ops[i % 4][1]] for i, s in enumerate(seqs)]
    with pytest.raises(RecordDecodeError):
        decode_record(dumps(obj))


@pytest.mark.parametrize(
    ("where", "name"),
    [
        ("table", "bad name"),
        ("table", "notes; DROP TABLE x"),
        ("table", 'no"tes'),
        ("table", "sqlite_master"),
        ("table", "_cr_log"),
        ("table", "1notes"),
        ("table", ""),
        ("table", "t" * 129),
        ("table", "tablé"),
        ("column", "bo dy"),
        ("column", "body)"),
        ("column", "_cr_seq"),
        ("column", ""),
    ],
)
def test_bad_identifiers_in_layouts_are_rejected(where: str, name: str) -> None:
    obj = valid_record()
    layout = obj["layouts"]["3"]
    if where == "table":
        layout["table"] = name
    else:
        layout["columns"][1] = name
    with pytest.raises(RecordDecodeError):
        decode_record(dumps(obj))


def test_layout_accepts_plain_identifiers() -> None:
    layout = TableLayout(table="T_1", columns=["a", "B_2"], pk=["a"], sql="CREATE TABLE T_1 (a, B_2)")
    assert layout.visibility == "always"


# --------------------------------------------------------------------------- values

EDGE_VALUES: list[Any] = [
    None,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    0.0,
    -0.0,
    5e-324,
    -5e-324,
    2.2250738585072014e-308,
    1.7976931348623157e308,
    math.inf,
    -math.inf,
    "",
    "plain",
    "emoji 🎉👩‍👩‍👧",
    '{"b": "AAE="}',
    b"",
    b"\x00\xff" * 10,
]


def wire_round_trip(value: Any) -> Any:
    """encode_value -> JSON bytes -> decode_value, as a record travels."""
    return decode_value(orjson.loads(orjson.dumps(encode_value(value))))


@pytest.mark.parametrize("value", EDGE_VALUES, ids=[repr(v)[:30] for v in EDGE_VALUES])
def test_edge_values_round_trip_with_their_type(value: Any) -> None:
    back = wire_round_trip(value)
    assert same_value(back, value), f"{value!r} came back as {back!r}"


def test_nan_round_trips_as_nan() -> None:
    assert encode_value(math.nan) == {"f": "nan"}
    back = wire_round_trip(math.nan)
    assert isinstance(back, float) and math.isnan(back)


def test_only_what_json_cannot_say_is_tagged() -> None:
    assert encode_value(b"\x01") == {"b": "AQ=="}
    assert encode_value(bytearray(b"\x01")) == {"b": "AQ=="}
    assert encode_value(memoryview(b"\x01")) == {"b": "AQ=="}
    assert encode_value(math.inf) == {"f": "inf"}
    assert encode_value(-math.inf) == {"f": "-inf"}
    for plain in (1, 1.5, "x", None):
        assert encode_value(plain) is plain
    # a TEXT value that looks like a tag stays text: it is a JSON string, not an object
    assert wire_round_trip('{"b": "AQ=="}') == '{"b": "AQ=="}'


@pytest.mark.parametrize(
    "bad",
    [
        True,
        False,
        2**63,
        -(2**63) - 1,
        [1, 2],
        {},
        {"b": "AQ==", "f": "inf"},
        {"b": "not base64!"},
        {"b": 123},
        {"f": "1.5"},
        {"f": "Infinity"},
        {"x": 1},
        object(),
    ],
    ids=repr,
)
def test_decode_value_rejects_what_is_not_a_sqlite_value(bad: Any) -> None:
    with pytest.raises(ValueError):
        decode_value(bad)


sqlite_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(sqlite_values, max_size=8))
def test_values_round_trip_through_json_property(values: list[Any]) -> None:
    back = [wire_round_trip(v) for v in values]
    assert all(same_value(a, b) for a, b in zip(back, values, strict=True)), (back, values)


def test_msg_id_is_keyed_by_agent_epoch_and_range() -> None:
    key = bytes(range(32))
    assert msg_id("agent-7", EPOCH, 10, 13, secret=key).startswith("agent-7:")
    assert EPOCH not in msg_id("agent-7", EPOCH, 10, 13, secret=key)
    assert msg_id("agent-7", EPOCH, 10, 13, secret=key) != msg_id("agent-7", EPOCH, 10, 14, secret=key)
    assert msg_id("agent-7", EPOCH, 1, 1, secret=key) != msg_id("agent-7", "fedcba9876543210", 1, 1, secret=key)
