"""End-to-end demo: `replicator serve` (embedded NATS) + the recruiter agent + what the network sees.

Run from the repository root:  .venv/bin/python examples/recruiter/demo.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recruiter_storage import AGENT_ID, RecruiterAgentStorage

from agent_client import NetworkQueryError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_htpc(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    replicator = Path(sys.executable).parent / "replicator"
    cmd = [str(replicator), "serve", "--data-dir", str(data_dir), "--port", str(port)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"replicator serve exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("replicator serve did not become healthy in 30 s")


def show(title: str, value: object) -> None:
    print(f"\n== {title}")
    print(json.dumps(value, indent=2, default=str))


async def run_agent(htpc_url: str, agent_dir: Path) -> None:
    async with RecruiterAgentStorage(agent_dir, htpc_url) as recruiter:
        ada = await recruiter.add_candidate(
            {"name": "Ada Lovelace", "email": "ada@example.com", "skills": ["Python", "SQL"], "experience_years": 12}
        )
        alan = await recruiter.add_candidate(
            {"name": "Alan Turing", "email": "alan@example.com", "skills": ["Go", "Math"], "experience_years": 8}
        )
        await recruiter.open_requisition("Storage engineer", ["Python", "SQLite", "NATS"])
        await recruiter.schedule_interview(
            {"id": "int-1", "candidate_id": ada, "interviewer_agent": "commander", "scheduled_date": "2026-12-01"}
        )
        await recruiter.score(ada, 0.93)  # private: never leaves the agent
        await recruiter.set_status(alan, "on_hold")

        show("local search for Python (query_local, no network)", await recruiter.search_candidates(["Python"]))

        # read-your-writes: the HTPC answers once it has applied everything committed above
        show(
            "network view of candidates (POST /relay/query, fresh)",
            await recruiter.query_network("SELECT id, name, status, skills FROM candidates ORDER BY name"),
        )
        show(
            "interviews: on_demand, answered live by the agent over NATS",
            await recruiter.query_network("SELECT id, candidate_id, scheduled_date FROM interviews", fresh=False),
        )
        try:
            await recruiter.query_network("SELECT * FROM candidate_scores", fresh=False)
        except NetworkQueryError as exc:
            show("private table candidate_scores through the network", {"refused": str(exc)})

        async with httpx.AsyncClient() as client:
            # An HTTP-only agent written from the guide: its dual-write call works unchanged.
            resp = await client.post(
                f"{htpc_url}/relay/immediate",
                json={
                    "agent_id": "commander",
                    "table": "tasks",
                    "data": {"id": "t-1", "title": "hire a storage engineer", "owner": AGENT_ID},
                    "timestamp": time.time(),
                },
            )
            show("guide-style POST /relay/immediate from agent 'commander'", resp.json())
            await asyncio.sleep(0.3)
            join = await client.post(
                f"{htpc_url}/relay/query",
                json={
                    "agent_id": "commander",
                    "query": "SELECT t.title, r.title AS requisition FROM tasks t "
                    f'JOIN "{AGENT_ID}".requisitions r ON r.status = ?',
                    "params": ["open"],
                },
            )
            show("cross-agent join from 'commander' (tasks x recruiter requisitions)", join.json())
            agents = (await client.get(f"{htpc_url}/relay/agents")).json()
            show("GET /relay/agents", agents)
        health = await recruiter.health_check()
        show("agent health_check()", {k: health[k] for k in ("nats", "backlog", "tables", "acked_seq")})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=None, help="keep data here (default: a temp dir)")
    parser.add_argument("--port", type=int, default=0, help="HTTP port of the HTPC (default: a free one)")
    args = parser.parse_args()
    base = args.data_dir or Path(tempfile.mkdtemp(prefix="commander-demo-"))
    port = args.port or _free_port()
    print(f"demo: data under {base}")
    htpc = start_htpc(base / "htpc", port)
    try:
        asyncio.run(run_agent(f"http://127.0.0.1:{port}", base / "agents"))
    finally:
        os.killpg(htpc.pid, signal.SIGTERM)
        htpc.wait(timeout=20)
    print("\ndemo: done (HTPC stopped cleanly)" if htpc.returncode == 0 else f"\ndemo: HTPC exit {htpc.returncode}")
    return 0 if htpc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
