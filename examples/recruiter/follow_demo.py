"""Demo: a sourcing agent follows the recruiter's requisitions and matches them with its own people, locally.

`replicator serve` (embedded NATS), the recruiter agent (examples/recruiter) opening requisitions, and a
"sourcer" agent that keeps a follower copy of the recruiter's `requisitions` (`storage.follow`) and joins it
with its own `people` table in `query_local`, at local speed; it also watches the feed live
(`storage.subscribe`), and keeps answering after the HTPC is stopped.

Run from the repository root:  .venv/bin/python examples/recruiter/follow_demo.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import _free_port, show, start_htpc
from recruiter_storage import AGENT_ID, RecruiterAgentStorage

from agent_client import AgentStorage, Change, Migration, UpToDate

SOURCER = "sourcer-agent"
PEOPLE = Migration(1, "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT NOT NULL, skill TEXT)", "people")
MATCHES = f"""
    SELECT r.title AS requisition, p.name AS person, p.skill
    FROM "{AGENT_ID}".requisitions AS r
    JOIN people AS p ON p.skill IN (SELECT value FROM json_each(r.requirements))
    WHERE r.status = 'open'
    ORDER BY r.title, p.name
"""


async def wait_rows(storage: AgentStorage, sql: str, n: int) -> list[dict[str, object]]:
    for _ in range(200):
        try:
            rows = await storage.query_local(sql)
        except Exception:  # the copy's table appears with its first snapshot
            rows = []
        if len(rows) >= n:
            return rows
        await asyncio.sleep(0.05)
    raise SystemExit(f"no {n} rows from {sql!r}")


async def run(htpc_url: str, agents_dir: Path, htpc_pid: int) -> None:
    async with (
        RecruiterAgentStorage(agents_dir, htpc_url) as recruiter,
        AgentStorage(SOURCER, agents_dir, htpc_url=htpc_url) as sourcer,
    ):
        await recruiter.open_requisition("Storage engineer", ["Python", "SQLite"])
        await sourcer.migrate([PEOPLE])  # private by default: the sourcer's people never leave it
        await sourcer.batch_write(
            {"table": "people", "data": {"id": f"p{i}", "name": name, "skill": skill}}
            for i, (name, skill) in enumerate([("Grace", "SQLite"), ("Linus", "C"), ("Guido", "Python")])
        )
        await sourcer.follow(AGENT_ID, ["requisitions"])  # declared: restored by the next open()
        show(
            "matches (query_local: the sourcer's people x the recruiter's requisitions)",
            await wait_rows(sourcer, MATCHES, 2),
        )

        feed = sourcer.subscribe(AGENT_ID, "requisitions")
        async for event in feed:  # the snapshot, then live changes
            if isinstance(event, UpToDate):
                break
        await recruiter.open_requisition("Kernel hacker", ["C"])
        async for event in feed:
            if isinstance(event, Change):
                show("live change from subscribe()", {"op": event.op, "row": dict(event.row or {})})
                break
        await feed.aclose()
        show("matches after the new requisition", await wait_rows(sourcer, MATCHES, 3))

        os.killpg(htpc_pid, signal.SIGKILL)  # the HTPC crashes: the copy keeps answering
        for _ in range(300):
            follows = (await sourcer.health_check())["follows"]
            if follows[f"{AGENT_ID}.requisitions"]["state"] != "live":
                break
            await asyncio.sleep(0.1)
        show("matches with the HTPC stopped", await sourcer.query_local(MATCHES))
        health = await sourcer.health_check()
        show("sourcer health_check()['follows']", health["follows"])


def main() -> int:
    base = Path(tempfile.mkdtemp(prefix="commander-follow-demo-"))
    port = _free_port()
    print(f"follow demo: data under {base}")
    htpc = start_htpc(base / "htpc", port)
    try:
        asyncio.run(run(f"http://127.0.0.1:{port}", base / "agents", htpc.pid))
    finally:
        if htpc.poll() is None:
            os.killpg(htpc.pid, signal.SIGTERM)
        htpc.wait(timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
