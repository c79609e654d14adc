"""Partitions through a loopback TCP proxy: the agent cut off from NATS, and the HTPC cut off from NATS.

In both cases local writes continue at local speed, and once the link heals
the backlog drains and the central copy equals the agent's tables.
"""

from __future__ import annotations

import time
from pathlib import Path

from agent_client import AgentStorage, Migration
from tests.support.htpc import HtpcProcess, poll, table_digest
from tests.support.nats_server import NatsServer
from tests.support.tcp_proxy import TcpProxy

SCHEMA = [Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, n INTEGER)")]


async def _open(base: Path, agent_id: str, nats_url: str) -> AgentStorage:
    st = AgentStorage(agent_id, base, nats_url=nats_url)
    await st.open()
    await st.migrate(SCHEMA)
    await st.set_visibility("notes", "always")
    return st


async def _write(st: AgentStorage, n: int, tag: str) -> float:
    """Write n rows, return the slowest single write in seconds."""
    slowest = 0.0
    for i in range(n):
        t = time.perf_counter()
        await st.write_data("notes", {"body": f"{tag}-{i}", "n": i})
        slowest = max(slowest, time.perf_counter() - t)
    return slowest


def _converged(htpc: HtpcProcess, agent_db: Path, agent_id: str, last_seq: int) -> bool:
    agents = htpc.agents()
    info = agents.get(agent_id)
    if info is None or info["watermark"] != last_seq:
        return False
    return table_digest(htpc.central_db(agent_id), "notes", ["id", "body", "n"]) == table_digest(
        agent_db, "notes", ["id", "body", "n"]
    )


async def test_agent_cut_off_from_nats_keeps_writing_and_drains(tmp_path: Path, nats_server: NatsServer) -> None:
    htpc = HtpcProcess(tmp_path / "htpc", nats_server.url)
    htpc.start()
    try:
        with TcpProxy(nats_server.port) as proxy:
            st = await _open(tmp_path / "agent", "cut-agent", proxy.url)
            try:
                await _write(st, 50, "before")
                await st.flush(timeout=15)
                proxy.cut()
                slowest = await _write(st, 500, "during")
                health = await st.health_check()
                assert slowest < 0.5, f"a local write took {slowest:.3f}s while NATS was unreachable"
                assert health["backlog"]["changes"] >= 500, health["backlog"]
                assert not health["nats"]["connected"]
                applied_during = htpc.agents().get("cut-agent", {}).get("watermark", 0)
                proxy.heal()
                await st.flush(timeout=30)
                last = await st.last_committed_seq()
                assert applied_during < last
                poll(lambda: _converged(htpc, st.db_path, "cut-agent", last) or None, 30, "central copy to converge")
                assert (await st.health_check())["backlog"]["changes"] == 0
            finally:
                await st.close()
    finally:
        htpc.close()


async def test_htpc_cut_off_from_nats_catches_up_after_heal(tmp_path: Path, nats_server: NatsServer) -> None:
    with TcpProxy(nats_server.port) as proxy:
        htpc = HtpcProcess(tmp_path / "htpc", proxy.url)
        htpc.start()
        st = await _open(tmp_path / "agent", "far-agent", nats_server.url)
        try:
            await _write(st, 20, "before")
            await st.flush(timeout=15)
            last = await st.last_committed_seq()
            poll(lambda: _converged(htpc, st.db_path, "far-agent", last) or None, 30, "first rows applied")
            proxy.cut()
            await _write(st, 300, "during")
            await st.flush(timeout=15)  # the agent still reaches JetStream; the HTPC does not
            health = poll(
                lambda: ((h := htpc.get("/health").json())["status"] == "degraded" and h) or None,
                20,
                "HTPC to notice it lost NATS",
            )
            assert health["nats"]["connected"] is False
            assert htpc.agents()["far-agent"]["watermark"] == last  # nothing applied while cut off
            proxy.heal()
            final = await st.last_committed_seq()
            poll(lambda: _converged(htpc, st.db_path, "far-agent", final) or None, 45, "catch-up after heal")
        finally:
            await st.close()
            htpc.close()
