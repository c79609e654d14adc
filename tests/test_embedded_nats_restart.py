"""`replicator serve` SIGKILLed with its embedded nats-server: the next start takes over cleanly.

The embedded server runs in its own session (so a Ctrl-C in the terminal reaches only the HTPC, which
drains first), so a SIGKILL of the HTPC leaves it running. The next `serve` finds it through its pid
file, stops it, and starts its own on the same port and store: agents reconnect, nothing is lost,
and no second server ever runs on the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import httpx

from agent_client import Migration
from tests.support.htpc import HtpcProcess, agent_session, table_digest, wait_agent_applied

SCHEMA = [Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")]


def _nats_servers_on(store: Path) -> list[int]:
    conf = str(store / "nats" / "nats-server.conf").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if conf in cmdline and b"nats-server" in cmdline and state != "Z":
                pids.append(int(entry))
    return pids


async def test_a_sigkilled_htpc_restarts_over_its_orphaned_nats_server(
    tmp_path: Path, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    htpc = htpc_factory(None, name="htpc")  # embedded nats-server
    htpc.start()
    nats_url = str(htpc.get("/relay/info").json()["nats_url"])
    async with agent_session(
        "orphan-agent", tmp_path / "agent", nats_url=nats_url, migrations=SCHEMA, visibility={"notes": "always"}
    ) as agent:
        for i in range(20):
            await agent.write_data("notes", {"id": i, "body": "before"})
        await agent.flush(timeout=30)
        first = _nats_servers_on(htpc.data_dir)
        assert len(first) == 1
        htpc.kill()
        assert _nats_servers_on(htpc.data_dir) == first  # orphaned, still serving
        htpc.start()
        after = _nats_servers_on(htpc.data_dir)
        assert len(after) == 1 and after != first  # the orphan stopped, one new server
        assert str(htpc.get("/relay/info").json()["nats_url"]) == nats_url  # same port: agents reconnect
        for i in range(20, 40):
            await agent.write_data("notes", {"id": i, "body": "after"})
        await agent.flush(timeout=60)
        async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
            await wait_agent_applied(client, "orphan-agent", await agent.last_committed_seq(), timeout=60)
        local = table_digest(agent.db_path, "notes", ("id", "body"))
        assert table_digest(htpc.central_db("orphan-agent"), "notes", ("id", "body")) == local
        assert local[0] == 40
    assert htpc.stop() == 0
    assert _nats_servers_on(htpc.data_dir) == []
