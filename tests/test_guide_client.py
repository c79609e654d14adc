"""The storage guide's own client never loses data (issue 10, point 6), against a real `replicator serve`.

The guide's `batch_write` posts `{"records": [{"table", "data"}]}` with no agent id and never looks at the
answer: its rows are attributed (X-Agent-Id header, the agent token's agent, `--default-agent-id`, else the
built-in `relay-default`) and land in the central store, checked by count and checksum against the guide's
own local database. A row the central store would refuse (no primary key) is a 4xx before anything is
published, not a 202 followed by a dead letter.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.credentials import make_credentials
from tests.support.guide_client import GUIDE_AGENT, GuideRecruiterAgentStorage
from tests.support.htpc import HtpcProcess, central_db_path, poll, rows_digest, sqlite_rows, table_digest
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import stream_message_count

RECRUITER = GUIDE_AGENT
INTERVIEW_COLUMNS = ("id", "candidate_id", "interviewer_agent", "notes", "outcome")


# ----------------------------------------------------------------------------- helpers
def _interviews(prefix: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "table": "interviews",
            "data": {
                "id": f"{prefix}-{k}",
                "candidate_id": f"cand-{k % 3}",
                "interviewer_agent": "commander",
                "notes": f"round {k}: ünïcode ✓",
                "outcome": None if k % 2 else "hire",
            },
        }
        for k in range(n)
    ]


def _landed(htpc: HtpcProcess, agent: str, local: Path, where: str) -> tuple[int, str]:
    """Wait until the central copy of `agent`'s interviews equals the guide's local rows matching `where`."""
    rows = sqlite_rows(local, f"SELECT {', '.join(INTERVIEW_COLUMNS)} FROM interviews WHERE {where}")
    expected = rows_digest(rows)
    path = central_db_path(htpc.data_dir, agent)

    def central() -> tuple[int, str] | None:
        if not path.exists():
            return None
        try:
            found = table_digest(path, "interviews", INTERVIEW_COLUMNS)
        except sqlite3.Error:
            return None
        return found if found == expected else None

    return poll(central, 20, f"{agent}'s central interviews == the guide's local rows ({expected[0]})")


@pytest.fixture(scope="module")
def default_htpc(module_htpc: HtpcProcess) -> HtpcProcess:
    """An HTPC with no --default-agent-id (auth off, loopback): the built-in default applies."""
    return module_htpc


# ----------------------------------------------------------------------------- tests
async def test_the_guides_batch_write_lands_under_the_built_in_default_or_the_x_agent_id(
    default_htpc: HtpcProcess, tmp_path: Path
) -> None:
    guide = GuideRecruiterAgentStorage(tmp_path / "guide", default_htpc.url)
    try:
        await guide.add_candidate({"id": "cand-0", "name": "Ada", "skills": ["SQL"], "experience_years": 12})
        await guide.batch_write(_interviews("plain", 5))
    finally:
        await guide.close()
    immediate, batch = guide.responses
    assert immediate.status_code == 202 and immediate.json()["agent_id"] == RECRUITER, immediate.text
    assert batch.status_code == 202, batch.text
    assert batch.json()["attributed"] == {"agent_id": "relay-default", "by": "built-in default", "records": 5}
    assert _landed(default_htpc, "relay-default", guide.db_path, "id LIKE 'plain-%'")[0] == 5

    # The user who sets X-Agent-Id once on the client gets the batch in the recruiter's own copy.
    named = GuideRecruiterAgentStorage(tmp_path / "named", default_htpc.url, headers={"X-Agent-Id": RECRUITER})
    try:
        await named.batch_write(_interviews("named", 4))
    finally:
        await named.close()
    assert named.responses[-1].json()["attributed"]["by"] == "X-Agent-Id header"
    assert _landed(default_htpc, RECRUITER, named.db_path, "id LIKE 'named-%'")[0] == 4
    assert (await asyncio.to_thread(default_htpc.get, "/relay/dead-letters")).json()["dead_letters"] == []


async def test_a_configured_default_agent_makes_the_guides_batch_queryable_as_the_recruiters(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--default-agent-id", RECRUITER])
    await asyncio.to_thread(htpc.start)
    guide = GuideRecruiterAgentStorage(tmp_path / "guide", htpc.url)
    try:
        await guide.batch_write(_interviews("conf", 6))
        assert guide.responses[-1].json()["attributed"]["by"] == "--default-agent-id"
        count, _digest = await asyncio.to_thread(_landed, htpc, RECRUITER, guide.db_path, "1")
        assert count == 6
        answer = (
            await guide.http_client.post(
                f"{htpc.url}/relay/query", json={"agent_id": RECRUITER, "query": "SELECT count(*) FROM interviews"}
            )
        ).json()
        assert answer["rows"] == [[6]]
    finally:
        await guide.close()


@pytest.fixture
def auth_htpc(tmp_path: Path, htpc_factory: Callable[..., HtpcProcess]) -> Iterator[tuple[HtpcProcess, dict[str, str]]]:
    data = tmp_path / "htpc"
    tokens, _seeds = make_credentials(data, (RECRUITER, "other-agent"))
    htpc = htpc_factory(None, extra_args=["--auth", "on"])
    htpc.start()
    yield htpc, tokens


async def test_with_auth_the_guides_batch_goes_to_the_tokens_agent(
    auth_htpc: tuple[HtpcProcess, dict[str, str]], tmp_path: Path
) -> None:
    htpc, tokens = auth_htpc
    guide = GuideRecruiterAgentStorage(
        tmp_path / "guide", htpc.url, headers={"Authorization": f"Bearer {tokens[RECRUITER]}"}
    )
    try:
        await guide.batch_write(_interviews("tok", 3))
        assert guide.responses[-1].json()["attributed"]["by"] == "token"
        await asyncio.to_thread(_landed, htpc, RECRUITER, guide.db_path, "1")
        # An agent token cannot put rows under another agent through the header: 403, nothing written.
        resp = await guide.http_client.post(
            f"{htpc.url}/relay/batch", json={"records": _interviews("x", 1)}, headers={"X-Agent-Id": "other-agent"}
        )
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden", resp.text
        # An operator's batch naming no agent goes to the built-in default.
        ops = {"Authorization": f"Bearer {tokens['ops']}"}
        resp = await guide.http_client.post(
            f"{htpc.url}/relay/batch", json={"records": _interviews("op", 2)}, headers=ops
        )
        assert resp.status_code == 202 and resp.json()["attributed"]["agent_id"] == "relay-default", resp.text
        agents = (await guide.http_client.get(f"{htpc.url}/relay/agents", headers=ops)).json()["agents"]
        assert "other-agent" not in {a["agent_id"] for a in agents}
    finally:
        await guide.close()


async def test_a_row_without_its_tables_primary_key_is_refused_before_it_is_published(
    default_htpc: HtpcProcess, module_nats: NatsServer
) -> None:
    agent = "pk-agent"
    async with httpx.AsyncClient(base_url=default_htpc.url, timeout=10) as client:
        first = await client.post("/relay/immediate", json={"agent_id": agent, "table": "tasks", "data": {"id": 1}})
        assert first.status_code == 202, first.text
        before = await stream_message_count(module_nats.url)
        keyless = {"agent_id": agent, "table": "tasks", "data": {"title": "no id"}}
        # At once (the first write may not be applied yet) and once it is: 400, with the reason.
        resp = await client.post("/relay/immediate", json=keyless)
        assert resp.status_code == 400 and resp.json()["error"] == "missing_primary_key", resp.text
        assert "lacks its primary key ['id']" in resp.json()["message"]
        await asyncio.to_thread(
            poll, lambda: central_db_path(default_htpc.data_dir, agent).exists(), 15, "pk-agent's copy"
        )
        resp = await client.post("/relay/immediate", json=keyless)
        assert resp.status_code == 400 and resp.json()["error"] == "missing_primary_key", resp.text
        # In a batch the first row of a new table decides its key for the rows after it.
        batch = {"agent_id": agent, "records": [{"table": "notes", "data": {"id": 1}}, {"table": "notes", "data": {}}]}
        batch["records"][1]["data"] = {"text": "keyless"}
        resp = await client.post("/relay/batch", json=batch)
        assert resp.status_code == 400 and resp.json()["message"].startswith("records[1]: "), resp.text
        assert await stream_message_count(module_nats.url) == before  # nothing was published
        letters = (await client.get("/relay/dead-letters", params={"agent_id": agent})).json()["dead_letters"]
        assert letters == []
    assert sqlite_rows(central_db_path(default_htpc.data_dir, agent), "SELECT * FROM tasks") == [(1,)]
