"""The event loop reads only published views: new agents appearing while status and queries are hammered.

The apply thread adds an agent's central copy when its first record arrives. `/metrics`, `/relay/agents`
and `/relay/query` run on the event loop at the same time; they must read the immutable snapshot the apply
thread publishes, never its live state (iterating that while it grows fails with "dictionary changed size
during iteration": a 500).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from agent_client import Migration
from tests.support.htpc import HtpcProcess, agent_session, wait_agent_applied

AGENTS = 20
WORKERS = 4
WAVE = 4  # agents appearing at once
MAX_REQUESTS_PER_WORKER = 1500
ITEMS = Migration(1, "CREATE TABLE items (id INTEGER PRIMARY KEY, v TEXT)")


def _agent_id(i: int) -> str:
    return f"swarm-{i:02d}"


async def test_new_agents_while_status_and_queries_are_hammered(htpc: HtpcProcess, tmp_path: Path) -> None:
    stop = asyncio.Event()
    responses: list[tuple[str, int]] = []
    server_errors: list[tuple[str, int, str]] = []

    async def hammer(worker: int, client: httpx.AsyncClient) -> None:
        for n in range(MAX_REQUESTS_PER_WORKER):
            if stop.is_set():
                return
            target = _agent_id((worker + n) % AGENTS)
            other = _agent_id((worker + n + 1) % AGENTS)
            kind = n % 4
            if kind == 0:
                what, resp = "metrics", await client.get("/metrics")
            elif kind == 1:
                what, resp = "agents", await client.get("/relay/agents")
            elif kind == 2:
                what = "query"
                resp = await client.post(
                    "/relay/query", json={"agent_id": target, "query": "SELECT count(*) FROM items", "params": []}
                )
            else:
                what = "query other"
                resp = await client.post(
                    "/relay/query",
                    json={"agent_id": target, "query": f'SELECT count(*) FROM "{other}".items', "params": []},
                )
            responses.append((what, resp.status_code))
            if resp.status_code >= 500:
                server_errors.append((what, resp.status_code, resp.text[:300]))

    async def agent(i: int) -> tuple[str, int, str]:
        agent_id = _agent_id(i)
        async with agent_session(
            agent_id, tmp_path / agent_id, htpc_url=htpc.url, migrations=[ITEMS], visibility={"items": "always"}
        ) as storage:
            await storage.batch_write([{"table": "items", "data": {"id": j, "v": f"row {j}"}} for j in range(i + 1)])
            await storage.flush(timeout=30)
            return agent_id, await storage.last_committed_seq(), storage.epoch

    async with httpx.AsyncClient(base_url=htpc.url, timeout=30) as client:
        workers = [asyncio.create_task(hammer(w, client)) for w in range(WORKERS)]
        try:
            written: list[tuple[str, int, str]] = []
            for wave in range(0, AGENTS, WAVE):  # agents keep appearing while the hammering goes on
                written += await asyncio.gather(*(agent(i) for i in range(wave, min(wave + WAVE, AGENTS))))
            for agent_id, seq, epoch in written:
                await wait_agent_applied(client, agent_id, seq, epoch=epoch, timeout=60)
        finally:
            stop.set()
            await asyncio.gather(*workers)

        assert server_errors == []
        assert {what for what, _status in responses} == {"metrics", "agents", "query", "query other"}
        assert any(status == 200 for what, status in responses if what == "query")  # queries really ran

        listed = {a["agent_id"]: a for a in (await client.get("/relay/agents")).json()["agents"]}
        assert sorted(a for a in listed if a.startswith("swarm-")) == [_agent_id(i) for i in range(AGENTS)]
        for agent_id, seq, epoch in written:
            assert (listed[agent_id]["watermark"], listed[agent_id]["epoch"]) == (seq, epoch)
        for i in range(AGENTS):
            resp = await client.post(
                "/relay/query",
                json={"agent_id": _agent_id(i), "query": "SELECT count(*), max(id) FROM items", "params": []},
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["rows"] == [[i + 1, i]]
        metrics = await client.get("/metrics")
        assert metrics.status_code == 200
        assert all(_agent_id(i) in metrics.text for i in range(AGENTS))
