"""Periodic snapshots of a real `replicator serve` while a real agent writes: they appear, are complete and
consistent (each verifies; the newest holds exactly the agent's tables), and only the newest `--snapshots-keep`
are kept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from agent_client import Migration
from replicator.data_dir import DataDir
from replicator.snapshots import list_snapshots, read_manifest, verify
from tests.support.htpc import HtpcProcess, apoll, client_and_agent, settle_agent, table_digest
from tests.support.nats_server import NatsServer

AGENT = "snap-agent"
SCHEMA = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, n INTEGER)")


async def test_periodic_snapshots_appear_complete_and_pruned(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--snapshot-interval", "0.5", "--snapshots-keep", "2"])
    await asyncio.to_thread(htpc.start)
    data = DataDir(htpc.data_dir)
    observed: set[str] = set()
    most_at_once = 0

    def look() -> list[Path]:
        nonlocal most_at_once
        found = list_snapshots(data)
        most_at_once = max(most_at_once, len(found))
        observed.update(p.name for p in found)
        return found

    session = client_and_agent(htpc, AGENT, tmp_path / "agent", [SCHEMA], ["notes"], nats_url=nats_server.url)
    async with session as (client, storage):
        # Keep writing for a while: each round moves the consumer on, so a new snapshot is due every interval.
        deadline = time.monotonic() + 15
        n = 0
        while len(observed) < 5 and time.monotonic() < deadline:
            await storage.batch_write([{"table": "notes", "data": {"body": f"b{n}.{k}", "n": n}} for k in range(20)])
            async with storage.transaction() as tx:
                await tx.execute("UPDATE notes SET n = n + 1 WHERE id % 3 = ?", (n % 3,))
            n += 1
            look()
            await asyncio.sleep(0.1)
        assert len(observed) >= 5, f"only {sorted(observed)} appeared"
        assert most_at_once <= 3  # the keep, plus a new one for the moment before the oldest is pruned

        last = await settle_agent(client, storage, timeout=30)
        local = table_digest(storage.db_path, "notes", ("id", "body", "n"))

        async def covering() -> Path | None:
            for path in look():
                entry = next(f for f in read_manifest(path).agents if f.agent_id == AGENT)
                if entry.watermark == last:
                    return path
            return None

        newest = await apoll(covering, 15, "a snapshot holding every change")
    # Stop serving, so that no more snapshots come and go while they are checked.
    await asyncio.to_thread(htpc.stop)
    kept = list_snapshots(data)
    assert len(kept) == 2 and newest in kept
    for path in kept:
        manifest = verify(path)  # every file present, checksums and SQLite integrity
        (entry,) = manifest.agents
        assert entry.epoch == storage.epoch and entry.watermark is not None and entry.watermark <= last
    assert table_digest(newest / "agents" / f"{AGENT}.db", "notes", ("id", "body", "n")) == local
    assert not [p for p in (data.snapshots).iterdir() if p.name.startswith(".")], "no temporary directory left"
