"""The consumer survives the machine failing under it: a full disk and no file descriptors left.

A real `replicator serve` whose data directory is a small tmpfs (mounted by the
test; root only) or whose open-files limit is lowered with `prlimit` while it
runs. Agents keep writing; the HTPC reports that it cannot apply, keeps every
record (nothing dead-lettered, nothing acked), and when the condition clears it
catches up by itself, without a restart, to central == local by checksum.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from agent_client import Migration, changes_subject
from tests.support.faults import open_files, open_files_limit, resize_tmpfs, set_open_files_limit, small_tmpfs
from tests.support.htpc import (
    HtpcProcess,
    agent_session,
    apoll,
    poll,
    sqlite_rows,
    table_digest,
    wait_agent_applied,
)
from tests.support.nats_server import NatsServer

SCHEMA = [Migration(1, "CREATE TABLE docs (id INTEGER PRIMARY KEY, body TEXT)")]


def _health(htpc: HtpcProcess) -> dict[str, Any]:
    return dict(htpc.get("/health").json())


async def test_a_full_disk_under_the_central_store_is_survived_and_healed_without_a_restart(
    tmp_path: Path, nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    data = tmp_path / "htpc"
    with small_tmpfs(data, "3m") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the full-disk test cannot run here")
        htpc = htpc_factory(nats_server.url, name="htpc")
        htpc.start()
        async with agent_session(
            "full-agent",
            tmp_path / "agent",
            nats_url=nats_server.url,
            migrations=SCHEMA,
            visibility={"docs": "always"},
        ) as agent:
            body = "d" * 4000
            for i in range(1500):  # 6 MB of rows for a 3 MB filesystem
                await agent.write_data("docs", {"id": i, "body": body})
            await agent.flush(timeout=60)
            health = await asyncio.to_thread(
                poll,
                lambda: h if (h := _health(htpc))["consumer"]["apply_failing_since"] else None,
                60,
                "the HTPC reporting that it cannot apply",
            )
            assert health["status"] == "degraded" and health["consumer"]["running"] is True
            assert "full" in (health["consumer"]["last_error"] or "")
            # A record that must be dead-lettered while the disk is full is not lost either.
            nc = await nats.connect(nats_server.url)
            try:
                await nc.jetstream().publish(changes_subject("junk-during-full"), b"not a record")
            finally:
                await nc.close()
            await asyncio.sleep(3)  # let it retry a while against the full disk
            assert htpc.running
            resize_tmpfs(data, "64m")
            last = await agent.last_committed_seq()
            async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
                await wait_agent_applied(client, "full-agent", last, timeout=120)
                letters = await apoll(
                    lambda: _letters(client, "junk-during-full"), 60, "the junk record dead-lettered after all"
                )
            assert len(letters) == 1
            local = table_digest(agent.db_path, "docs", ("id", "body"))
            assert table_digest(htpc.central_db("full-agent"), "docs", ("id", "body")) == local
            assert local[0] == 1500
            health = await asyncio.to_thread(
                poll, lambda: h if (h := _health(htpc))["status"] == "ok" else None, 30, "health ok again"
            )
            assert health["consumer"]["apply_failing_since"] is None
            metrics = htpc.get("/metrics").text
            assert "replicator_apply_failures_total" in metrics
        assert htpc.stop() == 0  # a clean drain after the episode: exit 0, no traceback
        assert "Traceback" not in htpc.log_tail(200)


def _central_watermark(htpc: HtpcProcess, agent: str) -> int:
    path = htpc.central_db(agent)
    if not path.exists():
        return 0
    with contextlib.suppress(sqlite3.Error):
        rows = sqlite_rows(path, "SELECT value FROM _cr_state WHERE key = 'watermark'")
        return int(rows[0][0]) if rows else 0
    return 0


async def _letters(client: httpx.AsyncClient, agent: str) -> list[dict[str, Any]] | None:
    resp = await client.get("/relay/dead-letters", params={"agent_id": agent})
    found = resp.json()["dead_letters"] if resp.status_code == 200 else []
    return list(found) or None


async def test_no_file_descriptors_left_for_new_agents_is_survived_and_healed(
    tmp_path: Path, nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    htpc = htpc_factory(nats_server.url, name="htpc")
    htpc.start()
    agents = [f"fd-agent-{i}" for i in range(12)]
    opened = open_files(htpc.pid)
    normal, _hard = open_files_limit(htpc.pid)
    if not set_open_files_limit(htpc.pid, opened + 4):
        pytest.skip("prlimit is missing or not permitted here; the open-files test cannot run")
    started = time.monotonic()
    async with contextlib.AsyncExitStack() as stack:
        storages = []
        for agent in agents:  # each new agent needs its central database opened: the HTPC runs out
            storage = await stack.enter_async_context(
                agent_session(
                    agent, tmp_path / agent, nats_url=nats_server.url, migrations=SCHEMA, visibility={"docs": "always"}
                )
            )
            await storage.write_data("docs", {"id": 1, "body": agent})
            await storage.flush(timeout=30)
            storages.append(storage)
        await asyncio.sleep(3)  # records arrive and fail to apply for want of file descriptors
        assert htpc.running
        # Read the central files directly: the HTTP side may itself be short of descriptors now.
        central = [a for a in agents if _central_watermark(htpc, a) >= 3]
        assert len(central) < len(agents), "the lowered limit did not bite"
        assert set_open_files_limit(htpc.pid, normal)
        async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
            for storage in storages:
                await wait_agent_applied(client, storage.agent_id, await storage.last_committed_seq(), timeout=120)
        for storage in storages:
            local = table_digest(storage.db_path, "docs", ("id", "body"))
            assert table_digest(htpc.central_db(storage.agent_id), "docs", ("id", "body")) == local
        print(
            f"\n{len(agents) - len(central)} of {len(agents)} agents waited for file descriptors; "
            f"all applied {time.monotonic() - started:.1f}s after the limit was lowered"
        )
        assert _health(htpc)["consumer"]["running"] is True
    assert htpc.stop() == 0
