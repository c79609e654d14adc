"""Answers `/relay/query`: read-only SQL over every agent's central copy.

Unqualified table names are the asking agent's; `other_agent.table` (quote
ids with '-' : `"recruiter-1".candidates`) reaches another agent's copy,
which is ATTACHed read-only for that one query. Which agents a query names is
found by tokenizing it; the SQL itself is never rewritten. A query that reads
an `on_demand` table is forwarded to the live agent over NATS request/reply.

What one principal's queries may take is bounded: at most `max_concurrent` at
once (more are answered 429 `too_many_queries`), each within its time bound
(agent_client's run_read_only bounds every step), each answer at most
`max_result_bytes` once encoded. Queries run on their own threads, so slow
ones never hold the threads the rest of the service uses, and idle
connections are pooled up to `pool_size` in total (least recently used closed
first: each holds its database files open).

Small queries skip the thread hop (which costs more than a primary-key
lookup): a query first runs on the event loop, on an idle pooled connection,
within tight bounds (`_Inline`: a few hundred µs, its progress handler every
few dozen SQLite steps, small values and answers, no busy wait, short SQL).
Whatever it meets past one of them (its budget, a larger value, a lock, any
error) it is run again on a query thread, from the start, with the real
bounds, and that run gives the answer or the error, exactly as before. So
the loop spends at most the budget plus one step on values of at most the
inline size on a query, however hostile; a query text that went past the
budget (on its thread too) goes to a thread directly for a few seconds.

`"*".table` is that table across every agent (its `always` tables only), with
the owner's id as a first column `agent_id`: it is read from the network store
(network_store.py, ATTACHed as `"*"`), brought up to every agent's committed
state at the query's start first. A query may name any number of agents: past
what SQLite can attach (MAX_ATTACHED), the other agents' tables are read from
the network store too (`"a".t` becomes a subquery of `"*".t` on `agent_id`).

Another agent's schema (sqlite_master) and every internal `_cr_*` table stay
unreadable.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS

from agent_client import (
    QueryConnection,
    QueryError,
    QueryResult,
    QueryTimeout,
    is_valid_agent_id,
    query_subject,
    quote_identifier,
    run_read_only,
)

from .central_store import CentralStore
from .consumer import Consumer
from .errors import (
    AgentOffline,
    BadRequest,
    Forbidden,
    InvalidAgent,
    NotYetReplicated,
    ReplicatorError,
    TooManyQueries,
)
from .network_store import HIDDEN_COLUMNS, NetworkStore, NetworkStoreError, network_columns, unknown_table
from .store_view import StoreView

MAX_ATTACHED = 9  # SQLite's default limit is 10 attached databases
#: The schema name of the network store in queries: `"*".t` is every agent's `t`.
NETWORK_SCHEMA = "*"
BUSY_TIMEOUT_MS = 2000  # how long a query thread waits on a lock (never the event loop: it does not wait)
OVERRUN_GRACE_S = 0.5  # how long past its bound a query may take before it is answered 408 regardless
log = logging.getLogger("replicator.query")
_SCHEMA_TABLES = frozenset({"sqlite_master", "sqlite_schema", "sqlite_temp_master", "sqlite_temp_schema"})

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
    return [(kind, text) for kind, text, _start, _end in _spans(sql)]


def _spans(sql: str) -> list[tuple[str, str, int, int]]:
    """The tokens that matter (no whitespace, no comments) as (kind, text, start, end): quoted identifiers
    unquoted as `ident`; a string literal where SQLite takes it as a name (next to a `.`, or right after FROM or
    JOIN: `"*".'t'` reads table t) is an `ident` too."""
    out: list[tuple[str, str, int, int]] = []
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
        out.append((kind, text, m.start(), m.end()))
    for i, (kind, text, start, end) in enumerate(out):
        if kind != "string":
            continue
        prev = out[i - 1][:2] if i else ("", "")
        nxt = out[i + 1][:2] if i + 1 < len(out) else ("", "")
        if (
            prev == ("punct", ".")
            or nxt == ("punct", ".")
            or (prev[0] == "ident" and prev[1].upper() in ("FROM", "JOIN"))
        ):
            out[i] = ("ident", text[1:-1].replace("''", "'") if len(text) > 1 else "", start, end)
    return out


#: Words that may follow a table in a FROM clause and are not an alias of it.
_NOT_ALIAS = frozenset(
    {
        "ON",
        "USING",
        "WHERE",
        "GROUP",
        "ORDER",
        "LIMIT",
        "HAVING",
        "WINDOW",
        "UNION",
        "INTERSECT",
        "EXCEPT",
        "JOIN",
        "LEFT",
        "RIGHT",
        "FULL",
        "INNER",
        "CROSS",
        "NATURAL",
        "OUTER",
        "INDEXED",
        "NOT",
        "RETURNING",
    }
)


def _internal(name: str) -> bool:
    return name.lower() in _SCHEMA_TABLES or name.startswith("_cr_")


def rewrite_overflow(sql: str, own: str, overflow: frozenset[str], view: StoreView) -> tuple[str, set[str]]:
    """`sql` with the tables of the agents in `overflow` read from the network store, and `"<own>".t` read as
    `main.t`; also the network tables it now reads.

    `"a".t` in a FROM clause becomes `(SELECT <a's columns of t> FROM "*".t WHERE agent_id = 'a') AS t` (the
    query's own alias kept when it gives one), and a column reference `"a".t.c` becomes `t.c` (a distinct
    alias when several of those agents' tables share a name). Names an agent has no `always` table of are left
    as they are (SQLite then says what is wrong with them).
    """
    toks = _spans(sql)
    q = quote_identifier
    names: dict[str, set[str]] = {}
    for i, (kind, text, _s, _e) in enumerate(toks[:-2]):
        if kind == "ident" and text in overflow and toks[i + 1][1] == "." and toks[i + 2][0] == "ident":
            names.setdefault(toks[i + 2][1].lower(), set()).add(text)

    def alias(schema: str, name: str) -> str:
        return q(name if len(names.get(name.lower(), ())) <= 1 else f"{schema}.{name}")

    out: list[str] = []
    pos = 0
    tables: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text, start, end = toks[i]
        qualified = (
            kind == "ident"
            and i + 2 < len(toks)
            and toks[i + 1][:2] == ("punct", ".")
            and toks[i + 2][0] == "ident"
            and not (i > 0 and toks[i - 1][:2] == ("punct", "."))
        )
        if not qualified or (text != own and text not in overflow):
            i += 1
            continue
        name = toks[i + 2][1]
        if text == own:
            out += [sql[pos:start], "main"]
            pos = end
            i += 3
            continue
        if _internal(name):
            raise _query_error(
                QueryError(f"not allowed in a read-only query: read of {text}.{name}"), "query_not_allowed"
            )
        columns = network_columns(view, name.lower(), text)
        if columns is None:
            i += 3
            continue
        column_ref = i + 4 < len(toks) and toks[i + 3][:2] == ("punct", ".") and toks[i + 4][0] == "ident"
        if column_ref:
            out += [sql[pos:start], alias(text, name), "."]
            pos = toks[i + 3][3]
            i += 4
            continue
        hidden = sorted(c for c in columns if c.lower() in HIDDEN_COLUMNS)
        if hidden:
            raise BadRequest(
                f"{text}.{name} has a column named {hidden[0]}, which the network store cannot hold (agent_id is "
                f"the owner's id there, rowid its row id): name at most {MAX_ATTACHED} agents in a query that reads it"
            )
        own_alias = i + 3 < len(toks) and toks[i + 3][0] == "ident" and toks[i + 3][1].upper() not in _NOT_ALIAS
        sub = (
            f"(SELECT {', '.join(map(q, columns))} FROM {q(NETWORK_SCHEMA)}.{q(name.lower())} "
            f"WHERE agent_id = '{text}')"
        )
        out += [sql[pos:start], sub if own_alias else f"{sub} AS {alias(text, name)}"]
        pos = toks[i + 2][3]
        tables.add(name.lower())
        i += 3
    out.append(sql[pos:])
    return "".join(out), tables


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


#: Query texts up to this long have their references remembered (apps repeat the same few texts).
_REFERENCES_CACHED_CHARS = 4096


@functools.lru_cache(maxsize=1024)
def _cached_references(sql: str) -> tuple[frozenset[str], frozenset[tuple[str | None, str]]]:
    schemas, refs = table_references(sql)
    return frozenset(schemas), frozenset(refs)


def _references(sql: str) -> tuple[frozenset[str], frozenset[tuple[str | None, str]]]:
    """table_references, remembered for short texts (at most 1024 of them, so at most ~4 MiB)."""
    if len(sql) <= _REFERENCES_CACHED_CHARS:
        return _cached_references(sql)
    schemas, refs = table_references(sql)
    return frozenset(schemas), frozenset(refs)


_PoolKey = tuple[Path | None, tuple[tuple[str, Path], ...]]


class _PooledConnection(QueryConnection):
    """A pooled query connection whose progress handler runs at least every `progress_ops` steps when set.

    run_read_only installs its handler every `2000` steps, right for a query thread; on the event loop
    the budget is a few hundred µs, so the handler must look at the clock more often.
    """

    progress_ops: int | None = None

    def set_progress_handler(self, progress_handler: Callable[[], int | None] | None, n: int, /) -> None:
        if progress_handler is not None and self.progress_ops is not None:
            n = min(n, self.progress_ops)
        super().set_progress_handler(progress_handler, n)


class _ReadPool:
    """Idle read-only connections by (main db, attached dbs), least recently used first out.

    Opening one (and attaching) costs more than most queries; each holds its database files open, so at
    most `size` stay idle in total, whatever the mix of attached agents (the ones in use are bounded by
    the query threads).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.opened = 0
        self.closed = 0
        self._idle: OrderedDict[int, tuple[_PoolKey, _PooledConnection]] = OrderedDict()
        self._serial = 0
        self._lock = threading.Lock()
        self._shut = False

    def take_idle(self, key: _PoolKey) -> _PooledConnection | None:
        """An idle connection for `key`, most recently used first; None if there is none (opening one is a
        query thread's work: it reads files and schemas)."""
        with self._lock:
            for token in reversed(self._idle):
                if self._idle[token][0] == key:
                    return self._idle.pop(token)[1]
        return None

    def acquire(self, key: _PoolKey) -> _PooledConnection:
        idle = self.take_idle(key)
        if idle is not None:
            return idle
        main_path, attach = key
        target = f"file:{main_path}?mode=ro" if main_path is not None else "file::memory:?mode=ro"
        conn = sqlite3.connect(
            target, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False, factory=_PooledConnection
        )
        try:
            for name, path in attach:
                conn.execute("ATTACH DATABASE ? AS ?", (f"file:{path}?mode=ro", name))
        except BaseException:
            conn.close()
            raise
        with self._lock:
            self.opened += 1
        return conn

    def release(self, key: _PoolKey, conn: _PooledConnection) -> None:
        evicted: list[sqlite3.Connection] = []
        with self._lock:
            if conn.in_transaction or self._shut:
                evicted.append(conn)
            else:
                self._serial += 1
                self._idle[self._serial] = (key, conn)
                while len(self._idle) > self.size:
                    evicted.append(self._idle.popitem(last=False)[1][1])
        self.discard(*evicted)

    def discard(self, *conns: sqlite3.Connection) -> None:
        for conn in conns:
            conn.close()
        with self._lock:
            self.closed += len(conns)

    @property
    def idle(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        with self._lock:
            self._shut = True
            conns = [conn for _key, conn in self._idle.values()]
            self._idle.clear()
        self.discard(*conns)


@dataclass(frozen=True)
class _Limits:
    value_read: int  # SQLITE_LIMIT_LENGTH: at least the largest stored value
    value: int  # a value printf/format, zeroblob or randomblob may make
    result: int  # one answer, JSON-encoded


def _execute(
    conn: sqlite3.Connection,
    attach: dict[str, Path],
    own_schemas: frozenset[str],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    timeout_s: float,
    max_rows: int,
    limits: _Limits,
) -> QueryResult:
    """run_read_only with the HTPC's table policy: the asker's tables and the agents it names, never `_cr_*`
    tables or another agent's schema."""
    allowed_schemas = {"main", *attach}

    def policy(db: str, table: str) -> bool:
        if db not in allowed_schemas or table.startswith("_cr_"):
            return False
        return table not in _SCHEMA_TABLES or db in own_schemas  # another agent's schema stays its own

    return run_read_only(
        conn,
        sql,
        params,
        policy=policy,
        timeout_s=timeout_s,
        max_rows=max_rows,
        max_value_read_bytes=limits.value_read,
        max_value_bytes=limits.value,
        max_result_bytes=limits.result,
    )


def _run(
    pool: _ReadPool,
    main_path: Path | None,
    attach: dict[str, Path],
    own_schemas: frozenset[str],
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    timeout_s: float,
    max_rows: int,
    limits: _Limits,
    applied: Callable[[], int | None],
    started: list[float],
) -> bytes:
    """Run one query on a pooled connection; the whole answer, JSON-encoded (in this worker thread)."""
    started.append(time.monotonic())
    key: _PoolKey = (main_path, tuple(sorted(attach.items())))
    conn = pool.acquire(key)
    try:
        result = _execute(conn, attach, own_schemas, sql, params, timeout_s, max_rows, limits)
    except BaseException:
        pool.discard(conn)
        raise
    pool.release(key, conn)
    return _answer(result.columns, result.rows_json, result.truncated, applied())


@dataclass(frozen=True)
class _Inline:
    """The bounds of a query's first try on the event loop (past any of them it runs on a query thread).

    `budget_s` is its time bound, checked by the progress handler every `progress_ops` SQLite steps and by
    the guarded builtins; values read or made are at most `max_value_bytes` (one step's work is linear in
    them), the answer at most `max_result_bytes`, the query text at most `max_sql_chars` (preparing it is
    one uninterruptible step). No busy wait: a lock means a query thread.
    """

    budget_s: float = 0.0005
    progress_ops: int = 64
    max_value_bytes: int = 64 * 1024
    max_result_bytes: int = 256 * 1024
    max_sql_chars: int = 4096
    slow_remembered: int = 512  # query texts that went past the budget, sent to a thread directly ...
    slow_for_s: float = 5.0  # ... for this long (one slow run may be a cold cache or a busy machine)


def _answer(columns: list[str], rows_json: bytes, truncated: bool, applied_seq: int | None, **extra: Any) -> bytes:
    """The `/relay/query` answer as JSON bytes, around rows that are already encoded."""
    tail = orjson.dumps({"truncated": truncated, "applied_seq": applied_seq, **extra})
    return b'{"columns":' + orjson.dumps(columns) + b',"rows":' + rows_json + b"," + tail[1:]


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
        inline: _Inline | None = _Inline(),
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
        self.refused_busy = 0  # queries answered 429 because their principal already ran max_concurrent
        self.overran = 0  # queries answered 408 while SQLite was still inside one long step
        #: (reader, owner) -> may reader's queries be forwarded to owner's on_demand tables? None: anyone may.
        self.may_read_on_demand: Callable[[str, str], bool] | None = None
        self._pool = _ReadPool(pool_size)
        self._limits = _Limits(max_value_read_bytes, max_value_bytes, max_result_bytes)
        # Enough threads that every principal's allowance fits several times over; excess queries queue.
        self.threads = min(64, max(8, 4 * max_concurrent))
        self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="query")
        self._running: dict[str, int] = {}
        #: First tries on the event loop (None: every query on a thread); see the module docstring.
        self.inline = inline
        self.inline_answered = 0  # queries answered on the event loop
        self.inline_rerun = 0  # queries tried there and run again on a query thread
        self._slow: OrderedDict[str, float] = OrderedDict()  # query text past the inline budget -> until when
        self._network: NetworkStore | None = None  # opened by the first query that reads `"*"`
        self._inline_limits = (
            _Limits(
                min(max_value_read_bytes, inline.max_value_bytes),
                min(max_value_bytes, inline.max_value_bytes),
                min(max_result_bytes, inline.max_result_bytes),
            )
            if inline is not None
            else self._limits
        )

    def idle_connections(self) -> int:
        """Pooled query connections open and idle now."""
        return self._pool.idle

    def running(self, principal: str) -> int:
        return self._running.get(principal, 0)

    def _acquire(self, principal: str) -> None:
        n = self._running.get(principal, 0)
        if n >= self.max_concurrent:
            self.refused_busy += 1
            raise TooManyQueries(
                f"{principal} already runs {n} queries, the most one caller may run at once "
                f"(query_max_concurrent={self.max_concurrent}); retry when one has answered",
                retry_after=1,
            )
        self._running[principal] = n + 1

    def _release(self, principal: str) -> None:
        n = self._running.get(principal, 0) - 1
        if n > 0:
            self._running[principal] = n
        else:
            self._running.pop(principal, None)

    async def query(
        self,
        agent_id: str,
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None,
        *,
        principal: str | None = None,
        min_seq: int | None = None,
        epoch: str | None = None,
        timeout_ms: int | None = None,
        max_rows: int | None = None,
    ) -> bytes:
        """The answer as JSON bytes: `{"columns", "rows", "truncated", "applied_seq"[, "answered_by"]}`.

        `principal` (default: the agent itself) is who asks; it may run `max_concurrent` queries at once.
        """
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        who = principal or f"agent:{agent_id}"
        self._acquire(who)
        release_here = True  # until a query thread owns the slot (it frees it when it is really done)
        try:
            timeout_ms = min(timeout_ms or self.default_timeout_ms, self.max_timeout_ms)
            max_rows = min(max_rows or self.max_rows, self.max_rows)
            # Wait first: an agent seen for the first time (or a table it just declared) only exists once applied.
            if min_seq is not None and min_seq > 0:
                await self._wait_applied(agent_id, min_seq, epoch, timeout_ms)
            schemas, refs = _references(sql)
            view = self.store.view  # one consistent snapshot for this query (the apply thread owns the replicas)
            known = set(view.agents)
            forward_to = self._on_demand_owner(view, agent_id, refs)
            if forward_to is not None:
                if self.may_read_on_demand is not None and not self.may_read_on_demand(agent_id, forward_to):
                    raise Forbidden(f"agent {forward_to} does not share its on_demand tables with {agent_id}")
                return await self._forward(forward_to, sql, params, timeout_ms, max_rows)

            sql, attach, network_tables = self._plan(agent_id, sql, schemas, refs, view)
            unknown: set[str] = set()
            if network_tables:
                began = time.monotonic()
                unknown = await self.network().ensure(view, network_tables, timeout_ms / 1000)
                spent_ms = int((time.monotonic() - began) * 1000)
                timeout_ms = max(1, timeout_ms - spent_ms)  # the query's time bound covers the catch-up too
            main_path = self.store.path_for(agent_id) if agent_id in known else None
            consumer = self.consumer

            def applied() -> int | None:
                return consumer.applied(agent_id)[1] if consumer is not None else None

            own = frozenset({"main", agent_id})
            answer, over_budget = self._try_inline(main_path, attach, own, sql, params, timeout_ms / 1000, max_rows)
            if answer is not None:
                return _answer(answer.columns, answer.rows_json, answer.truncated, applied())
            started: list[float] = []  # when a query thread took it up

            job = self._executor.submit(
                _run,
                self._pool,
                main_path,
                attach,
                own,
                sql,
                params,
                timeout_ms / 1000,
                max_rows,
                self._limits,
                applied,
                started,
            )
            release_here = False
            job.add_done_callback(self._release_later(who))
            slow = over_budget  # until the thread's run shows it was a passing hiccup (a cold cache, a busy box)
            try:
                answer_json = await self._await_job(job, started, timeout_ms / 1000)
                slow = (
                    over_budget
                    and self.inline is not None
                    and bool(started)
                    and (time.monotonic() - started[0] > self.inline.budget_s)
                )
                return answer_json
            except QueryError as exc:
                if unknown and "no such table" in str(exc):
                    raise unknown_table(unknown) from None
                raise _query_error(exc) from None
            except sqlite3.Error as exc:
                raise BadRequest(f"query failed: {exc}") from None
            finally:
                if slow:
                    self._remember_slow(sql)
        finally:
            if release_here:
                self._release(who)

    def network(self) -> NetworkStore:
        """The network store (`"*".t`), opened on first use."""
        if self._network is None:
            try:
                self._network = NetworkStore(self.store.data_dir.network_db)
            except (sqlite3.Error, OSError) as exc:
                raise NetworkStoreError(f"the network store cannot be opened: {exc}") from exc
        return self._network

    def _plan(
        self,
        agent_id: str,
        sql: str,
        schemas: frozenset[str],
        refs: frozenset[tuple[str | None, str]],
        view: StoreView,
    ) -> tuple[str, dict[str, Path], set[str]]:
        """(the SQL to run, the databases to attach by schema name, the network tables it reads).

        Every agent the query names is attached read-only (the asking agent's own id too: `"me".t` means `t`),
        and the network store as `"*"` when the query reads it. Past MAX_ATTACHED, the asker's own id is read
        as `main` and the agents that do not fit are read from the network store (rewrite_overflow).
        """
        known = view.agents
        network_tables = {name.lower() for schema, name in refs if schema == NETWORK_SCHEMA and not _internal(name)}
        uses_network = NETWORK_SCHEMA in schemas
        named = sorted(s for s in schemas if s in known)
        if len(named) + uses_network > MAX_ATTACHED:
            others = [s for s in named if s != agent_id]
            kept = others[: MAX_ATTACHED - 1]
            overflow = frozenset(others[MAX_ATTACHED - 1 :])
            sql, more = rewrite_overflow(sql, agent_id, overflow, view)
            network_tables |= more
            named = kept
            uses_network = True
        attach = {s: self.store.path_for(s) for s in named}
        if uses_network:
            attach[NETWORK_SCHEMA] = self.network().path
        return sql, attach, network_tables

    def _try_inline(
        self,
        main_path: Path | None,
        attach: dict[str, Path],
        own_schemas: frozenset[str],
        sql: str,
        params: Sequence[Any] | Mapping[str, Any] | None,
        timeout_s: float,
        max_rows: int,
    ) -> tuple[QueryResult | None, bool]:
        """(the query's result if it ran within the inline bounds on the event loop, else None: run it on a
        query thread, whose run decides its answer or its error whatever stopped this one; did it stop at
        the time budget?)."""
        bounds = self.inline
        if bounds is None or len(sql) > bounds.max_sql_chars:
            return None, False
        slow_until = self._slow.get(sql)
        if slow_until is not None:
            if slow_until > time.monotonic():
                return None, False
            del self._slow[sql]
        key: _PoolKey = (main_path, tuple(sorted(attach.items())))
        conn = self._pool.take_idle(key)
        if conn is None:
            return None, False
        conn.progress_ops = bounds.progress_ops
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                result = _execute(
                    conn,
                    attach,
                    own_schemas,
                    sql,
                    params,
                    min(timeout_s, bounds.budget_s),
                    max_rows,
                    self._inline_limits,
                )
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                conn.progress_ops = None
        except (QueryError, sqlite3.Error) as exc:
            # Its budget, a larger value or answer, a lock, or a real error: the thread's run tells which.
            self._pool.release(key, conn)  # run_read_only left it as it found it
            self.inline_rerun += 1
            return None, isinstance(exc, QueryTimeout)
        except BaseException:
            self._pool.discard(conn)
            raise
        self._pool.release(key, conn)
        self.inline_answered += 1
        return result, False

    def _remember_slow(self, sql: str) -> None:
        """Past the inline budget on the loop and on its thread too: straight to a thread for a while."""
        if self.inline is None:
            return
        self._slow[sql] = time.monotonic() + self.inline.slow_for_s
        self._slow.move_to_end(sql)
        while len(self._slow) > self.inline.slow_remembered:
            self._slow.popitem(last=False)

    async def _await_job(self, job: Future[bytes], started: list[float], timeout_s: float) -> bytes:
        """The job's answer; 408 once it has run `timeout_s` + grace, even if SQLite is still inside one step.

        SQLite checks its progress handler between rows, and one row can make it work in proportion to the
        statement's length times the size of the values it reads. Such a query is answered at its bound;
        its thread (and its principal's concurrency slot) is freed only when SQLite returns.
        """
        waiting = asyncio.wrap_future(job)
        while True:
            if started:
                remaining = started[0] + timeout_s + OVERRUN_GRACE_S - time.monotonic()
                if remaining <= 0:
                    self.overran += 1
                    log.warning("a query ran past its %.3g s bound inside one SQLite step; answered 408", timeout_s)
                    raise _query_error(
                        QueryTimeout(
                            f"query exceeded its time bound of {timeout_s:g} s; it keeps one of your "
                            f"{self.max_concurrent} concurrent queries until SQLite lets it stop"
                        )
                    )
            else:
                remaining = 0.05  # still queued behind other queries
            done, _pending = await asyncio.wait({waiting}, timeout=remaining)
            if done:
                return waiting.result()

    def _release_later(self, who: str) -> Callable[[Future[bytes]], None]:
        loop = asyncio.get_running_loop()

        def done(_job: Future[bytes]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown): nobody counts any more
                loop.call_soon_threadsafe(self._release, who)

        return done

    async def _wait_applied(self, agent_id: str, min_seq: int, epoch: str | None, timeout_ms: int) -> None:
        if self.consumer is None:
            raise NotYetReplicated("this replicator does not consume the stream; min_seq cannot be honoured")
        ep, have = self.consumer.applied(agent_id)
        if have >= min_seq and (epoch is None or ep == epoch):
            return  # already there (the common case for a read after a write): no waiter, no lock, no timer
        if not await self.consumer.wait_applied(agent_id, min_seq, timeout_ms / 1000, epoch):
            _ep, have = self.consumer.applied(agent_id)
            raise NotYetReplicated(
                f"agent {agent_id} is applied up to {have}, not yet {min_seq}, after {timeout_ms} ms"
            )

    @staticmethod
    def _on_demand_owner(view: StoreView, agent_id: str, refs: frozenset[tuple[str | None, str]]) -> str | None:
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

    async def _forward(self, owner: str, sql: str, params: Any, timeout_ms: int, max_rows: int) -> bytes:
        nc = self._nc()
        if nc is None or not nc.is_connected:
            raise AgentOffline(f"agent {owner} cannot be reached: the HTPC is not connected to NATS")
        request = {
            "query": sql,
            "params": params if params is not None else [],
            "timeout_ms": timeout_ms,
            "max_rows": max_rows,
            "max_result_bytes": self.max_result_bytes,
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
        if len(msg.data) > self.max_result_bytes + 4096:
            raise _query_error(
                QueryError(f"agent {owner}'s answer exceeds {self.max_result_bytes} bytes (query_max_result_bytes)"),
                code="result_too_large",
            )
        try:
            reply = orjson.loads(msg.data)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            raise AgentOffline(f"agent {owner} sent an unreadable answer") from None
        if "error" in reply:
            # Same code, same status as when the HTPC refuses it itself (403 not allowed, 408 timeout).
            raise _query_error(QueryError(f"agent {owner}: {reply.get('message')}"), code=str(reply["error"]))
        return _answer(
            [str(c) for c in reply.get("columns", [])],
            orjson.dumps(reply.get("rows", [])),
            bool(reply.get("truncated")),
            None,
            answered_by=owner,
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.close()
        if self._network is not None:
            self._network.close()


#: HTTP status of each query error code (the rest are 400).
_STATUS = {
    "query_timeout": 408,
    "query_not_allowed": 403,
    "result_too_large": 422,
    "value_too_large": 422,
    "query_too_complex": 422,
}


def _query_error(exc: QueryError, code: str | None = None) -> ReplicatorError:
    err = BadRequest(str(exc))
    err.code = code or exc.code
    err.status = _STATUS.get(err.code, 400)
    return err
