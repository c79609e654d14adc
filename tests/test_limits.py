"""Resource limits: a full disk under the agent, and a full stream on the server.

Full disk: the agent's database lives on a small tmpfs mounted by the test
(root only; elsewhere `PRAGMA max_page_count` stands in for it). Writes fail
with StorageFull, change nothing, corrupt nothing, and succeed again once
space is back. Full stream: AGENT_CHANGES made with `max_bytes` and discard
new; the publisher keeps the records locally and retries until the operator
raises the limit, and then nothing is missing.
"""

from __future__ import annotations

import sqlite3
import subprocess
from pathlib import Path

import nats
import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from agent_client import STREAM_NAME, AgentStorage, FlushTimeout, Migration, StorageFull
from tests.support.faults import small_tmpfs
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import assert_exactly_once, read_agent_stream

SCHEMA = [Migration(1, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")]


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT count(*) FROM docs").fetchone()[0])
    finally:
        conn.close()


async def test_full_disk_fails_clearly_and_recovers(tmp_path: Path, nats_server: NatsServer) -> None:
    mount = tmp_path / "small"
    with small_tmpfs(mount, "2m") as mounted:
        st = AgentStorage("disk-agent", mount, nats_url=nats_server.url)
        await st.open()
        try:
            await st.migrate(SCHEMA)
            await st.set_visibility("docs", "always")
            if not mounted:  # stand-in: cap the database file instead of the filesystem
                pages = int((await st.query_local("PRAGMA page_count"))[0]["page_count"]) + 40
                async with st.transaction() as tx:  # a connection setting: the writer's connection
                    await tx.execute(f"PRAGMA max_page_count = {pages}")
            body = "x" * 4000
            written = 0
            with pytest.raises(StorageFull):
                for i in range(5000):
                    await st.write_data("docs", {"id": i, "body": body})
                    written += 1
            assert written > 0
            # the failed write changed nothing and the file is intact
            assert _count(st.db_path) == written
            check = await st.query_local("PRAGMA integrity_check")
            assert check[0]["integrity_check"] == "ok"
            with pytest.raises(StorageFull):
                await st.batch_write([{"table": "docs", "data": {"id": 10_000 + j, "body": body}} for j in range(50)])
            assert _count(st.db_path) == written
            # space comes back
            if mounted:
                subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
            else:
                async with st.transaction() as tx:
                    await tx.execute("PRAGMA max_page_count = 1073741823")
            await st.write_data("docs", {"id": 99_999, "body": "after"})
            await st.flush(timeout=30)
            assert _count(st.db_path) == written + 1
            last = await st.last_committed_seq()
        finally:
            await st.close()
        messages = await read_agent_stream(nats_server.url, "disk-agent")
        assert_exactly_once(messages, "disk-agent", messages[0].record.epoch, last)


async def test_stream_full_keeps_records_locally_until_limit_raised(tmp_path: Path, nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    config = StreamConfig(
        name=STREAM_NAME,
        subjects=["agents.*.changes"],
        storage=StorageType.FILE,
        max_bytes=64 * 1024,
        discard=DiscardPolicy.NEW,
        duplicate_window=120,
    )
    await js.add_stream(config)
    st = AgentStorage("full-agent", tmp_path / "agent", nats_url=nats_server.url)
    await st.open()
    try:
        await st.migrate(SCHEMA)
        await st.set_visibility("docs", "always")
        for i in range(100):
            await st.batch_write([{"table": "docs", "data": {"body": f"{i}-{j}-" + "y" * 200}} for j in range(10)])
        with pytest.raises(FlushTimeout):
            await st.flush(timeout=3)
        health = await st.health_check()
        assert health["backlog"]["changes"] > 0
        assert health["nats"]["last_error"], "the publisher should say why it cannot publish"
        info = await js.stream_info(STREAM_NAME)
        assert info.state.bytes <= 64 * 1024
        # the operator raises the limit: everything arrives, nothing was dropped
        config.max_bytes = -1
        await js.update_stream(config)
        await st.flush(timeout=30)
        last = await st.last_committed_seq()
    finally:
        await st.close()
        await nc.close()
    messages = await read_agent_stream(nats_server.url, "full-agent")
    # With records in flight, a rejected record can land after a later, smaller one that still fitted: the
    # stream may hold them out of order (the replicator applies by sequence), but each change exactly once.
    seen = sorted(seq for m in messages for seq, *_rest in m.record.changes)
    assert seen == list(range(1, last + 1)), f"{len(seen)} changes on the stream, expected 1..{last} once each"
