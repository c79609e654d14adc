"""Answers `/relay/query`: read-only SQL over every agent's central copy.

Unqualified table names are the asking agent's; `other_agent.table` (quote
ids with '-' : `"recruiter-1".candidates`) reaches another agent's copy,
which is ATTACHed read-only for that one query. Which agents a query names is
found by tokenizing it; the SQL itself is never rewritten. A query that reads
an `on_demand` table is forwarded to the live agent over NATS request/reply.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS

from agent_client import QueryError, is_valid_agent_id, query_subject, run_read_only

from .central_store import CentralStore
from .consumer import Consumer
from .errors import AgentOffline, BadRequest, Forbidden, InvalidAgent, NotYetReplicated, ReplicatorError
from .store_view import StoreView

MAX_ATTACHED = 9  # SQLite's default limit is 10 attached databases

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(\*/|$))
  | (?P<string>'(?:[^']|'')*'?)
  | (?P<qident>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
  | (?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)
  | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def _tokens(sql: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in _TOKEN_RE.finditer(sql):
        kind = m.lastgroup or "punct"
        text = m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "qident":
            quote = text[0]
            inner = text[1:-1] if len(text) > 1 else ""
            text = inner.replace(quote * 2, quote) if quote in '"`' else inner
            kind = "ident"
        out.append((kind, text))
    return out


def table_references(sql: str) -> tuple[set[str], set[tuple[str | None, str]]]:
    """(schema names used as `schema.x`, table-like references as (schema or None, name)).

    Unqualified names count only where a table can stand (after FROM / JOIN or a
    comma in a FROM list); qualified `a.b` count everywhere. Over-approximation
    is harmless: it only decides what to ATTACH and whether to forward.
    """
    toks = _tokens(sql)
    schemas: set[str] = set()
    refs: set[tuple[str | None, str]] = set()
    in_from = False
    prev_kw = ""
    for i, (kind, text) in enumerate(toks):
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "")
        nxt2 = toks[i + 2] if i + 2 < len(toks) else ("", "")
        upper = text.upper() if kind == "ident" else ""
        if kind == "ident" and nxt == ("punct", ".") and nxt2[0] == "ident":
            schemas.add(text)
            refs.add((text, nxt2[1]))
        elif (
            kind == "ident"
            and prev_kw in ("FROM", "JOIN", ",")
            and in_from
            and not (i > 0 and toks[i - 1] == ("punct", "."))
        ):
            refs.add((None, text))
        if upper in ("FROM", "JOIN"):
            in_from = True
            prev_kw = upper
        elif upper in ("WHERE", "GROUP", "ORDER", "LIMIT", "HAVING", "UNION", "SELECT", "ON", "USING", "WINDOW"):
            in_from = False
            prev_kw = ""
        elif kind == "punct" and text == "," and in_from:
            prev_kw = ","
        elif kind == "punct" and text == "(":
            prev_kw = ""
        elif kind == "ident" and prev_kw in ("FROM", "JOIN", ","):
            prev_kw = "table"
    return schemas, refs


_PoolKey = tuple[Path | None, tuple[tuple[str, Path], ...]]


class _ReadPool:
    """Idle read-only connections by (main db, attached dbs): opening one costs more than most queries."""

    def __init__(self, max_idle: int = 8) -> None:
        self.max_idle = max_idle
        self._idle: dict[_PoolKey, list[sqlite3.Connection]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: _PoolKey) -> sqlite3.Connection:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop()
        main_path, attach = key
        target = f"file:{main_path}?mode=ro" if main_path is not None else "file::memory:?mode=ro"
        conn = sqlite3.connect(target, uri=True, timeout=2.0, check_same_thread=False)
        try:
            for name, path in attach:
                conn.execute("ATTACH DATABASE ? AS ?", (f"file:{path}?mode=ro", name))
        except BaseException:
            conn.close()
            raise
        return conn

    def release(self, key: _PoolKey, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.max_idle and len(self._idle) <= 256:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            for idle in self._idle.values():
                for conn in idle:
                    conn.close()
            self._idle.clear()


def _run(
    pool: _ReadPool,
    main_path: Path | None,
    attach: dict[str, Path],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    timeout_s: float,
    max_rows: int,
) -> tuple[list[str], list[list[Any]], bool]:
    key: _PoolKey = (main_path, tuple(sorted(attach.items())))
    conn = pool.acquire(key)
    allowed_schemas = {"main", *attach}

    def policy(db: str, table: str) -> bool:
        return db in allowed_schemas and not table.startswith("_cr_")

    try:
        result = run_read_only(conn, sql, params, policy=policy, timeout_s=timeout_s, max_rows=max_rows)
    except BaseException:
        conn.close()
        raise
    pool.release(key, conn)
    return result.columns, result.rows, result.truncated


class QueryEngine:
    def __init__(
        self,
        store: CentralStore,
        consumer: Consumer | None,
        nc: Callable[[], NATS | None],
        *,
        max_rows: int = 10_000,
        default_timeout_ms: int = 2_000,
        max_timeout_ms: int = 30_000,
        max_result_bytes: int = 16 * 1024 * 1024,
        max_value_bytes: int = 1024 * 1024,
        max_value_read_bytes: int = 8 * 1024 * 1024,
        max_concurrent: int = 2,
        pool_size: int = 16,
    ) -> None:
        self.max_result_bytes = max_result_bytes  # one answer, encoded
        self.max_value_bytes = max_value_bytes  # a value produced by a query's functions
        self.max_value_read_bytes = max_value_read_bytes  # a value stored centrally (bounded by the record size)
        self.max_concurrent = max_concurrent  # queries one principal may run at once
        self.pool_size = pool_size  # pooled read-only connections
        self.store = store
        self.consumer = consumer
        self._nc = nc
        self.max_rows = max_rows
        self.default_timeout_ms = default_timeout_ms
        self.max_timeout_ms = max_timeout_ms
        self.forwarded = 0
        #: (reader, owner) -> may reader's queries be forwarded to owner's on_demand tables? None: anyone may.
        self.may_read_on_demand: Callable[[str, str], bool] | None = None
        self._pool = _ReadPool()

    async def query(
        self,
        agent_id: str,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None,
        *,
        min_seq: int | None = None,
        epoch: str | None = None,
        timeout_ms: int | None = None,
        max_rows: int | None = None,
    ) -> dict[str, Any]:
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        timeout_ms = min(timeout_ms or self.default_timeout_ms, self.max_timeout_ms)
        max_rows = min(max_rows or self.max_rows, self.max_rows)
        # Wait first: an agent seen for the first time (or a table it just declared) only exists once applied.
        if min_seq is not None and min_seq > 0:
            if self.consumer is None:
                raise NotYetReplicated("this replicator does not consume the stream; min_seq cannot be honoured")
            if not await self.consumer.wait_applied(agent_id, min_seq, timeout_ms / 1000, epoch):
                _ep, have = self.consumer.applied(agent_id)
                raise NotYetReplicated(
                    f"agent {agent_id} is applied up to {have}, not yet {min_seq}, after {timeout_ms} ms"
                )
        schemas, refs = table_references(sql)
        view = self.store.view  # one consistent snapshot for this query (the apply thread owns the replicas)
        known = set(view.agents)
        forward_to = self._on_demand_owner(view, agent_id, refs)
        if forward_to is not None:
            if self.may_read_on_demand is not None and not self.may_read_on_demand(agent_id, forward_to):
                raise Forbidden(f"agent {forward_to} does not share its on_demand tables with {agent_id}")
            return await self._forward(forward_to, sql, params, timeout_ms, max_rows)

        # The asking agent's own id is attached too: `"me".t` must mean the same as `t` (same file, read-only).
        attach = {s: self.store.path_for(s) for s in schemas if s in known}
        if len(attach) > MAX_ATTACHED:
            raise BadRequest(f"a query may name at most {MAX_ATTACHED} other agents")
        main_path = self.store.path_for(agent_id) if agent_id in known else None
        try:
            columns, rows, truncated = await asyncio.to_thread(
                _run, self._pool, main_path, attach, sql, params, timeout_ms / 1000, max_rows
            )
        except QueryError as exc:
            raise _query_error(exc) from None
        except sqlite3.Error as exc:
            raise BadRequest(f"query failed: {exc}") from None
        applied = self.consumer.applied(agent_id)[1] if self.consumer else None
        return {"columns": columns, "rows": rows, "truncated": truncated, "applied_seq": applied}

    @staticmethod
    def _on_demand_owner(view: StoreView, agent_id: str, refs: set[tuple[str | None, str]]) -> str | None:
        owners: set[str] = set()
        plain = 0
        for schema, name in refs:
            owner = agent_id if schema is None else schema
            meta = view.table(owner, name)
            if meta is not None and meta.visibility == "on_demand":
                owners.add(owner)
            else:
                plain += 1
        if not owners:
            return None
        if len(owners) > 1 or plain:
            raise BadRequest(
                "a query that reads an on_demand table is answered by that live agent alone; "
                "it cannot also read other agents' tables or several agents' on_demand tables",
            )
        return owners.pop()

    async def _forward(self, owner: str, sql: str, params: Any, timeout_ms: int, max_rows: int) -> dict[str, Any]:
        nc = self._nc()
        if nc is None or not nc.is_connected:
            raise AgentOffline(f"agent {owner} cannot be reached: the HTPC is not connected to NATS")
        request = {
            "query": sql,
            "params": params if params is not None else [],
            "timeout_ms": timeout_ms,
            "max_rows": max_rows,
        }
        try:
            msg = await nc.request(query_subject(owner), orjson.dumps(request), timeout=timeout_ms / 1000 + 1.0)
        except nats.errors.NoRespondersError:
            raise AgentOffline(
                f"agent {owner} is offline; its on_demand tables are answered only while it runs"
            ) from None
        except nats.errors.TimeoutError:
            raise AgentOffline(f"agent {owner} did not answer within {timeout_ms} ms") from None
        self.forwarded += 1
        try:
            reply = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            raise AgentOffline(f"agent {owner} sent an unreadable answer") from None
        if "error" in reply:
            # Same code, same status as when the HTPC refuses it itself (403 not allowed, 408 timeout).
            raise _query_error(QueryError(f"agent {owner}: {reply.get('message')}"), code=str(reply["error"]))
        return {
            "columns": reply.get("columns", []),
            "rows": reply.get("rows", []),
            "truncated": bool(reply.get("truncated")),
            "applied_seq": None,
            "answered_by": owner,
        }

    def close(self) -> None:
        self._pool.close()


def _query_error(exc: QueryError, code: str | None = None) -> ReplicatorError:
    err = BadRequest(str(exc))
    err.code = code or exc.code
    if err.code == "query_timeout":
        err.status = 408
    elif err.code == "query_not_allowed":
        err.status = 403
    return err
