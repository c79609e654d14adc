"""A stand-alone agent process for crash tests: it writes (and publishes) until it is killed, or flushes and exits.

    python -m tests.support.agent_writer_proc write <data_dir> <agent_id> <nats_url> [seed]
    python -m tests.support.agent_writer_proc flush <data_dir> <agent_id> <nats_url>

`write` prints one JSON line per committed operation: {"n", "committed", "acked", "epoch"} (stdout is flushed
every line, so the parent always knows how far the agent got when it sends SIGKILL). `flush` opens the same
storage, waits until JetStream has acknowledged every committed change, prints {"flushed", "epoch"} and exits 0.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path

from agent_client import AgentStorage, Migration

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, score REAL, raw BLOB);
        CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
        """,
        "crash test tables",
    )
]
MAX_OPS = 200_000  # a safety stop: the parent kills us long before


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def write(st: AgentStorage, seed: int) -> None:
    rng = random.Random(seed)
    await st.migrate(MIGRATIONS)
    await st.set_visibility("notes", "always")
    await st.set_visibility("counters", "always")
    for n in range(MAX_OPS):
        kind = n % 5
        if kind == 0:
            await st.write_data("notes", {"body": f"note {n}", "score": rng.random() * 1e6, "raw": rng.randbytes(8)})
        elif kind == 1:
            await st.write_data("counters", {"name": f"c{rng.randrange(20)}", "value": n})
        elif kind == 2:
            size = rng.randrange(2, 8)
            rows = [{"body": f"batch {n}.{k}", "score": -0.0} for k in range(size)]
            await st.batch_write([{"table": "notes", "data": row} for row in rows])
        elif kind == 3:
            async with st.transaction() as tx:
                await tx.execute("DELETE FROM notes WHERE id = (SELECT min(id) FROM notes)")
                await tx.execute("UPDATE counters SET value = value + 1")
        else:
            async with st.transaction() as tx:  # primary-key change: D(old) + U(new) in one transaction
                await tx.execute(
                    "UPDATE notes SET id = (SELECT max(id) FROM notes) + 1000 WHERE id = (SELECT min(id) FROM notes)"
                )
        emit(
            n=n,
            committed=await st.last_committed_seq(),
            acked=st.acked_seq or 0,
            epoch=st.epoch,
        )
        await asyncio.sleep(0.001 if rng.random() < 0.5 else 0)


async def main(argv: list[str]) -> int:
    mode, data_dir, agent_id, nats_url = argv[:4]
    seed = int(argv[4]) if len(argv) > 4 else 0
    async with AgentStorage(agent_id, Path(data_dir), nats_url=nats_url) as st:
        if mode == "write":
            await write(st, seed)
        elif mode == "flush":
            await st.flush(timeout=30)
            emit(flushed=await st.last_committed_seq(), epoch=st.epoch)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
