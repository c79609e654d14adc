"""The agent's side of a resync: a fresh full copy of its replicated tables, in one local transaction.

The HTPC asks for one when the agent's central copy cannot be continued from the stream (a dead letter in
its sequence, a gap that will never fill, history aged out, a lost central file); see the resync protocol
in the HTPC's docs. The request comes as `{"control": "resync", "request_id": "<32 hex>"}` on the agent's
query subject (query_responder.py); `serve` does the work on the writer connection:

1. the open transaction group is closed, so the resync starts a group of its own;
2. an R change (layout 0, values = [request_id]) is logged: the first change of that group;
3. every log row below it is deleted: the snapshot supersedes whatever was not acknowledged yet (the
   publisher is told to forget what it read of them). This is also how a change the publisher cannot send
   is healed once its row was fixed;
4. each `always` table gets S + a snapshot of its rows (U), each `on_demand` table a V, exactly as when
   its visibility was declared (catalog.apply_visibility);
5. `request_id -> seq of the R` is remembered in `_cr_meta` (`resync_request`), so the same request again
   is answered with the same seq and no new work.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass

from . import catalog, change_log
from .change_record import RESYNC_REQUEST_ID_PATTERN
from .errors import InvalidResyncRequest
from .visibility import Visibility

#: The `_cr_meta` key of the last resync served: JSON {"request_id", "at_seq"}.
META_KEY = "resync_request"


@dataclass(frozen=True)
class ResyncServed:
    request_id: str
    #: the seq of the R change (the first change of the resync's group)
    at_seq: int
    #: False when this request had been served before (the same at_seq, nothing done now)
    new: bool
    #: log rows the snapshot superseded (deleted)
    superseded: int = 0


def validate_request_id(value: object) -> str:
    """A resync request id is 32 lowercase hex characters (InvalidResyncRequest otherwise)."""
    if not isinstance(value, str) or not re.fullmatch(RESYNC_REQUEST_ID_PATTERN, value):
        raise InvalidResyncRequest(f"a resync request_id must be 32 lowercase hex characters, got {value!r:.80}")
    return value


def last_served(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """(request_id, at_seq) of the last resync served, or None."""
    row = conn.execute("SELECT value FROM _cr_meta WHERE key = ?", (META_KEY,)).fetchone()
    if row is None:
        return None
    data = json.loads(row[0])
    return str(data["request_id"]), int(data["at_seq"])


def serve(conn: sqlite3.Connection, request_id: str) -> ResyncServed:
    """Do the resync inside the caller's write transaction (see the module docstring); idempotent per id."""
    validate_request_id(request_id)
    previous = last_served(conn)
    if previous is not None and previous[0] == request_id:
        return ResyncServed(request_id, previous[1], new=False)
    catalog.resync_schema(conn)  # triggers and layouts in step with the tables before they are copied
    change_log.close_group(conn)
    at_seq = change_log.append_resync(conn, request_id)
    superseded = change_log.forget_before(conn, at_seq)
    tables = catalog.current_tables(conn)
    layouts = catalog.load_layouts(conn, {lid for _vis, lid, _sql in tables.values() if lid is not None})
    for name in sorted(tables):
        visibility, layout_id, _sql = tables[name]
        if layout_id is None:
            continue
        if visibility is Visibility.ALWAYS:
            change_log.append(conn, layout_id, "S")
            change_log.append_snapshot(conn, layout_id, name, layouts[layout_id].columns)
        elif visibility is Visibility.ON_DEMAND:
            change_log.append(conn, layout_id, "V", ["'on_demand'"])
    conn.execute(
        "INSERT OR REPLACE INTO _cr_meta (key, value) VALUES (?, ?)",
        (META_KEY, json.dumps({"request_id": request_id, "at_seq": at_seq})),
    )
    return ResyncServed(request_id, at_seq, new=True, superseded=superseded)
