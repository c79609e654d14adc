"""The relay API's fast paths keep every answer and every guard of the slow ones.

* Tokens are found through an index of their digests: a revoked token (in this process, by another
  `replicator auth` process, or removed from the data by hand) stops working at once.
* `principal` is a coroutine dependency (no thread-pool hop) and still answers 401/403 as before.
* A query first tries the event loop within tight bounds; whatever passes them (time, value size, answer
  size, an error) is run again on a query thread, and the answer or error is the thread's, byte for byte.
* A `min_seq` already applied is answered without waiting.
* A response's head and body are sent together: whatever is written arrives whole and in order.

Real SQLite files throughout; no timed assertions (bounds are chosen so the outcome does not depend on speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.authentication import AuthenticationMiddleware

from replicator._http_guard import _Coalescing
from replicator.auth import AuthStore, Principal
from replicator.auth_backend import UNKNOWN_TOKEN, TokenAuthBackend, principal
from replicator.errors import ReplicatorError
from replicator.query_engine import QueryEngine, _Inline
from replicator.store_view import AgentView, StoreView, TableView

ROWS = 20_000
BIG_TEXT = 100_000  # over the inline value cap (64 KiB), well under the real one
ENDLESS = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"


# ------------------------------------------------------------------------------------------------ auth
def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _app(store: AuthStore) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ReplicatorError)
    async def _error(_req: Request, exc: ReplicatorError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/who")
    async def who(caller: Principal | None = Depends(principal)) -> dict[str, Any]:
        assert caller is not None
        return {"kind": caller.kind, "name": caller.name}

    app.add_middleware(AuthenticationMiddleware, backend=TokenAuthBackend(lambda: store))
    return app


def test_principal_is_a_coroutine_dependency() -> None:
    assert inspect.iscoroutinefunction(principal)  # FastAPI would run a plain function in its thread pool


def test_index_follows_every_change_in_process(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    _seed, agent_token = store.add_agent("agent-a")
    ops_token = store.add_operator("ops")
    assert store.authenticate(agent_token) == Principal("agent", "agent-a")
    assert store.authenticate(ops_token) == Principal("operator", "ops")
    assert store.authenticate("not-a-token") is None and store.authenticate("") is None
    # New credentials for the same agent: the old token is dead, the new one works.
    _seed, renewed = store.add_agent("agent-a")
    assert store.authenticate(agent_token) is None
    assert store.authenticate(renewed) == Principal("agent", "agent-a")
    assert store.revoke("agent-a")
    assert store.authenticate(renewed) is None
    assert store.authenticate(ops_token) == Principal("operator", "ops")


def test_revoked_by_another_process_fails_after_reload(tmp_path: Path) -> None:
    serving = AuthStore(tmp_path / "auth")
    token = serving.add_operator("ops")
    assert serving.authenticate(token) == Principal("operator", "ops")  # the index is built now
    other = AuthStore(tmp_path / "auth")  # `replicator auth revoke ops` in another process
    assert other.revoke("ops")
    serving.mtime = 0.0  # the watcher's reload, whatever the file system's timestamp resolution
    assert serving.reload()
    assert serving.authenticate(token) is None


def test_entry_removed_by_hand_fails_at_once(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    token = store.add_operator("ops")
    assert store.authenticate(token) is not None
    del store.data["operators"]["ops"]  # not through a method: the index was not told
    assert store.authenticate(token) is None
    store.data["operators"]["ops"] = {"token_sha256": "0" * 64}  # a different entry under the same name
    assert store.authenticate(token) is None


async def test_revoked_token_is_401_on_the_next_request(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    _seed, token = store.add_agent("agent-a")
    transport = httpx.ASGITransport(app=_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(3):
            assert (await client.get("/who", headers=_bearer(token))).json() == {"kind": "agent", "name": "agent-a"}
        store.revoke("agent-a")
        resp = await client.get("/who", headers=_bearer(token))
    assert resp.status_code == 401
    assert resp.json() == {"error": "unauthorized", "message": UNKNOWN_TOKEN}


# ----------------------------------------------------------------------------------------------- query
class _Store:
    """The two things QueryEngine reads of the central store: its view and where an agent's file is."""

    def __init__(self, path: Path) -> None:
        table = TableView("items", "relay", "always", ("id", "name", "v"), ("", "", ""), ("id",), None)
        big = TableView("big", "relay", "always", ("id", "t"), ("", ""), ("id",), None)
        agent = AgentView(
            "a", path, None, 0, 0, None, None, None, 0, 0, None, MappingProxyType({"items": table, "big": big})
        )
        self.view = StoreView(MappingProxyType({"a": agent}))
        self.path = path

    def path_for(self, _agent_id: str) -> Path:
        return self.path


class _Consumer:
    """Applied up to `watermark`; waiting is counted (and never needed by the tests that forbid it)."""

    def __init__(self, watermark: int) -> None:
        self.watermark = watermark
        self.waits = 0

    def applied(self, _agent_id: str) -> tuple[str | None, int]:
        return "ep-1", self.watermark

    async def wait_applied(self, _agent_id: str, min_seq: int, timeout: float, epoch: str | None = None) -> bool:
        self.waits += 1
        await asyncio.sleep(0)
        return self.watermark >= min_seq and epoch in (None, "ep-1")


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("central") / "a.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, v REAL)")
    conn.executemany("INSERT INTO items VALUES (?, ?, ?)", [(i, f"n{i}", i / 2) for i in range(1, ROWS + 1)])
    conn.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, t TEXT)")
    conn.execute("INSERT INTO big VALUES (1, ?)", ("x" * BIG_TEXT,))
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def engines(central: Path) -> Iterator[tuple[QueryEngine, QueryEngine]]:
    """(tries the loop first, always a thread), over the same file."""
    store: Any = _Store(central)
    inline = QueryEngine(store, None, lambda: None)
    threaded = QueryEngine(store, None, lambda: None, inline=None)
    try:
        yield inline, threaded
    finally:
        inline.close()
        threaded.close()


async def _both(engines: tuple[QueryEngine, QueryEngine], sql: str, params: Any = None, **kw: Any) -> bytes:
    """The inline engine's answer, checked equal to the threaded one's."""
    inline, threaded = engines
    answer = await inline.query("a", sql, params, **kw)
    assert answer == await threaded.query("a", sql, params, **kw)
    return answer


async def test_small_query_is_answered_on_the_loop_with_the_same_bytes(
    engines: tuple[QueryEngine, QueryEngine],
) -> None:
    inline, threaded = engines
    await _both(engines, "SELECT 1")  # opens the pooled connection (a query thread's work)
    before = inline.inline_answered
    for i in (1, 77, ROWS):
        answer = orjson.loads(await _both(engines, "SELECT * FROM items WHERE id = ?", [i]))
        assert answer == {"columns": ["id", "name", "v"], "rows": [[i, f"n{i}", i / 2]], "truncated": False,
                          "applied_seq": None}  # fmt: skip
    assert inline.inline_answered == before + 3
    assert threaded.inline_answered == 0 and threaded.inline_rerun == 0
    # The pooled connection went back with its busy timeout restored (query threads wait on locks).
    key = (inline.store.path_for("a"), ())
    conn = inline._pool.take_idle(key)
    assert conn is not None
    try:
        assert conn.execute("PRAGMA busy_timeout").fetchone() == (2000,)
        assert conn.progress_ops is None
    finally:
        inline._pool.release(key, conn)


async def test_query_past_the_loop_budget_is_rerun_on_a_thread(engines: tuple[QueryEngine, QueryEngine]) -> None:
    inline, _threaded = engines
    await _both(engines, "SELECT 1")
    sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) SELECT count(*) FROM c"
    before = inline.inline_rerun
    answer = orjson.loads(await _both(engines, sql))
    assert answer["rows"] == [[300_000]]
    assert inline.inline_rerun == before + 1
    # Slow on its thread too: the same text goes to a thread directly for a while (no second try on the loop).
    assert orjson.loads(await inline.query("a", sql, None))["rows"] == [[300_000]]
    assert inline.inline_rerun == before + 1


async def test_zero_budget_still_answers_everything(central: Path) -> None:
    store: Any = _Store(central)
    engine = QueryEngine(store, None, lambda: None, inline=_Inline(budget_s=0.0, progress_ops=1))
    try:
        await engine.query("a", "SELECT 1", None)
        answer = orjson.loads(await engine.query("a", "SELECT count(*), sum(id) FROM items WHERE v > ?", [0]))
        assert answer["rows"] == [[ROWS, ROWS * (ROWS + 1) // 2]]
        assert engine.inline_rerun >= 1
    finally:
        engine.close()


async def test_values_and_answers_over_the_inline_caps_come_whole(engines: tuple[QueryEngine, QueryEngine]) -> None:
    inline, _threaded = engines
    await _both(engines, "SELECT 1")
    answer = orjson.loads(await _both(engines, "SELECT t FROM big WHERE id = 1"))
    assert answer["rows"] == [["x" * BIG_TEXT]]
    many = orjson.loads(await _both(engines, "SELECT id, name FROM items WHERE id <= 9000 ORDER BY id"))
    assert len(many["rows"]) == 9000 and many["rows"][-1] == [9000, "n9000"]
    wide = orjson.loads(await _both(engines, "SELECT id, name, printf('%0500d', id) FROM items WHERE id <= 1000"))
    assert len(wide["rows"]) == 1000 and wide["rows"][999][2] == "1000".rjust(500, "0")  # > 256 KiB encoded
    assert inline.inline_rerun >= 2


@pytest.mark.parametrize(
    ("sql", "code", "status"),
    [
        (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
            "query_timeout",
            408,
        ),
        ("DELETE FROM items", "query_not_allowed", 403),
        ("SELECT * FROM _cr_nothing", None, 400),
        ("SELEC 1", "invalid_query", 400),
        ("SELECT length(randomblob(100000000))", "value_too_large", 422),
    ],
)
async def test_refused_queries_keep_their_error(
    engines: tuple[QueryEngine, QueryEngine], sql: str, code: str | None, status: int
) -> None:
    inline, threaded = engines
    await _both(engines, "SELECT 1")
    errors: list[ReplicatorError] = []
    for engine in (inline, threaded, inline):  # the third: a text remembered as slow goes to a thread directly
        with pytest.raises(ReplicatorError) as caught:
            await engine.query("a", sql, None, timeout_ms=300)
        errors.append(caught.value)
    assert len({(e.code, e.status, str(e)) for e in errors}) == 1, [(e.code, e.status, str(e)) for e in errors]
    assert errors[0].status == status
    if code is not None:
        assert errors[0].code == code


async def test_applied_min_seq_is_answered_without_waiting(central: Path) -> None:
    consumer = _Consumer(watermark=10)
    store: Any = _Store(central)
    engine = QueryEngine(store, consumer, lambda: None)  # type: ignore[arg-type]
    try:
        answer = orjson.loads(await engine.query("a", "SELECT count(*) FROM items", None, min_seq=10, epoch="ep-1"))
        assert answer["rows"] == [[ROWS]] and answer["applied_seq"] == 10
        assert consumer.waits == 0
        # Another epoch, or a sequence not applied yet: the consumer is asked (and says no in time).
        for kw in ({"min_seq": 5, "epoch": "ep-0"}, {"min_seq": 11}):
            with pytest.raises(ReplicatorError) as caught:
                await engine.query("a", "SELECT 1", None, timeout_ms=50, **kw)
            assert caught.value.code == "not_yet_replicated"
        assert consumer.waits == 2
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------ HTTP writes
async def _coalesced_pair() -> tuple[Any, asyncio.StreamReader, Any]:
    """(a _Coalescing over a real TCP client transport, the server side's reader, the server)."""
    accepted: asyncio.Queue[asyncio.StreamReader] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
        await accepted.put(reader)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, _protocol = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    return _Coalescing(transport, loop), await accepted.get(), server


async def test_coalesced_writes_arrive_whole_and_in_order() -> None:
    wrapped, reader, server = await _coalesced_pair()
    try:
        big = bytes(range(256)) * 1024  # over the holding size: goes out at once, after what is held
        wrapped.write(b"HTTP/1.1 200 OK\r\n\r\n")
        assert wrapped.get_write_buffer_size() >= len(b"HTTP/1.1 200 OK\r\n\r\n")  # held for what follows
        wrapped.write(b"body-1;")
        wrapped.write(b"more;")
        wrapped.write(big)
        wrapped.write(b"tail;")
        await asyncio.sleep(0)  # the end of the step: what is held goes out
        wrapped.write(b"last")
        wrapped.close()  # flushes first
        data = await reader.read()
        assert data == b"HTTP/1.1 200 OK\r\n\r\nbody-1;more;" + big + b"tail;last"
    finally:
        server.close()
        await server.wait_closed()


async def test_abort_drops_what_is_held() -> None:
    wrapped, reader, server = await _coalesced_pair()
    try:
        wrapped.write(b"sent;")
        await asyncio.sleep(0)
        assert await reader.readexactly(5) == b"sent;"
        wrapped.write(b"never")
        wrapped.abort()
        rest = b""
        with contextlib.suppress(ConnectionError):
            rest = await reader.read()
        assert rest == b""
    finally:
        server.close()
        await server.wait_closed()
