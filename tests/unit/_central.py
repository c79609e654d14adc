"""Shared pieces of the unit tests that drive a real CentralStore (test_central_store, test_feed_log,
test_network_store): the store fixture, the `items` layout, change and relay records built from short tuples."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent_client import ChangeRecord, RelayRecord, RelayRow, TableLayout
from replicator.central_store import CentralStore
from replicator.data_dir import DataDir

#: `items` as the central-store and feed-log tests declare it (a BLOB column for the {"b": base64} values).
ITEMS = TableLayout(
    table="items",
    columns=["id", "name", "data"],
    pk=["id"],
    types=["INTEGER", "TEXT", "BLOB"],
    sql="CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, data BLOB)",
)


def _open_store(tmp_path: Path) -> Iterator[CentralStore]:
    s = CentralStore(DataDir(tmp_path))
    try:
        yield s
    finally:
        s.close()


#: A CentralStore on a fresh data dir, closed after the test. A test module takes it with `store = store_fixture`.
store_fixture = pytest.fixture(_open_store, name="store")


def change_record(
    agent: str,
    first: int,
    changes: list[tuple[str, int, list[Any]]],
    layouts: Mapping[str, TableLayout],
    *,
    epoch: str,
    final: bool = True,
) -> ChangeRecord:
    """A record of `agent` whose changes (op, layout key, values) are numbered from `first`."""
    numbered: list[tuple[int, Any, int, list[Any]]] = [(first + i, *change) for i, change in enumerate(changes)]
    return ChangeRecord(
        agent_id=agent,
        epoch=epoch,
        first_seq=first,
        last_seq=first + len(changes) - 1,
        final=final,
        committed_at=1000.0 + first,
        layouts=dict(layouts),
        changes=numbered,
    )


def relay_record(agent: str, *rows: tuple[str, dict[str, Any]]) -> RelayRecord:
    """A relay record of `agent`: one row per (table, data)."""
    return RelayRecord(agent_id=agent, rows=[RelayRow(table=t, data=d) for t, d in rows])
