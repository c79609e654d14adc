"""The storage guide's Gillsystems-Recruiter-Agent, on agent_client.

Same schema and calls as the guide's `RecruiterAgentStorage`, without its
hand-written dual write and sync queue: every committed change reaches the
HTPC through JetStream, and the agent keeps working when the HTPC is down.

Visibility follows the guide's recruiter example:
- always:    requisitions (other agents recommend candidates), candidates (status for coordination)
- on_demand: interviews (schedules, when coordination is needed)
- private:   candidate_scores (internal scoring), draft_notes (incomplete assessments)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from agent_client import AgentStorage, Migration

AGENT_ID = "gillsystems-recruiter-agent"

MIGRATIONS = [
    Migration(
        1,
        """
        CREATE TABLE candidates (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            email TEXT UNIQUE,
            skills TEXT,  -- JSON array
            experience_years INTEGER,
            status TEXT DEFAULT 'active',
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
            updated_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        );
        CREATE TABLE interviews (
            id TEXT PRIMARY KEY,
            candidate_id TEXT REFERENCES candidates(id),
            interviewer_agent TEXT,
            scheduled_date TIMESTAMP,
            notes TEXT,
            outcome TEXT,
            created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
        );
        CREATE INDEX idx_candidates_skills ON candidates(skills);
        CREATE INDEX idx_candidates_status ON candidates(status);
        CREATE INDEX idx_interviews_candidate ON interviews(candidate_id);
        """,
        name="candidates and interviews",
    ),
    Migration(
        2,
        """
        CREATE TABLE requisitions (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            requirements TEXT,  -- JSON array of skills
            status TEXT NOT NULL DEFAULT 'open'
        );
        CREATE TABLE candidate_scores (candidate_id TEXT PRIMARY KEY, score REAL, model TEXT);
        CREATE TABLE draft_notes (id INTEGER PRIMARY KEY, candidate_id TEXT, body TEXT);
        """,
        name="requisitions, private scoring and drafts",
    ),
]

VISIBILITY = {
    "requisitions": "always",
    "candidates": "always",
    "interviews": "on_demand",
    "candidate_scores": "private",
    "draft_notes": "private",
}


class RecruiterAgentStorage:
    """Storage system for Gillsystems-Recruiter-Agent."""

    def __init__(self, data_dir: Path, htpc_url: str, nats_url: str | None = None) -> None:
        self.agent_id = AGENT_ID
        self.storage = AgentStorage(AGENT_ID, data_dir, htpc_url=htpc_url, nats_url=nats_url)

    async def open(self) -> RecruiterAgentStorage:
        await self.storage.open()
        await self.storage.migrate(MIGRATIONS)
        for table, visibility in VISIBILITY.items():
            await self.storage.set_visibility(table, visibility)
        return self

    async def __aenter__(self) -> RecruiterAgentStorage:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add_candidate(self, candidate: dict[str, Any]) -> str:
        """Add a candidate; replicated to the HTPC as soon as it commits."""
        row = {
            "name": candidate["name"],
            "email": candidate.get("email"),
            "skills": list(candidate.get("skills", [])),
            "experience_years": candidate.get("experience_years", 0),
        }
        if candidate.get("id"):
            row["id"] = candidate["id"]
        return str(await self.storage.write_data("candidates", row))

    async def set_status(self, candidate_id: str, status: str) -> None:
        async with self.storage.transaction() as tx:
            await tx.execute(
                "UPDATE candidates SET status = ?, updated_at = CURRENT_TIMESTAMP WHERE id = ?", (status, candidate_id)
            )

    async def schedule_interview(self, interview: dict[str, Any]) -> str:
        return str(await self.storage.write_data("interviews", interview))

    async def open_requisition(self, title: str, requirements: list[str]) -> str:
        return str(await self.storage.write_data("requisitions", {"title": title, "requirements": requirements}))

    async def score(self, candidate_id: str, score: float) -> None:
        await self.storage.write_data("candidate_scores", {"candidate_id": candidate_id, "score": score, "model": "v1"})

    async def search_candidates(self, skills: list[str]) -> list[dict[str, Any]]:
        """Search active candidates by skill, from the local database (fast, offline-safe)."""
        rows = await self.storage.query_local(
            "SELECT id, name, email, skills, experience_years, status FROM candidates WHERE status = 'active'"
        )
        results = []
        for row in rows:
            candidate_skills = json.loads(row["skills"] or "[]")
            if any(skill in candidate_skills for skill in skills):
                results.append({**row, "skills": candidate_skills})
        return results

    async def query_network(
        self, query: str, params: dict[str, Any] | list[Any] | None = None, *, fresh: bool = True
    ) -> dict[str, Any]:
        """Query the network-wide view on the HTPC; `fresh` waits until our own writes are visible there."""
        return await self.storage.query_network(query, params, fresh=fresh)

    async def health_check(self) -> dict[str, Any]:
        return await self.storage.health_check()

    async def close(self) -> None:
        await self.storage.close()
