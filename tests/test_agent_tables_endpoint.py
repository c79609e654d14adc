"""`GET /relay/agents/{id}/tables` with authentication on: who sees an `on_demand` table's columns.

A real `replicator serve --auth on` (its embedded nats-server secured by per-agent keys); the owner replicates
an `always` and an `on_demand` table with its own key, and shares its on_demand tables with `reader` through
the real `replicator auth share` command. The owner, the operator and the granted reader see the on_demand
table's columns and primary key (the reader's queries may read it too); a third agent that was not granted
gets `columns: null` and `pk: null`, and is refused its rows. `always` tables show their columns to everyone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent_client import AgentStorage, Migration
from tests.support.credentials import make_credentials, run_in_thread
from tests.support.htpc import HtpcProcess, apoll, run_cli

SCHEMA = [
    Migration(
        1,
        "CREATE TABLE interviews (id TEXT PRIMARY KEY, candidate TEXT NOT NULL, score REAL);\n"
        "CREATE TABLE openings (team TEXT NOT NULL, title TEXT NOT NULL, n INTEGER, PRIMARY KEY (team, title))",
    )
]
INTERVIEW_COLUMNS = [
    {"name": "id", "type": "TEXT"},
    {"name": "candidate", "type": "TEXT"},
    {"name": "score", "type": "REAL"},
]


@dataclass
class Shared:
    htpc: HtpcProcess
    tokens: dict[str, str]
    seeds: dict[str, Path]
    base: Path

    def client(self, who: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return httpx.AsyncClient(base_url=self.htpc.url, headers=headers, timeout=30)

    def tables(self, who: str, agent_id: str = "owner") -> dict[str, dict[str, Any]]:
        resp = self.htpc.get(
            f"/relay/agents/{agent_id}/tables", headers={"Authorization": f"Bearer {self.tokens[who]}"}
        )
        assert resp.status_code == 200, resp.text
        return {t["name"]: t for t in resp.json()["tables"]}


async def _replicate(shared: Shared) -> None:
    async with AgentStorage(
        "owner",
        shared.base / "owner",
        htpc_url=shared.htpc.url,
        nats_seed_file=shared.seeds["owner"],
        htpc_token=shared.tokens["owner"],
    ) as owner:
        await owner.migrate(SCHEMA)
        await owner.set_visibility("interviews", "on_demand")
        await owner.set_visibility("openings", "always")
        await owner.batch_write([{"table": "openings", "data": {"team": "infra", "title": "SRE", "n": 2}}])
        await owner.write_data("interviews", {"id": "i1", "candidate": "Ada", "score": 4.5})
        await owner.flush(timeout=30)
        seq, epoch = await owner.last_committed_seq(), owner.epoch
        async with shared.client("ops") as ops:

            async def known() -> bool:
                state = (await ops.get("/relay/agents/owner")).json()
                if state.get("epoch") != epoch or state.get("watermark", 0) < seq:
                    return False
                tables = (await ops.get("/relay/agents/owner/tables")).json()["tables"]
                return {t["name"]: t["visibility"] for t in tables} == {"interviews": "on_demand", "openings": "always"}

            await apoll(known, 60, "owner's tables known to the HTPC")
        async with shared.client("reader") as reader:  # the grant is what the queries obey too
            resp = await reader.post(
                "/relay/query", json={"agent_id": "reader", "query": 'SELECT candidate FROM "owner".interviews'}
            )
            assert resp.status_code == 200 and resp.json()["rows"] == [["Ada"]], resp.text
        async with shared.client("third") as third:
            resp = await third.post(
                "/relay/query", json={"agent_id": "third", "query": 'SELECT candidate FROM "owner".interviews'}
            )
            assert resp.status_code == 403, resp.text


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    base = tmp_path_factory.mktemp("tables-share")
    data = base / "htpc"
    tokens, seeds = make_credentials(data, ("owner", "reader", "third"))
    out = run_cli("auth", "--data-dir", str(data), "share", "owner", "--with", "reader")
    assert out.returncode == 0, out.stderr
    htpc = HtpcProcess(data, None, extra_args=["--auth", "on"])
    htpc.start()
    try:
        found = Shared(htpc, tokens, seeds, base / "agents")
        run_in_thread(lambda: _replicate(found), timeout=120)
        yield found
    finally:
        htpc.close()


@pytest.mark.parametrize("who", ["owner", "ops", "reader"])
def test_the_owner_the_operator_and_a_granted_reader_see_on_demand_columns(shared: Shared, who: str) -> None:
    tables = shared.tables(who)
    interviews = tables["interviews"]
    assert (interviews["visibility"], interviews["source"]) == ("on_demand", "agent")
    assert interviews["columns"] == INTERVIEW_COLUMNS
    assert interviews["pk"] == ["id"]
    assert tables["openings"]["pk"] == ["team", "title"]


def test_an_agent_not_granted_gets_no_on_demand_columns(shared: Shared) -> None:
    tables = shared.tables("third")
    assert tables["interviews"]["visibility"] == "on_demand"
    assert tables["interviews"]["columns"] is None and tables["interviews"]["pk"] is None
    openings = tables["openings"]  # an always table: what its change feed shows any caller
    assert [c["name"] for c in openings["columns"]] == ["team", "title", "n"] and openings["pk"] == ["team", "title"]
