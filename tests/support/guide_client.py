"""The storage guide's own HTTP client, as the guide prints it, for the relay tests.

`RecruiterAgentStorage` (its dual write and sync queue), plus the guide's "Batch HTPC Writes" `batch_write`
(with the `_write_local` the guide leaves to the reader: "Your SQLite INSERT logic here") and `query_network`
from its other sections. Only two things are added for the tests: optional default headers on the HTTP client
(X-Agent-Id, Authorization), and an event hook that keeps every response, since the guide's code never looks
at statuses itself.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

GUIDE_AGENT = "gillsystems-recruiter-agent"


class GuideRecruiterAgentStorage:
    """Storage system for Gillsystems-Recruiter-Agent (the guide's), keeping every HTTP response."""

    def __init__(self, data_dir: Path, htpc_url: str, headers: dict[str, str] | None = None) -> None:
        self.agent_id = GUIDE_AGENT
        self.data_dir = data_dir
        self.db_path = data_dir / f"{self.agent_id}.db"
        self.htpc_url = htpc_url
        self.conn: sqlite3.Connection | None = None
        self.responses: list[httpx.Response] = []
        self.http_client = httpx.AsyncClient(
            timeout=5.0, headers=headers or {}, event_hooks={"response": [self._record]}
        )
        self._initialize()

    async def _record(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(response)

    def _initialize(self) -> None:
        """Initialize storage system"""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.db_path, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self._create_schema()

    def _create_schema(self) -> None:
        """Create database schema"""
        assert self.conn is not None
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

    async def add_candidate(self, candidate: dict[str, Any]) -> str:
        """Add a new candidate (dual-write)"""
        assert self.conn is not None
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

        return str(candidate_id)

    async def _write_to_htpc(self, table: str, data: dict[str, Any]) -> None:
        """Write data to HTPC with error handling"""
        assert self.conn is not None
        try:
            endpoint = f"{self.htpc_url}/relay/immediate"
            payload = {"agent_id": self.agent_id, "table": table, "data": data, "timestamp": time.time()}
            await self.http_client.post(endpoint, json=payload)
        except Exception:
            # Queue for later sync
            self.conn.execute("INSERT INTO sync_queue (table_name, data) VALUES (?, ?)", (table, json.dumps(data)))
            self.conn.commit()

    async def _write_local(self, table: str, data: dict[str, Any]) -> None:
        """Write to local SQLite database"""
        assert self.conn is not None
        cols = list(data)
        marks = ", ".join("?" * len(cols))
        self.conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({marks})", [data[c] for c in cols])
        self.conn.commit()

    async def batch_write(self, records: list[dict[str, Any]]) -> None:
        # Write all to local first
        for record in records:
            await self._write_local(record["table"], record["data"])

        # Send batch to HTPC
        endpoint = f"{self.htpc_url}/relay/batch"
        await self.http_client.post(endpoint, json={"records": records})

    async def query_network(self, query: str, params: dict[str, Any] | None = None) -> Any:
        """Query data from HTPC (network-wide view)"""
        endpoint = f"{self.htpc_url}/relay/query"
        payload = {"agent_id": self.agent_id, "query": query, "params": params or {}}
        response = await self.http_client.post(endpoint, json=payload)
        return response.json()

    def _generate_id(self) -> str:
        """Generate unique ID"""
        return str(uuid.uuid4())

    async def close(self) -> None:
        """Clean up resources"""
        if self.conn:
            self.conn.close()
        await self.http_client.aclose()
