"""The storage guide's own client never loses data (issue 10, point 6), against a real `replicator serve`.

The guide's `batch_write` posts `{"records": [{"table", "data"}]}` with no agent id and never looks at the
answer: its rows are attributed (X-Agent-Id header, the agent token's agent, `--default-agent-id`, else the
built-in `relay-default`) and land in the central store, checked by count and checksum against the guide's
own local database. A row the central store would refuse (no primary key) is a 4xx before anything is
published, not a 202 followed by a dead letter.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from agent_client import STREAM_NAME
from tests.support.credentials import make_credentials
from tests.support.htpc import HtpcProcess, central_db_path, poll, rows_digest, sqlite_rows, table_digest
from tests.support.nats_server import NatsServer

RECRUITER = "gillsystems-recruiter-agent"
INTERVIEW_COLUMNS = ("id", "candidate_id", "interviewer_agent", "notes", "outcome")


# ----------------------------------------------------------------------------- the guide's code, as printed
class RecruiterAgentStorage:
    """Storage system for Gillsystems-Recruiter-Agent"""

    def __init__(self, data_dir: Path, htpc_url: str):
        self.agent_id = "gillsystems-recruiter-agent"
        self.data_dir = data_dir
        self.db_path = data_dir / f"{self.agent_id}.db"
        self.htpc_url = htpc_url
        self.conn = None
        self.http_client = httpx.AsyncClient(timeout=5.0)
        self._initialize()

    def _initialize(self):
        """Initialize storage system"""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.db_path, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self._create_schema()

    def _create_schema(self):
        """Create database schema"""
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS candidates (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                email TEXT UNIQUE,
                skills TEXT,
                experience_years INTEGER,
                status TEXT DEFAULT 'active',
                created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
                updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            );

            CREATE TABLE IF NOT EXISTS interviews (
                id TEXT PRIMARY KEY,
                candidate_id TEXT REFERENCES candidates(id),
                interviewer_agent TEXT,
                scheduled_date TIMESTAMP,
                notes TEXT,
                outcome TEXT,
                created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            );

            CREATE TABLE IF NOT EXISTS sync_queue (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                table_name TEXT,
                data TEXT,
                queued_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            );

            CREATE INDEX IF NOT EXISTS idx_candidates_skills
                ON candidates(skills);
            CREATE INDEX IF NOT EXISTS idx_candidates_status
                ON candidates(status);
            CREATE INDEX IF NOT EXISTS idx_interviews_candidate
                ON interviews(candidate_id);
        """)
        self.conn.commit()

    async def add_candidate(self, candidate: dict) -> str:
        """Add a new candidate (dual-write)"""
        candidate_id = candidate.get("id") or self._generate_id()
        candidate["id"] = candidate_id

        # Local write
        self.conn.execute(
            """
            INSERT INTO candidates (id, name, email, skills, experience_years)
            VALUES (?, ?, ?, ?, ?)
        """,
            (
                candidate_id,
                candidate["name"],
                candidate.get("email"),
                json.dumps(candidate.get("skills", [])),
                candidate.get("experience_years", 0),
            ),
        )
        self.conn.commit()

        # HTPC write
        await self._write_to_htpc("candidates", candidate)

        return candidate_id

    async def _write_to_htpc(self, table: str, data: dict):
        """Write data to HTPC with error handling"""
        try:
            endpoint = f"{self.htpc_url}/relay/immediate"
            payload = {"agent_id": self.agent_id, "table": table, "data": data, "timestamp": time.time()}
            await self.http_client.post(endpoint, json=payload)
        except Exception as e:  # noqa: F841 (the guide's)
            # Queue for later sync
            self.conn.execute("INSERT INTO sync_queue (table_name, data) VALUES (?, ?)", (table, json.dumps(data)))
            self.conn.commit()

    def _generate_id(self) -> str:
        """Generate unique ID"""
        import uuid

        return str(uuid.uuid4())

    async def close(self):
        """Clean up resources"""
        if self.conn:
            self.conn.close()
        await self.http_client.aclose()


class GuideClient(RecruiterAgentStorage):
    """The guide's "Batch HTPC Writes" best practice on the recruiter's storage, verbatim, with the
    `_write_local` the guide leaves to the reader ("Your SQLite INSERT logic here"). A response hook keeps
    every answer for the test; the guide's code itself never looks at them."""

    def __init__(self, data_dir: Path, htpc_url: str, headers: dict[str, str] | None = None):
        super().__init__(data_dir, htpc_url)
        self.http_client.headers.update(headers or {})
        self.responses: list[httpx.Response] = []
        self.http_client.event_hooks = {"response": [self._keep]}

    async def _keep(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(response)

    async def _write_local(self, table: str, data: dict):
        """Write to local SQLite database"""
        cols = list(data)
        marks = ", ".join("?" * len(cols))
        self.conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", list(data.values()))
        self.conn.commit()

    async def batch_write(self, records: list):
        # Write all to local first
        for record in records:
            await self._write_local(record["table"], record["data"])

        # Send batch to HTPC
        endpoint = f"{self.htpc_url}/relay/batch"
        await self.http_client.post(endpoint, json={"records": records})


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


async def _stream_messages(nats_url: str) -> int:
    nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
    try:
        return int((await nc.jetstream().stream_info(STREAM_NAME)).state.messages)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def default_htpc(module_htpc: HtpcProcess) -> HtpcProcess:
    """An HTPC with no --default-agent-id (auth off, loopback): the built-in default applies."""
    return module_htpc


# ----------------------------------------------------------------------------- tests
async def test_the_guides_batch_write_lands_under_the_built_in_default_or_the_x_agent_id(
    default_htpc: HtpcProcess, tmp_path: Path
) -> None:
    guide = GuideClient(tmp_path / "guide", default_htpc.url)
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
    named = GuideClient(tmp_path / "named", default_htpc.url, headers={"X-Agent-Id": RECRUITER})
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
    guide = GuideClient(tmp_path / "guide", htpc.url)
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
    guide = GuideClient(tmp_path / "guide", htpc.url, headers={"Authorization": f"Bearer {tokens[RECRUITER]}"})
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
        before = await _stream_messages(module_nats.url)
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
        assert await _stream_messages(module_nats.url) == before  # nothing was published
        letters = (await client.get("/relay/dead-letters", params={"agent_id": agent})).json()["dead_letters"]
        assert letters == []
    assert sqlite_rows(central_db_path(default_htpc.data_dir, agent), "SELECT * FROM tasks") == [(1,)]
