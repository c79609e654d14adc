"""decode_record's fast path for change records accepts exactly what the pydantic models accept, and builds the
same record; everything else still ends in RecordDecodeError with the model's own message.

Each input is judged twice: by `decode_record` (fast path first) and by `ChangeRecord.model_validate` alone
(the old decoder). Hostile and odd inputs come from a table and from Hypothesis mutating a valid record.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent_client import ChangeRecord, RecordDecodeError, decode_record
from agent_client.change_record import _fast_change_record, change_json, change_record_bytes, layout_json

COLUMNS = ["id", "kind", "payload", "score"]
LAYOUT = {
    "table": "events",
    "columns": COLUMNS,
    "types": ["INTEGER", "TEXT", "TEXT", "REAL"],
    "pk": ["id"],
    "sql": "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)",
    "visibility": "always",
}


def valid() -> dict[str, Any]:
    """A record the publisher could send: a schema change, upserts, a delete, an announce, a drop."""
    return copy.deepcopy(_VALID)


_VALID: dict[str, Any] = {
    "v": 1,
    "kind": "changes",
    "agent_id": "agent-1",
    "epoch": "0123abcd",
    "first_seq": 5,
    "last_seq": 10,
    "final": True,
    "committed_at": 1_700_000_000.25,
    "layouts": {"1": dict(LAYOUT), "2": {"table": "notes", "columns": ["k", "v"], "pk": ["k"]}},
    "changes": [
        [5, "S", 1, []],
        [6, "U", 1, [1, "a", "b", 0.5]],
        [7, "U", 1, [2, None, {"b": "AAE="}, {"f": "nan"}]],
        [8, "D", 1, [1]],
        [9, "V", 2, ["on_demand"]],
        [10, "X", 2, []],
    ],
}


def old_decoder(obj: Any) -> ChangeRecord | None:
    """What decode_record did before the fast path (None: it raised)."""
    try:
        return ChangeRecord.model_validate(obj)
    except ValidationError:
        return None


def assert_same(obj: Any) -> None:
    """The fast path never accepts what the model refuses, and builds what the model builds; decode_record
    refuses (RecordDecodeError) exactly what the old decoder refused."""
    expected = old_decoder(obj)
    fast = _fast_change_record(obj) if isinstance(obj, dict) else None
    if fast is not None:
        assert expected is not None, f"fast path accepted what the model refuses: {obj!r}"
        assert_equal(fast, expected)
    data = json.dumps(obj).encode()  # orjson cannot write integers over 64 bits; the wire cannot carry them
    try:
        wire = orjson.loads(data)
    except orjson.JSONDecodeError:
        with pytest.raises(RecordDecodeError):
            decode_record(data)
        return
    version = wire.get("v") if isinstance(wire, dict) else None
    wanted = (
        old_decoder(wire)
        if type(version) is int and version == 1 and wire.get("kind", "changes") == "changes"
        else None
    )
    if wanted is None:
        try:
            got = decode_record(data)
        except RecordDecodeError:
            return
        assert not isinstance(got, ChangeRecord), f"decode_record accepted what the model refuses: {wire!r}"
        return
    got = decode_record(data)
    assert isinstance(got, ChangeRecord)
    assert_equal(got, wanted)


def assert_equal(got: ChangeRecord, expected: ChangeRecord) -> None:
    assert got == expected
    assert got.model_dump() == expected.model_dump()
    assert got.model_fields_set == expected.model_fields_set
    assert {k: lay.model_fields_set for k, lay in got.layouts.items()} == {
        k: lay.model_fields_set for k, lay in expected.layouts.items()
    }
    assert [type(c) for c in got.changes] == [type(c) for c in expected.changes]
    assert type(got.committed_at) is type(expected.committed_at)


def test_a_valid_record_takes_the_fast_path_and_equals_the_models() -> None:
    obj = valid()
    assert _fast_change_record(copy.deepcopy(obj)) is not None
    assert_same(obj)


def test_the_publishers_bytes_take_the_fast_path() -> None:
    lay = layout_json(
        table="events", columns=COLUMNS, types=LAYOUT["types"], pk=["id"], sql=LAYOUT["sql"], visibility="always"
    )
    data = change_record_bytes(
        agent_id="a1",
        epoch="abcdef01",
        first_seq=1,
        last_seq=3,
        final=False,
        committed_at=12.5,
        layouts_json={1: lay},
        changes_json=[
            change_json(1, "S", 1, []),
            change_json(2, "U", 1, [1, "k", b"\x00", float("inf")]),
            change_json(3, "D", 1, [1]),
        ],
    )
    assert _fast_change_record(orjson.loads(data)) is not None
    assert decode_record(data) == ChangeRecord.model_validate(orjson.loads(data))


def _with(path: tuple[Any, ...], value: Any, *, delete: bool = False) -> dict[str, Any]:
    obj = valid()
    target: Any = obj
    for key in path[:-1]:
        target = target[key]
    if delete:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


HOSTILE: list[dict[str, Any]] = [
    _with(("agent_id",), "Agent"),
    _with(("agent_id",), "agent\n"),
    _with(("agent_id",), 7),
    _with(("agent_id",), "", delete=True),
    _with(("epoch",), "0123ABCD"),
    _with(("epoch",), "0123abc"),
    _with(("epoch",), "0123abcd\n"),
    _with(("first_seq",), True),
    _with(("first_seq",), 5.0),
    _with(("first_seq",), "5"),
    _with(("first_seq",), 0),
    _with(("last_seq",), 4),
    _with(("last_seq",), 2**70),
    _with(("final",), 1),
    _with(("final",), "true"),
    _with(("final",), None),
    _with(("committed_at",), True),
    _with(("committed_at",), "1.5"),
    _with(("committed_at",), 10**400),
    _with(("committed_at",), 2**60),
    _with(("committed_at",), 12),
    _with(("committed_at",), None),
    _with(("committed_at",), [1]),
    _with(("extra",), 1),
    _with(("kind",), "changes", delete=True),
    _with(("final",), True, delete=True),
    _with(("layouts",), []),
    _with(("layouts", "1", "table"), "sqlite_master"),
    _with(("layouts", "1", "table"), "_cr_state"),
    _with(("layouts", "1", "table"), 'ev"il'),
    _with(("layouts", "1", "columns"), ["id", "id", "payload", "score"]),
    _with(("layouts", "1", "columns"), ["id", 2, "payload", "score"]),
    _with(("layouts", "1", "pk"), ["nope"]),
    _with(("layouts", "1", "types"), ["INTEGER"]),
    _with(("layouts", "1", "types"), "INTEGER"),
    _with(("layouts", "1", "sql"), 5),
    _with(("layouts", "1", "sql"), None),
    _with(("layouts", "1", "visibility"), "public"),
    _with(("layouts", "1", "extra"), 1),
    _with(("layouts", "1"), "events"),
    _with(("changes",), {}),
    _with(("changes", 0), [5, "S", 1]),
    _with(("changes", 0), (5, "S", 1, [], 0)),
    _with(("changes", 1, 0), 7),
    _with(("changes", 1, 0), True),
    _with(("changes", 1, 1), "u"),
    _with(("changes", 1, 1), "R"),
    _with(("changes", 1, 2), 3),
    _with(("changes", 1, 2), True),
    _with(("changes", 1, 2), 1.0),
    _with(("changes", 1, 3), [1, "a", "b"]),
    _with(("changes", 1, 3), {"id": 1}),
    _with(("changes", 1, 3), "abcd"),
    _with(("changes", 2, 2), "1"),
    _with(("changes", 3, 3), [1, 2]),
    _with(("changes", 4, 2), 9),
    _with(("changes", 0, 1), "Z"),
    _with(("changes", 0, 1), None),
    {**valid(), "changes": [[5, "R", 0, ["0" * 32]], *valid()["changes"][1:]]},
    {**valid(), "changes": [[5, "R", 0, ["0" * 31 + "A"]], *valid()["changes"][1:]]},
    {**valid(), "changes": [[5, "R", 0, ["0" * 32 + "\n"]], *valid()["changes"][1:]]},
    {**valid(), "changes": [[5, "R", 1, ["0" * 32]], *valid()["changes"][1:]]},
    {**valid(), "changes": [[5, "R", 0, ["0" * 32, 1]], *valid()["changes"][1:]]},
    {**valid(), "changes": [*valid()["changes"][:5], [10, "R", 0, ["0" * 32]]]},
    {**valid(), "layouts": {"1": {**LAYOUT, "sql": ""}}},
    {**valid(), "layouts": {"1": {"table": "events", "columns": COLUMNS, "pk": ["id"]}, "2": LAYOUT}},
]


@pytest.mark.parametrize("obj", HOSTILE, ids=range(len(HOSTILE)))
def test_odd_and_hostile_records_are_judged_as_the_model_judges_them(obj: dict[str, Any]) -> None:
    assert_same(obj)


def test_a_refused_record_says_why_in_the_models_words() -> None:
    with pytest.raises(RecordDecodeError, match="invalid changes record: first_seq"):
        decode_record(orjson.dumps(_with(("first_seq",), True)))
    with pytest.raises(RecordDecodeError, match="duplicate column names"):
        decode_record(orjson.dumps(_with(("layouts", "1", "columns"), ["id", "id", "payload", "score"])))


def test_a_cached_layout_is_not_shared_with_a_different_one() -> None:
    first = valid()
    assert_same(first)  # caches the layout
    second = _with(("layouts", "1", "visibility"), "private")
    assert_same(second)
    assert decode_record(orjson.dumps(second)).layouts["1"].visibility == "private"  # type: ignore[union-attr]
    third = _with(("layouts", "1", "columns"), ["id", "id", "payload", "score"])
    assert_same(third)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["U", "D", "S", "X", "V", "R", "always", "private", "events", "id", "0123abcd", "a" * 32]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_records_are_judged_as_the_model_judges_them(data: st.DataObject) -> None:
    obj = valid()
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(obj)
        path = data.draw(st.sampled_from(paths))
        parent: Any = obj
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[data.draw(st.text(max_size=6))] = data.draw(JSON_VALUES)
        elif action == "add" and isinstance(parent, list):
            parent.append(data.draw(JSON_VALUES))
        else:
            parent[path[-1]] = data.draw(JSON_VALUES)
    assert_same(obj)
