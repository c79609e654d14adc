"""Answers `on_demand` queries the HTPC forwards over NATS request/reply.

Request on `agents.<agent_id>.query`: JSON `{"query": str, "params": list|object,
"timeout_ms": int, "max_rows": int}`. Reply: `{"columns": [...], "rows": [...],
"truncated": bool}` or `{"error": code, "message": str}`. Only tables declared
`always` or `on_demand` can be read; private tables are refused by the
authorizer, so a forwarded query can never reach them.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .errors import QueryError
from .read_only_query import run_read_only
from .subjects import query_subject

log = logging.getLogger("agent_client.query")

MAX_ROWS_LIMIT = 10_000
MAX_TIMEOUT_MS = 10_000


def answer_query(db_path: Path, request: dict[str, Any], agent_id: str | None = None) -> dict[str, Any]:
    """Run one forwarded query against the local database (read-only); never raises.

    The database is also attached under the agent's own id, so a query written
    for the HTPC (`"owner-id".table`) reads the same tables here.
    """
    try:
        query = request.get("query")
        params = request.get("params")
        timeout_ms = min(int(request.get("timeout_ms", 2000)), MAX_TIMEOUT_MS)
        max_rows = min(int(request.get("max_rows", 1000)), MAX_ROWS_LIMIT)
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


class QueryResponder:
    def __init__(self, agent_id: str, db_path: Path) -> None:
        self.agent_id = agent_id
        self.db_path = db_path
        self.answered = 0

    async def subscribe(self, nc: NATS) -> None:
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
            reply = await asyncio.to_thread(answer_query, self.db_path, request, self.agent_id)
        self.answered += 1
        try:
            await msg.respond(orjson.dumps(reply))
        except Exception as exc:  # the requester may have gone away
            log.debug("could not answer query: %r", exc)
