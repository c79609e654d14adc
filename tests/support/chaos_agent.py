"""A chaos-test agent: random transactions forever, and a log of every committed state.

    python -m tests.support.chaos_agent DATA_DIR AGENT_ID NATS_URL HISTORY_FILE SEED [--flush-and-exit]

Each transaction mixes inserts, updates, deletes, primary-key changes and
multi-row updates on two replicated tables (and writes a private table that
must never leave). Inside the transaction it reads the new last sequence and a
checksum of the replicated tables, and after the commit appends
`<seq> <checksum>` to HISTORY_FILE: the central copy must always equal one of
these states (a committed prefix). SIGKILL may lose the last history line,
never a committed transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import sqlite3
import sys
from pathlib import Path

from agent_client import AgentStorage, Migration

REPLICATED = ("items", "tags")

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, price REAL, data BLOB);
        CREATE TABLE tags (k TEXT PRIMARY KEY, v TEXT, n INTEGER);
        CREATE TABLE secrets (id INTEGER PRIMARY KEY, s TEXT);
        """,
    )
]


STATE_QUERIES = ("SELECT * FROM items ORDER BY id", "SELECT * FROM tags ORDER BY k")


def checksum_rows(tables: list[list[tuple[object, ...]]]) -> str:
    """sha256 over the replicated tables' rows in key order (values with their exact Python types)."""
    digest = hashlib.sha256()
    for rows in tables:
        for row in rows:
            digest.update(repr(row).encode())
        digest.update(b"|")
    return digest.hexdigest()


def state_checksum(conn: sqlite3.Connection) -> tuple[str, int]:
    """Checksum and row count of the replicated tables as `conn` sees them."""
    tables = [[tuple(r) for r in conn.execute(q)] for q in STATE_QUERIES]
    return checksum_rows(tables), sum(len(t) for t in tables)


async def random_transaction(storage: AgentStorage, rng: random.Random) -> tuple[int, str]:
    async with storage.transaction() as tx:
        for _ in range(rng.randint(1, 5)):
            op = rng.random()
            item = rng.randint(1, 250)
            if op < 0.35:
                await tx.execute(
                    "INSERT OR REPLACE INTO items (id, name, qty, price, data) VALUES (?, ?, ?, ?, ?)",
                    (
                        item,
                        f"item-{item}-{rng.randint(0, 9999)}",
                        rng.randint(-(2**40), 2**40),
                        rng.choice([rng.random() * 1e6, -0.0, 1e-310]),
                        rng.randbytes(rng.randint(0, 16)),
                    ),
                )
            elif op < 0.55:
                await tx.execute("UPDATE items SET qty = qty + 1, price = ? WHERE id = ?", (rng.random(), item))
            elif op < 0.65:
                await tx.execute("DELETE FROM items WHERE id = ?", (item,))
            elif op < 0.75:
                await tx.execute("UPDATE OR IGNORE items SET id = ? WHERE id = ?", (rng.randint(251, 400), item))
            elif op < 0.82:
                await tx.execute("UPDATE items SET name = name || '+' WHERE id % 11 = ?", (rng.randint(0, 10),))
            elif op < 0.95:
                key = f"tag-{rng.randint(1, 60)}"
                await tx.execute(
                    "INSERT INTO tags (k, v, n) VALUES (?, ?, 1) "
                    "ON CONFLICT (k) DO UPDATE SET n = n + 1, v = excluded.v",
                    (key, "é✓" * rng.randint(0, 3)),
                )
            else:
                await tx.execute("INSERT INTO secrets (s) VALUES (?)", ("private-" + str(rng.random()),))
        rows = await tx.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'")
        seq = int(rows[0]["seq"]) if rows else 0
        tables = [[tuple(r.values()) for r in await tx.execute(q)] for q in STATE_QUERIES]
        checksum = checksum_rows(tables)
    return seq, checksum


async def main(argv: list[str]) -> int:
    data_dir, agent_id, nats_url, history, seed = argv[:5]
    flush_and_exit = "--flush-and-exit" in argv
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    rng = random.Random(int(seed))
    async with AgentStorage(agent_id, Path(data_dir), nats_url=nats_url) as storage:
        await storage.migrate(MIGRATIONS)
        for table in REPLICATED:
            await storage.set_visibility(table, "always")
        print("ready", flush=True)
        if flush_and_exit:
            await storage.flush(timeout=60)
            print("flushed", await storage.last_committed_seq(), flush=True)
            return 0
        with open(history, "a", buffering=1) as out:
            n = 0
            while not stop.is_set():
                seq, checksum = await random_transaction(storage, rng)
                out.write(f"{seq} {checksum}\n")
                n += 1
                if n % 50 == 0:
                    print("committed", n, seq, flush=True)
                await asyncio.sleep(rng.random() * 0.004)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
