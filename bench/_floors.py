"""The floors the speed targets are measured against, each in the same run as the figure it judges.

- `trigger_db`: a scratch database whose `events` table carries agent_client's own capture trigger (installed
  by AgentStorage itself, so the floor follows whatever trigger the current build installs);
- `sqlite_commit_latencies` / `sqlite_batch_rows_per_s`: plain `sqlite3` on that file (WAL, synchronous=NORMAL);
- `nats_round_trips`: core NATS publish -> subscriber on the same server;
- `bare_consume`: a bare nats-py push consumer that reads the stream and inserts each record into plain
  `sqlite3` (one file per agent; records that arrived together share one commit per file; acked after
  the commit), i.e. the work of applying without the replicator's validation, sequencing, dedup and
  bookkeeping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import nats
import orjson
from _common import SCHEMA
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from agent_client import STREAM_NAME, AgentStorage


async def trigger_db(data_dir: Path, name: str = "floor") -> Path:
    """A database with the `events` table and agent_client's capture trigger on it, closed again."""
    st = AgentStorage(name, data_dir, replicate=False)
    await st.open()
    await st.migrate(SCHEMA)
    await st.set_visibility("events", "always")
    await st.close()
    return st.db_path


def plain_connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def sqlite_commit_latencies(conn: sqlite3.Connection, n: int, tag: str = "floor") -> list[float]:
    """Seconds per one-row INSERT + COMMIT (the capture trigger fires inside it)."""
    lat = []
    for i in range(n):
        t = time.perf_counter()
        conn.execute("INSERT INTO events (kind, payload, score) VALUES (?, ?, ?)", (tag, f"row {i}", i * 0.5))
        conn.commit()
        lat.append(time.perf_counter() - t)
    return lat


def sqlite_batch_rows_per_s(conn: sqlite3.Connection, txs: int, rows: int) -> float:
    """Rows/s of `txs` transactions of `rows` rows each, executemany + COMMIT."""
    t = time.perf_counter()
    for i in range(txs):
        conn.executemany(
            "INSERT INTO events (kind, payload, score) VALUES (?, ?, ?)",
            [("bulk", f"{i}-{j}", j / 7) for j in range(rows)],
        )
        conn.commit()
    return txs * rows / (time.perf_counter() - t)


async def nats_round_trips(url: str, n: int, rate: float) -> list[float]:
    """Seconds from a core NATS publish to its delivery to a subscriber on another connection (same server),
    `n` messages paced at `rate`/s (the transport's floor for any replication lag)."""
    pub = await nats.connect(url)
    sub_conn = await nats.connect(url)
    lat: list[float] = []
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        lat.append(time.perf_counter() - float(msg.data))
        if len(lat) >= n:
            done.set()

    await sub_conn.subscribe("bench.rtt", cb=on_msg)
    await sub_conn.flush()
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await pub.publish("bench.rtt", repr(time.perf_counter()).encode())
        await pub.flush()
    await asyncio.wait_for(done.wait(), 30)
    await pub.close()
    await sub_conn.close()
    return lat


class _BareApplier:
    """Applies change records to plain sqlite3 files, one per agent; the caller commits (see `commit`)."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.conns: dict[str, sqlite3.Connection] = {}
        self.tables: dict[tuple[str, str], str] = {}
        self.dirty: set[str] = set()
        self.records = 0
        self.changes = 0

    def _conn(self, agent: str) -> sqlite3.Connection:
        conn = self.conns.get(agent)
        if conn is None:
            conn = plain_connect(self.out_dir / f"{agent}.db")
            conn.execute("CREATE TABLE IF NOT EXISTS _state (k TEXT PRIMARY KEY, v)")
            conn.commit()
            self.conns[agent] = conn
        return conn

    def apply(self, data: bytes) -> None:
        """Insert a change record's rows and its watermark in the agent's open transaction."""
        rec = orjson.loads(data)
        if rec.get("kind", "changes") != "changes":
            return
        agent = rec["agent_id"]
        conn = self._conn(agent)
        layouts = rec["layouts"]
        runs: dict[str, list[list[Any]]] = {}  # rows by statement, each run inserted with one executemany
        for _seq, op, layout_id, values in rec["changes"]:
            if op != "U":
                continue
            layout = layouts[str(layout_id)]
            key = (agent, layout["table"])
            sql = self.tables.get(key)
            if sql is None:
                cols = ", ".join(f'"{c}"' for c in layout["columns"])
                pk = ", ".join(f'"{c}"' for c in layout["pk"])
                conn.execute(f'CREATE TABLE IF NOT EXISTS "{layout["table"]}" ({cols}, PRIMARY KEY ({pk}))')
                sql = f'INSERT OR REPLACE INTO "{layout["table"]}" ({cols}) VALUES ({", ".join("?" * len(values))})'
                self.tables[key] = sql
            runs.setdefault(sql, []).append(values)
            self.changes += 1
        for sql, rows in runs.items():
            conn.executemany(sql, rows)
        conn.execute("INSERT OR REPLACE INTO _state VALUES ('watermark', ?)", (rec["last_seq"],))
        self.dirty.add(agent)
        self.records += 1

    def commit(self) -> None:
        """One commit per agent file touched since the last one (records that arrived together share it)."""
        for agent in self.dirty:
            self.conns[agent].commit()
        self.dirty.clear()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()


async def bare_consume(url: str, out_dir: Path, timeout: float = 600) -> tuple[int, int, float]:
    """Read every message in the stream with a bare push consumer, applying change records to plain sqlite3.

    The subscription's callback only queues a message; an apply task takes whatever has queued, applies it,
    commits each touched agent file once and then acks those messages (so what is acked is durable, as in
    the replicator). Returns (change records applied, row changes applied, seconds from the first message to
    the last); status records are read and skipped. Stops when it has seen as many messages as the stream
    holds."""
    expect = await stream_messages(url)
    nc = await nats.connect(url)
    js = nc.jetstream()
    applier = _BareApplier(out_dir)
    queue: list[Any] = []
    ready = asyncio.Event()
    first: list[float] = []

    async def on_msg(msg: Any) -> None:
        if not first:
            first.append(time.perf_counter())
        queue.append(msg)
        ready.set()

    async def apply_loop() -> float:
        seen = 0
        while seen < expect:
            await ready.wait()
            ready.clear()
            batch = queue[:]
            queue.clear()
            for msg in batch:
                applier.apply(msg.data)
            applier.commit()
            for msg in batch:
                await msg.ack()
            seen += len(batch)
        return time.perf_counter()

    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=20_000, ack_wait=60
    )
    sub = await js.subscribe(
        "agents.*.changes",
        stream=STREAM_NAME,
        cb=on_msg,
        manual_ack=True,
        config=config,
        pending_msgs_limit=200_000,
        pending_bytes_limit=1 << 30,
    )
    try:
        last = await asyncio.wait_for(apply_loop(), timeout)
    finally:
        await sub.unsubscribe()
        await nc.close()
        applier.close()
    return applier.records, applier.changes, last - first[0]


async def stream_messages(url: str) -> int:
    """How many messages the stream holds now (change records plus any agent status records)."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(STREAM_NAME)
        return int(info.state.messages)
    finally:
        await nc.close()
