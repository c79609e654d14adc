"""`replicator backup` while serving and `replicator restore` after the central store is lost, as an operator runs
them: real `replicator serve` and CLI processes, a real nats-server, a real agent (AgentStorage) writing meanwhile.

The end state is checked by content: every replicated table of the central copy equals the agent's local table
(sorted, type-exact digests), and relay rows without a key are neither lost nor applied twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import nats

from agent_client import STREAM_NAME, AgentStorage, Migration
from replicator.snapshots import MANIFEST, read_manifest, verify
from tests.support.htpc import (
    HtpcProcess,
    agent_session,
    apoll,
    central_db_path,
    client_and_agent,
    run_cli,
    settle_agent,
    table_digest,
)
from tests.support.nats_server import NatsServer

AGENT = "bk-agent"
HTTP_AGENT = "bk-http"
SCHEMA = Migration(
    1,
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, score REAL, raw BLOB);\n"
    "CREATE TABLE kv (k TEXT PRIMARY KEY, v)",
)
TABLES = {"notes": ("id", "body", "score", "raw"), "kv": ("k", "v")}


async def _round(storage: AgentStorage, rng: random.Random, n: int) -> None:
    """`n` transactions of inserts, updates, deletes and key-value overwrites."""
    for i in range(n):
        kind = i % 4
        if kind == 0:
            await storage.batch_write(
                [
                    {"table": "notes", "data": {"body": f"n{i}.{k}", "score": rng.random(), "raw": rng.randbytes(8)}}
                    for k in range(rng.randrange(1, 20))
                ]
            )
        elif kind == 1:
            async with storage.transaction() as tx:
                await tx.execute("UPDATE notes SET body = body || '+', score = -0.0 WHERE id % 7 = ?", (i % 7,))
        elif kind == 2:
            async with storage.transaction() as tx:
                await tx.execute("DELETE FROM notes WHERE id IN (SELECT id FROM notes ORDER BY random() LIMIT 2)")
        else:
            await storage.write_data("kv", {"k": f"k{rng.randrange(10)}", "v": rng.choice([i, f"s{i}", None, 2.5])})


async def _relay_rows(client: httpx.AsyncClient, first: int, n: int) -> None:
    for k in range(first, first + n):
        resp = await client.post(
            "/relay/immediate", json={"agent_id": HTTP_AGENT, "table": "log", "data": {"n": k, "what": f"event {k}"}}
        )
        assert resp.status_code == 202, resp.text


async def _relay_count(client: httpx.AsyncClient) -> tuple[int, int] | None:
    resp = await client.post(
        "/relay/query", json={"agent_id": HTTP_AGENT, "query": "SELECT count(*), count(DISTINCT n) FROM log"}
    )
    if resp.status_code != 200:
        return None
    ((count, distinct),) = resp.json()["rows"]
    return count, distinct


def _assert_converged(data_dir: Path, storage: AgentStorage) -> None:
    for table, columns in TABLES.items():
        local = table_digest(storage.db_path, table, columns)
        assert table_digest(central_db_path(data_dir, AGENT), table, columns) == local, table


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


async def test_backup_while_serving_then_restore_after_losing_the_central_store(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url)
    await asyncio.to_thread(htpc.start)
    rng = random.Random(10)
    backup_dir = tmp_path / "backups" / "first"
    session = client_and_agent(htpc, AGENT, tmp_path / "agent", [SCHEMA], TABLES, nats_url=nats_server.url)
    async with session as (client, storage):
        await _round(storage, rng, 40)
        await _relay_rows(client, 0, 4)
        await settle_agent(client, storage)
        assert await apoll(lambda: _relay_count(client), 15, "relay rows applied") == (4, 4)

        # Online: the agent keeps writing while the backup is taken and streamed.
        writing = asyncio.create_task(_round(storage, rng, 60))
        result = await asyncio.to_thread(run_cli, "backup", "--url", htpc.url, "--to", str(backup_dir))
        await writing
        assert result.returncode == 0, result.stderr
        assert "backup: snapshot" in result.stdout and str(backup_dir) in result.stdout, result.stdout
        manifest = verify(backup_dir)
        assert [f.agent_id for f in manifest.agents] == [AGENT, HTTP_AGENT]
        assert not list((htpc.data_dir / "snapshots").glob(".*")), "the server-side copy is deleted after sending"

        # After the backup: more changes and relay rows, which only the stream holds.
        await _round(storage, rng, 40)
        await _relay_rows(client, 4, 3)
        await settle_agent(client, storage)
        assert await apoll(lambda: _relay_count(client), 15, "relay rows applied") == (7, 7)
        backed_up = next(f for f in manifest.agents if f.agent_id == AGENT)
        assert backed_up.watermark is not None and backed_up.watermark < await storage.last_committed_seq()

        # Lose the central store.
        await asyncio.to_thread(htpc.stop)
        shutil.rmtree(htpc.data_dir / "agents")

        result = await asyncio.to_thread(
            run_cli,
            "restore",
            "--from",
            str(backup_dir),
            "--data-dir",
            str(htpc.data_dir),
            "--nats-url",
            nats_server.url,
        )
        assert result.returncode == 0, result.stderr
        assert f"resumes at stream seq {manifest.stream_seq + 1}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        restored = read_manifest(backup_dir)
        assert table_digest(central_db_path(htpc.data_dir, AGENT), "notes", TABLES["notes"]) == table_digest(
            backup_dir / "agents" / f"{AGENT}.db", "notes", TABLES["notes"]
        )

        # Serve again: it catches up from the stream, and keeps going with new writes.
        await asyncio.to_thread(htpc.start)
        await settle_agent(client, storage)
        _assert_converged(htpc.data_dir, storage)
        assert await apoll(lambda: _relay_count(client), 15, "relay rows") == (7, 7)  # none lost, none twice
        await _round(storage, rng, 10)
        await settle_agent(client, storage)
        _assert_converged(htpc.data_dir, storage)
    assert restored.stamp == manifest.stamp
    await asyncio.to_thread(htpc.stop)


async def test_a_damaged_or_incomplete_backup_is_refused_and_changes_nothing(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url)
    await asyncio.to_thread(htpc.start)
    good = tmp_path / "good"
    session = client_and_agent(htpc, AGENT, tmp_path / "agent", [SCHEMA], TABLES, nats_url=nats_server.url)
    async with session as (client, storage):
        await _round(storage, random.Random(3), 30)
        await settle_agent(client, storage)
        result = await asyncio.to_thread(run_cli, "backup", "--url", htpc.url, "--to", str(good))
        assert result.returncode == 0, result.stderr
        await _round(storage, random.Random(4), 10)
        await settle_agent(client, storage)
    await asyncio.to_thread(htpc.stop)

    agent_file = f"agents/{AGENT}.db"

    def flipped(path: Path) -> None:  # same size, one byte different
        target = path / agent_file
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))

    def truncated_manifest(path: Path) -> None:
        (path / MANIFEST).write_bytes((path / MANIFEST).read_bytes()[:40])

    def escaping_manifest(path: Path) -> None:
        text = (path / MANIFEST).read_text().replace(f'"{agent_file}"', '"agents/../../evil.db"')
        (path / MANIFEST).write_text(text)

    broken = {
        "damaged": (flipped, "is damaged"),
        "incomplete": (lambda p: (p / agent_file).unlink(), "is missing"),
        "no manifest": (lambda p: (p / MANIFEST).unlink(), "no manifest.json"),
        "cut manifest": (truncated_manifest, "not a valid manifest"),
        "escaping path": (escaping_manifest, "not a valid manifest"),
    }
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        consumer_before = (await js.consumer_info(STREAM_NAME, "replicator")).config
        files_before = _tree_digest(htpc.data_dir / "agents")
        for name, (damage, expected) in broken.items():
            copy = tmp_path / name.replace(" ", "-")
            shutil.copytree(good, copy)
            damage(copy)
            result = await asyncio.to_thread(
                run_cli, "restore", "--from", str(copy), "--data-dir", str(htpc.data_dir), "--nats-url", nats_server.url
            )
            assert result.returncode == 1, (name, result.stderr)
            assert expected in result.stderr and "nothing was changed" in result.stderr, (name, result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            assert _tree_digest(htpc.data_dir / "agents") == files_before, name
            assert not list(htpc.data_dir.glob("rebuild-backup-*")) and not list(htpc.data_dir.glob(".staging-*"))
            consumer_after = (await js.consumer_info(STREAM_NAME, "replicator")).config
            assert consumer_after.deliver_policy == consumer_before.deliver_policy, name
            assert consumer_after.opt_start_seq == consumer_before.opt_start_seq, name
    finally:
        await nc.close()
    # The untouched store still serves what it had.
    await asyncio.to_thread(htpc.start)
    async with agent_session(AGENT, tmp_path / "agent", htpc_url=htpc.url, nats_url=nats_server.url) as storage:
        _assert_converged(htpc.data_dir, storage)
    await asyncio.to_thread(htpc.stop)
