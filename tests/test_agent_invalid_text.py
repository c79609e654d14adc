"""TEXT whose bytes are not UTF-8 (stored by another process) replicates exactly and never wedges anything.

SQLite stores `CAST(X'C3FF28' AS TEXT)` without complaint; Python's sqlite3 cannot decode it. Every reader
of agent data reads it as `InvalidText`, the wire carries it as `{"t": base64}`, and the HTPC's copy holds
the same bytes as TEXT. Real nats-server, real `replicator serve`, another process writing with sqlite3.
"""

from __future__ import annotations

import base64
import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import nats
import orjson

from agent_client import InvalidText, query_subject, run_read_only
from tests.support.htpc import HtpcProcess, agent_session, sqlite_rows, wait_agent_applied
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import create_tables, read_agent_stream, storage

BAD = b"\xc3\xff("  # not UTF-8
BAD_WIRE = {"t": base64.b64encode(BAD).decode()}
SCHEMA = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, b BLOB)",
    "CREATE TABLE k (name TEXT PRIMARY KEY, n INTEGER)",
    "CREATE TABLE od (id INTEGER PRIMARY KEY, v TEXT)",
)


def other_process(db: Path, *statements: str) -> None:
    """Run SQL with a plain sqlite3 connection in a process of its own (as any other program would)."""
    script = (
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1])\nfor s in sys.argv[2:]:\n    c.execute(s)\nc.commit()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(db), *statements], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


@contextlib.asynccontextmanager
async def nats_client(url: str) -> AsyncIterator[nats.NATS]:
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=3)
    try:
        yield nc
    finally:
        await nc.close()


async def test_invalid_text_is_published_queried_and_never_wedges_the_publisher(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with storage(tmp_path, nats_server.url) as st, nats_client(nats_server.url) as nc:
        await create_tables(st, *SCHEMA, always=["t", "k"])
        await st.set_visibility("od", "on_demand")
        await st.write_data("t", {"id": 1, "v": "fine"})
        await st.flush()
        other_process(
            st.db_path,
            "INSERT INTO t VALUES (2, CAST(X'C3FF28' AS TEXT), CAST('blob' AS BLOB))",
            "INSERT INTO k VALUES (CAST(X'FF' AS TEXT), 1)",
            "INSERT INTO od VALUES (1, CAST(X'C3FF28' AS TEXT))",
        )
        await st.flush(timeout=10)  # before: "Could not decode to UTF-8" on every attempt, forever
        other_process(st.db_path, "DELETE FROM k WHERE n = 1")  # the key is the invalid text
        await st.flush(timeout=10)
        health = await st.health_check()
        assert health["blocked"] is None and health["backlog"]["changes"] == 0

        # every agent-side reader gives the bytes back as InvalidText
        rows = await st.query_local("SELECT v, typeof(v) AS ty, b FROM t WHERE id = 2")
        assert rows == [{"v": BAD, "ty": "text", "b": b"blob"}]
        assert type(rows[0]["v"]) is InvalidText and type(rows[0]["b"]) is bytes
        async with st.transaction() as tx:
            assert (await tx.execute("SELECT v FROM t WHERE id = 2"))[0]["v"] == InvalidText(BAD)
        msg = await nc.request(query_subject("agent-1"), orjson.dumps({"query": "SELECT id, v FROM od"}), timeout=10)
        assert orjson.loads(msg.data)["rows"] == [[1, BAD_WIRE]]
        db_path = st.db_path

    # the records carry the tag, for row images and for keys
    messages = await read_agent_stream(nats_server.url, "agent-1")
    raw = [orjson.loads(m.data) for m in messages]
    changes = [c for r in raw for c in r["changes"]]
    assert [2, BAD_WIRE, {"b": base64.b64encode(b"blob").decode()}] in [c[3] for c in changes if c[1] == "U"]
    assert [{"t": "/w=="}, 1] in [c[3] for c in changes if c[1] == "U"]
    assert [{"t": "/w=="}] in [c[3] for c in changes if c[1] == "D"]

    # the read-only query runner (the HTPC's too) answers it the way it answers a BLOB: tagged
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        result = run_read_only(
            conn, "SELECT v, b FROM t WHERE id = 2", None, policy=lambda _db, _t: True, timeout_s=2, max_rows=10
        )
        assert result.rows == [[BAD_WIRE, {"b": base64.b64encode(b"blob").decode()}]]
        assert conn.text_factory is str, "the runner left the caller's connection as it found it"
    finally:
        conn.close()


async def test_the_central_copy_holds_the_same_bytes_as_text(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        agent_session("bytes-agent", tmp_path / "agent", htpc_url=htpc.url) as st,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        await create_tables(st, SCHEMA[0], always=["t"])
        other_process(st.db_path, "INSERT INTO t VALUES (2, CAST(X'C3FF28' AS TEXT), NULL)")
        await st.write_data("t", {"id": 3, "v": "after it"})
        await st.flush(timeout=10)
        await wait_agent_applied(client, "bytes-agent", await st.last_committed_seq(), epoch=st.epoch)
        resp = await client.post("/relay/query", json={"agent_id": "bytes-agent", "query": "SELECT id, v FROM t"})
        assert resp.status_code == 200, resp.text
        assert sorted(resp.json()["rows"], key=lambda r: r[0]) == [[2, BAD_WIRE], [3, "after it"]]
    central = sqlite_rows(htpc.central_db("bytes-agent"), "SELECT id, typeof(v), hex(v) FROM t ORDER BY id")
    assert central == [(2, "text", BAD.hex().upper()), (3, "text", b"after it".hex().upper())]
