"""Answers `on_demand` queries the HTPC forwards over NATS request/reply.

Request on `agents.<agent_id>.query`: JSON `{"query": str, "params": list|object,
"timeout_ms": int, "max_rows": int}`. Reply: `{"columns": [...], "rows": [...],
"truncated": bool}` or `{"error": code, "message": str}`. Only tables declared
`always` or `on_demand` can be read; private tables are refused by the
authorizer, so a forwarded query can never reach them.

A request with a `control` key is not a query but an instruction from the
HTPC, handed to the callback registered for it: `{"control": "resync",
"request_id": ...}` (resync.py) is answered `{"resync": "accepted",
"request_id", "at_seq"}`. An unknown control is answered with an error.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .errors import QueryError
from .read_only_query import MAX_RESULT_BYTES, run_read_only
from .subjects import query_subject

log = logging.getLogger("agent_client.query")

MAX_ROWS_LIMIT = 10_000
MAX_TIMEOUT_MS = 10_000


def answer_query(
    db_path: Path, request: dict[str, Any], agent_id: str | None = None, *, max_reply_bytes: int | None = None
) -> dict[str, Any]:
    """Run one forwarded query against the local database (read-only); never raises.

    The database is also attached under the agent's own id, so a query written
    for the HTPC (`"owner-id".table`) reads the same tables here. The answer is
    bounded by what the HTPC asks (`max_result_bytes`) and by what one NATS
    message can carry (`max_reply_bytes`): too large is a clear error, never a
    reply that cannot be delivered.
    """
    try:
        query = request.get("query")
        params = request.get("params")
        timeout_ms = min(int(request.get("timeout_ms", 2000)), MAX_TIMEOUT_MS)
        max_rows = min(int(request.get("max_rows", 1000)), MAX_ROWS_LIMIT)
        max_result_bytes = int(request.get("max_result_bytes", MAX_RESULT_BYTES))
        if max_reply_bytes is not None:
            max_result_bytes = min(max_result_bytes, max_reply_bytes)
        if not isinstance(query, str):
            raise QueryError("query must be a string")
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=1.0)
        schemas = {"main"}
        try:
            if agent_id is not None:
                conn.execute("ATTACH DATABASE ? AS ?", (f"file:{db_path}?mode=ro", agent_id))
                schemas.add(agent_id)
            readable = {
                str(r[0])
                for r in conn.execute("SELECT name FROM _cr_tables WHERE visibility IN ('always', 'on_demand')")
            }
            result = run_read_only(
                conn,
                query,
                params,
                policy=lambda db, table: db in schemas and table in readable,
                timeout_s=timeout_ms / 1000,
                max_rows=max_rows,
                max_result_bytes=max(1, max_result_bytes),
            )
        finally:
            conn.close()
        return {"columns": result.columns, "rows": result.rows, "truncated": result.truncated}
    except QueryError as exc:
        return {"error": exc.code, "message": str(exc)}
    except (ValueError, TypeError) as exc:
        return {"error": "invalid_query", "message": f"bad query request: {exc}"}
    except sqlite3.Error as exc:
        return {"error": "agent_error", "message": f"agent database error: {exc}"}


#: A control's handler: the request (a JSON object) -> the reply (never raises).
ControlHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class QueryResponder:
    def __init__(self, agent_id: str, db_path: Path, *, controls: Mapping[str, ControlHandler] | None = None) -> None:
        self.agent_id = agent_id
        self.db_path = db_path
        self.answered = 0
        self.controls_answered = 0
        self._controls = dict(controls or {})
        self._max_reply_bytes: int | None = None

    async def subscribe(self, nc: NATS) -> None:
        # Room for the reply's envelope within one NATS message.
        self._max_reply_bytes = max(1024, nc.max_payload - 4096) if nc.max_payload else None
        await nc.subscribe(query_subject(self.agent_id), cb=self._handle)

    async def _handle(self, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            request = orjson.loads(msg.data)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except ValueError as exc:
            reply: dict[str, Any] = {"error": "invalid_query", "message": f"bad request: {exc}"}
        else:
            if "control" in request:
                reply = await self._control(request)
            else:
                reply = await asyncio.to_thread(
                    answer_query, self.db_path, request, self.agent_id, max_reply_bytes=self._max_reply_bytes
                )
        self.answered += 1
        try:
            await msg.respond(orjson.dumps(reply))
        except Exception as exc:  # the requester may have gone away
            log.debug("could not answer query: %r", exc)

    async def _control(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("control")
        handler = self._controls.get(name) if isinstance(name, str) else None
        if handler is None:
            return {"error": "unknown_control", "message": f"this agent does not know the control {name!r:.80}"}
        self.controls_answered += 1
        try:
            return await handler(request)
        except Exception as exc:  # a handler answers its own errors; this is the last guard
            log.exception("control %s failed", name)
            return {"error": "agent_error", "message": f"{name} failed: {type(exc).__name__}: {exc}"}
