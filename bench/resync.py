"""How long a resync of an agent takes, against floors measured in the same run on the same rows.

.venv/bin/python bench/resync.py [--rows 100000] [--rows-per-tx 1000]

A real nats-server, a real `replicator serve` and a live agent holding --rows rows in one `always` table.
Timed: `POST /relay/agents/<id>/resync` (what `replicator resync` sends) until the HTPC has applied the
agent's whole resync group (the request, the agent's snapshot of its table in one local transaction, its
publication, the central store replacing the agent's copy), then central == local is checked by count and
checksum. Floors, the same rows and bytes without the replicator:

- copy: `INSERT INTO ... SELECT` of the agent's rows into a fresh SQLite file (one transaction);
- publish: the bytes the resync put on the stream, in as many messages, published with nats-py to a scratch
  JetStream stream and acknowledged (256 in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Replicator, machine, nats_server, open_storage, report, table_digest

from agent_client import STREAM_NAME, AgentStorage

AGENT = "bench-resync"
COLUMNS = "id, kind, payload, score"


def digest(path: Path) -> tuple[int, str]:
    """(rows, sha256 over the rows in key order) of the `events` table of the SQLite file `path`."""
    return table_digest(path, columns=COLUMNS, timeout=10)


async def fill(st: AgentStorage, rows: int, per_tx: int) -> None:
    for start in range(0, rows, per_tx):
        await st.batch_write(
            [
                {"table": "events", "data": {"kind": "resync", "payload": f"row {i} " + "x" * 40, "score": i / 7}}
                for i in range(start, min(rows, start + per_tx))
            ]
        )
    await st.flush(timeout=600)


async def agent_state(client: httpx.AsyncClient, rep: Replicator) -> dict[str, object]:
    resp = await client.get(f"{rep.url}/relay/agents/{AGENT}")
    resp.raise_for_status()
    return dict(resp.json())


async def wait_watermark(client: httpx.AsyncClient, rep: Replicator, seq: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(str((await agent_state(client, rep))["watermark"])) >= seq:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{AGENT} not applied up to {seq} within {timeout:g} s")


async def stream_totals(url: str) -> tuple[int, int]:
    """(messages, bytes) AGENT_CHANGES holds."""
    nc = await nats.connect(url)
    try:
        state = (await nc.jetstream().stream_info(STREAM_NAME)).state
        return int(state.messages), int(state.bytes)
    finally:
        await nc.close()


async def resync(st: AgentStorage, rep: Replicator, timeout: float) -> tuple[float, int]:
    """Seconds from the request to the HTPC having applied the agent's resync group; its last change's seq."""
    before = await st.last_committed_seq()
    async with httpx.AsyncClient(timeout=30) as client:
        started = time.perf_counter()
        resp = await client.post(f"{rep.url}/relay/agents/{AGENT}/resync", json={"reason": "bench/resync.py"})
        if resp.status_code != 202:
            raise RuntimeError(f"resync request refused: {resp.status_code} {resp.text}")
        deadline = time.monotonic() + timeout
        while (last := await st.last_committed_seq()) <= before:  # the agent committed its snapshot group
            if time.monotonic() > deadline:
                raise TimeoutError("the agent never took the resync snapshot")
            await asyncio.sleep(0.01)
        await wait_watermark(client, rep, last, timeout)
        return time.perf_counter() - started, last


def copy_floor(source: Path, base: Path) -> float:
    target = base / "floor-copy.db"
    started = time.perf_counter()
    conn = sqlite3.connect(target)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("ATTACH DATABASE ? AS src", (f"file:{source}?mode=ro",))
        conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, payload TEXT, score REAL)")
        conn.execute(f"INSERT INTO events ({COLUMNS}) SELECT {COLUMNS} FROM src.events")
        conn.commit()
    finally:
        conn.close()
    return time.perf_counter() - started


async def publish_floor(url: str, messages: int, size: int, window: int = 256) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="BENCH_FLOOR", subjects=["bench.floor"])
        payload = b"x" * size
        started = time.perf_counter()
        for first in range(0, messages, window):
            count = min(window, messages - first)
            await asyncio.gather(*(js.publish("bench.floor", payload) for _ in range(count)))
        elapsed = time.perf_counter() - started
        await js.delete_stream("BENCH_FLOOR")
        return elapsed
    finally:
        await nc.close()


async def main(args: argparse.Namespace) -> None:
    print(f"resync of a {args.rows:,}-row agent; {machine()}")
    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "js") as (url, _proc):
        base = Path(tmp)
        rep = Replicator(base / "htpc", url)
        rep.start()
        try:
            st = await open_storage(base / "agent", AGENT, url)
            try:
                await fill(st, args.rows, args.rows_per_tx)
                async with httpx.AsyncClient(timeout=30) as client:
                    await wait_watermark(client, rep, await st.last_committed_seq(), args.timeout)
                messages, size = await stream_totals(url)
                seconds, last = await resync(st, rep, args.timeout)
                after_messages, after_size = await stream_totals(url)
                local = digest(st.db_path)
                central = digest(base / "htpc" / "agents" / f"{AGENT}.db")
                if central != local:
                    raise AssertionError(f"after the resync central {central} != local {local}")
                sent_messages, sent_bytes = after_messages - messages, after_size - size
                report(f"resync of {args.rows:,} rows: request -> applied centrally", seconds, "s")
                report("  rows/s", args.rows / seconds, "rows/s")
                report("  stream messages / bytes it published", sent_messages, "msgs", f"{sent_bytes:,} bytes")
                report("  central == local after it (rows, sha256)", local[0], "rows", local[1][:16])
                copy_s = copy_floor(st.db_path, base)
                report("floor: INSERT ... SELECT of the rows into a fresh SQLite file", copy_s, "s")
                publish_s = await publish_floor(url, max(1, sent_messages), max(1, sent_bytes // max(1, sent_messages)))
                report("floor: nats-py publish of the same bytes, acked (256 in flight)", publish_s, "s")
                report("resync / (copy floor + publish floor)", seconds / (copy_s + publish_s), "x")
                print(f"  (the agent's last change after the resync: seq {last})")
            finally:
                await st.close()
        finally:
            rep.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows the agent holds")
    parser.add_argument("--rows-per-tx", type=int, default=1000, help="rows per transaction while filling")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds each wait may take")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rows_per_tx < 1 or args.timeout <= 0:
        parser.error("--rows and --rows-per-tx must be at least 1, --timeout positive")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
