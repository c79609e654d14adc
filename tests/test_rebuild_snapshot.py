"""`replicator rebuild` starts from the newest snapshot: with the stream trimmed below what the snapshot covers (the
messages retention would have aged out), the rebuilt central store still equals the agent's tables, and serve
continues from it. Without a snapshot, rebuild says plainly what the stream no longer holds and which agents wait.

Real processes throughout: nats-server, `replicator serve`, `replicator rebuild`, an AgentStorage agent.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import httpx
import nats

from agent_client import STREAM_NAME, AgentStorage, Migration
from replicator.data_dir import DataDir
from replicator.snapshots import list_snapshots, read_manifest
from tests.support.htpc import (
    HtpcProcess,
    apoll,
    central_db_path,
    client_and_agent,
    run_cli,
    settle_agent,
    table_digest,
)
from tests.support.nats_server import NatsServer

AGENT = "rb-agent"
HTTP_AGENT = "rb-http"
SCHEMA = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, n INTEGER)")
COLUMNS = ("id", "body", "n")


async def _writes(storage: AgentStorage, client: httpx.AsyncClient, tag: str, rounds: int) -> None:
    for r in range(rounds):
        await storage.batch_write([{"table": "notes", "data": {"body": f"{tag}{r}.{k}", "n": r}} for k in range(15)])
        async with storage.transaction() as tx:
            await tx.execute("UPDATE notes SET n = n + 100 WHERE id % 4 = ?", (r % 4,))
            await tx.execute("DELETE FROM notes WHERE id = (SELECT min(id) FROM notes)")
    # Relay rows without a key: one applied twice would show as an extra row.
    resp = await client.post("/relay/immediate", json={"agent_id": HTTP_AGENT, "table": "log", "data": {"tag": tag}})
    assert resp.status_code == 202, resp.text


def _relay_tags(data_dir: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{central_db_path(data_dir, HTTP_AGENT)}?mode=ro", uri=True)
    try:
        return sorted(r[0] for r in conn.execute("SELECT tag FROM log"))
    finally:
        conn.close()


async def test_rebuild_from_the_newest_snapshot_with_the_stream_trimmed_below_it(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--snapshot-interval", "0.3"])
    await asyncio.to_thread(htpc.start)
    data = DataDir(htpc.data_dir)
    agent_dir = tmp_path / "agent"
    session = client_and_agent(htpc, AGENT, agent_dir, [SCHEMA], ["notes"], nats_url=nats_server.url)
    async with session as (client, storage):
        await _writes(storage, client, "a", 8)
        last_a = await settle_agent(client, storage)
        await apoll(lambda: _relay_done(client, 1), 15, "relay row a")

        async def snapshot_of_a() -> Path | None:
            for path in list_snapshots(data):
                manifest = read_manifest(path)
                mine = {f.agent_id: f.watermark for f in manifest.agents}
                if mine.get(AGENT) == last_a and HTTP_AGENT in mine:
                    return path
            return None

        snapshot = await apoll(snapshot_of_a, 15, "a snapshot covering round a")
        await asyncio.to_thread(htpc.stop)
        covered = read_manifest(snapshot).stream_seq
        for other in list_snapshots(data):  # only this one, so that rebuild has to replay round b
            if other != snapshot:
                shutil.rmtree(other)

        # Round b, which only the stream holds (no more snapshots).
        htpc.extra_args = ["--snapshot-interval", "0"]
        await asyncio.to_thread(htpc.start)
        await _writes(storage, client, "b", 8)
        await settle_agent(client, storage)
        await apoll(lambda: _relay_done(client, 2), 15, "relay row b")
        await asyncio.to_thread(htpc.stop)

        # Retention trims everything the snapshot covers: a full replay is impossible now.
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.purge_stream(STREAM_NAME, seq=covered + 1)
            assert (await js.stream_info(STREAM_NAME)).state.first_seq == covered + 1
        finally:
            await nc.close()

        result = await asyncio.to_thread(
            run_cli, "rebuild", "--data-dir", str(htpc.data_dir), "--nats-url", nats_server.url, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert f"restored snapshot {snapshot.name}" in result.stderr, result.stderr
        assert f"replaying the stream from seq {covered + 1}" in result.stderr, result.stderr
        assert "aged out" not in result.stderr and "Traceback" not in result.stderr, result.stderr
        local = table_digest(storage.db_path, "notes", COLUMNS)
        assert table_digest(central_db_path(htpc.data_dir, AGENT), "notes", COLUMNS) == local
        assert _relay_tags(htpc.data_dir) == ["a", "b"]

        # Serve continues from the rebuilt store.
        await asyncio.to_thread(htpc.start)
        await _writes(storage, client, "c", 3)
        await settle_agent(client, storage)
        await apoll(lambda: _relay_done(client, 3), 15, "relay row c")
        assert table_digest(central_db_path(htpc.data_dir, AGENT), "notes", COLUMNS) == table_digest(
            storage.db_path, "notes", COLUMNS
        )
        await asyncio.to_thread(htpc.stop)

    # Without a snapshot the trimmed stream cannot rebuild the agent: rebuild says so and names it.
    shutil.rmtree(data.snapshots)
    oldest = data.backup("20000101-000000")  # an old one of a previous rebuild
    oldest.mkdir()
    result = await asyncio.to_thread(
        run_cli, "rebuild", "--data-dir", str(htpc.data_dir), "--nats-url", nats_server.url, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert f"stream seq 1..{covered} aged out" in result.stderr, result.stderr
    assert "1 agent waits for changes the stream no longer holds" in result.stderr and AGENT in result.stderr, (
        result.stderr
    )
    assert len(data.rebuild_backups()) == 2 and not oldest.exists()  # --rebuild-backups-keep 2: the oldest pruned
    assert f"removed {oldest.name}" in result.stderr


async def _relay_done(client: httpx.AsyncClient, n: int) -> bool:
    resp = await client.post("/relay/query", json={"agent_id": HTTP_AGENT, "query": "SELECT count(*) FROM log"})
    return resp.status_code == 200 and resp.json()["rows"] == [[n]]
