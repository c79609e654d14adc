"""Health tells the truth (issue 10, point 3), against a real `replicator serve`, nats-server and SQLite.

Each test causes a real condition (a dead-lettered record in an agent's sequence, a new epoch that starts
with a gap, a transaction whose final part never comes, a frozen nats-server), checks that `/health` and
`/ready` say degraded with a sentence naming it, that `/relay/agents` and `/metrics` measure the lag against
what the stream holds, and that everything is ok again once the condition clears (and central == local).

The HTPC runs with `--stuck-after 3` (behind and not moving for 3 s is a problem; 30 s by default) and
`--resync-after 1h` (so no automatic resync heals the condition while the test looks at it). Every wait is a
bounded poll; nothing asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import nats
from prometheus_client.parser import text_string_to_metric_families

from agent_client import AgentStorage, Migration, changes_subject
from tests.support.htpc import HtpcProcess, agent_session, apoll, forged_record, rows_digest, table_digest
from tests.support.nats_server import NatsServer

STUCK_AFTER = ["--stuck-after", "3", "--resync-after", "1h"]
NOTES_SQL = "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
NOTES: dict[str, Any] = {
    "table": "notes",
    "columns": ["id", "body"],
    "pk": ["id"],
    "types": ["INTEGER", "TEXT"],
    "sql": NOTES_SQL,
}
ALWAYS = {"notes": "always"}
WAIT = 40.0  # bound of every poll (the conditions show within stuck_after + a few watch cycles)


# ----------------------------------------------------------------------------- helpers
def _record(
    agent: str,
    epoch: str,
    first: int,
    changes: list[tuple[int, str, int, list[Any]]],
    *,
    layouts: dict[str, dict[str, Any]] | None = None,
    final: bool = True,
) -> bytes:
    """A change record as agent `agent` would publish it, on the notes table unless `layouts` says otherwise."""
    return forged_record(agent, first, changes, layouts or {"0": NOTES}, epoch=epoch, final=final)


async def _publish(nats_url: str, agent: str, *payloads: bytes) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for payload in payloads:
            await js.publish(changes_subject(agent), payload)
    finally:
        await nc.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client (which rejects bad syntax)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    resp = await client.get("/metrics")
    assert resp.status_code == 200, resp.text
    return _samples(resp.text).get((name, tuple(sorted(labels.items()))))


async def _degraded(client: httpx.AsyncClient, fragment: str) -> dict[str, Any] | None:
    """/health when it is degraded with a problem containing `fragment` (and /ready agrees), else None."""
    health: dict[str, Any] = (await client.get("/health")).json()
    if health["status"] != "degraded" or not any(fragment in p for p in health["problems"]):
        return None
    ready = await client.get("/ready")
    assert ready.status_code == 503, ready.text
    assert any(fragment in p for p in ready.json()["problems"]), ready.json()
    return health


async def _ok(client: httpx.AsyncClient) -> dict[str, Any] | None:
    health: dict[str, Any] = (await client.get("/health")).json()
    if health["status"] != "ok":
        return None
    assert health["problems"] == []
    return health


async def _agent(client: httpx.AsyncClient, agent_id: str) -> dict[str, Any] | None:
    resp = await client.get(f"/relay/agents/{agent_id}")
    return resp.json() if resp.status_code == 200 else None


async def _applied(client: httpx.AsyncClient, agent_id: str, seq: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        body = await _agent(client, agent_id)
        return body if body is not None and body["watermark"] >= seq else None

    return await apoll(check, WAIT, f"{agent_id} applied up to {seq}")


@contextlib.asynccontextmanager
async def _http(htpc: HtpcProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        yield client


@contextlib.contextmanager
def _frozen(server: NatsServer) -> Any:
    """nats-server stopped in its tracks (SIGSTOP / docker pause): it holds every connection and answers none."""
    impl: Any = server._impl
    if server.backend == "binary":
        pid = impl._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)
    else:
        container = impl._container.get_wrapped_container()
        container.pause()
        try:
            yield
        finally:
            container.unpause()


def _notes_agent(htpc: HtpcProcess, agent_id: str, tmp_path: Path) -> AbstractAsyncContextManager[AgentStorage]:
    """The test's agent: one replicated `notes` table (the same local database each time it is opened)."""
    return agent_session(
        agent_id, tmp_path / "agent", htpc_url=htpc.url, migrations=[Migration(1, NOTES_SQL)], visibility=ALWAYS
    )


async def _write_notes(storage: AgentStorage, htpc: HtpcProcess, rows: dict[int, str]) -> None:
    """Write `rows` (id: body), one transaction each, and wait until the central notes equal the local ones."""
    for i, body in rows.items():
        await storage.write_data("notes", {"id": i, "body": body})
    await storage.flush(timeout=30)
    await _same_rows(storage, htpc, storage.agent_id)


async def _same_rows(storage: Any, htpc: HtpcProcess, agent_id: str) -> None:
    """central == local for the notes table, by count and checksum."""
    local = table_digest(storage.db_path, "notes", ("id", "body"))

    async def equal() -> bool:
        try:
            return table_digest(htpc.central_db(agent_id), "notes", ("id", "body")) == local
        except sqlite3.Error:  # not created yet, or its table not yet
            return False

    await apoll(equal, WAIT, f"central notes of {agent_id} == local {local}")


# ----------------------------------------------------------------------------- tests
async def test_a_blocked_agent_degrades_health_and_ready_until_it_is_resynced(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=STUCK_AFTER)
    htpc.start()
    agent_id = "hb-blocked"

    async with _http(htpc) as client:
        async with _notes_agent(htpc, agent_id, tmp_path) as storage:
            await _write_notes(storage, htpc, {i: f"row {i}" for i in range(3)})
        await apoll(lambda: _ok(client), WAIT, "health ok with a healthy agent")
        before = await _applied(client, agent_id, 1)
        seq = before["watermark"] + 1

        # The agent is offline (a resync of it has to wait). The next change in its sequence arrives, on a
        # table the HTPC never saw: dead-lettered, and the agent blocked behind it.
        ghost = {**NOTES, "table": "ghost", "sql": None}
        record = _record(agent_id, before["epoch"], seq, [(seq, "U", 0, [1, "x"])], layouts={"0": ghost})
        await _publish(nats_server.url, agent_id, record)

        health = await apoll(lambda: _degraded(client, f"agent {agent_id} is blocked:"), WAIT, "blocked in /health")
        assert f"{seq}-{seq}" in health["blocked_agents"][agent_id], health
        assert health["lag"][agent_id] >= 1  # the dead-lettered change exists and is not applied
        assert await _metric(client, "replicator_blocked_agents") == 1.0
        assert await _metric(client, "replicator_agent_blocked", agent=agent_id) == 1.0
        assert await _metric(client, "replicator_records_dead_letters_total") == 1.0

        # The agent comes back and writes: its copy is resynced (or its own change takes that place in the
        # sequence): no longer blocked, ok again, central == local.
        async with _notes_agent(htpc, agent_id, tmp_path) as storage:
            await storage.write_data("notes", {"id": 10, "body": "after the dead letter"})
            await storage.flush(timeout=30)
            await apoll(lambda: _ok(client), WAIT, "health ok once the agent moved on")
            assert (await client.get("/ready")).status_code == 200
            assert await _metric(client, "replicator_blocked_agents") == 0.0
            assert await _metric(client, "replicator_agent_blocked", agent=agent_id) == 0.0
            await _same_rows(storage, htpc, agent_id)


async def test_a_new_epoch_starting_with_a_gap_shows_a_growing_lag_and_a_reason(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=STUCK_AFTER)
    htpc.start()
    agent_id = "hb-epoch"
    async with _http(htpc) as client:
        async with _notes_agent(htpc, agent_id, tmp_path) as storage:
            await _write_notes(storage, htpc, {i: f"old {i}" for i in range(3)})
        old = await _applied(client, agent_id, 1)

        # A new agent database (epoch e2) whose first record in the stream starts at seq 5: 1-4 are missing.
        e2 = secrets.token_hex(8)
        rows = {seq: [seq, f"new {seq}"] for seq in range(2, 7)}
        await _publish(nats_server.url, agent_id, _record(agent_id, e2, 5, [(5, "U", 0, rows[5])]))

        async def lag_is(n: int) -> dict[str, Any] | None:
            body = await _agent(client, agent_id)
            return body if body is not None and body["lag_changes"] == n else None

        body = await apoll(lambda: lag_is(5), WAIT, "lag 5: all of the new epoch the HTPC has not started")
        assert body["published_epoch"] == e2 and body["new_epoch"] is True and body["published_seq"] == 5
        assert (body["epoch"], body["watermark"]) == (old["epoch"], old["watermark"])  # nothing of e2 applied
        health = await apoll(
            lambda: _degraded(client, f"agent {agent_id} is 5 changes behind its new epoch"),
            WAIT,
            "a reason for the epoch gap in /health",
        )
        assert health["lag"][agent_id] == 5 and health["max_lag_changes"] >= 5
        assert await _metric(client, "replicator_agent_lag_changes", agent=agent_id) == 5.0
        assert (await _metric(client, "replicator_agent_behind_seconds", agent=agent_id) or 0.0) >= 3.0

        # The agent goes on publishing (still nothing the HTPC can apply): the lag grows, it is never 0.
        await _publish(nats_server.url, agent_id, _record(agent_id, e2, 6, [(6, "U", 0, rows[6])]))
        await apoll(lambda: lag_is(6), WAIT, "lag grows to 6")
        await apoll(lambda: _degraded(client, f"agent {agent_id} is 6 changes behind"), WAIT, "the reason says 6")

        # The missing start arrives: the new epoch replaces the old copy and everything applies.
        start = [(1, "S", 0, []), *((seq, "U", 0, rows[seq]) for seq in range(2, 5))]
        await _publish(nats_server.url, agent_id, _record(agent_id, e2, 1, start))
        await apoll(lambda: lag_is(0), WAIT, "lag 0 once the epoch's start arrived")
        await apoll(lambda: _ok(client), WAIT, "health ok again")
        body = await _agent(client, agent_id)
        assert body is not None and (body["epoch"], body["watermark"]) == (e2, 6)
        central = table_digest(htpc.central_db(agent_id), "notes", ("id", "body"))
        assert central == rows_digest([tuple(r) for r in rows.values()])


async def test_a_transaction_that_never_completes_shows_the_store_behind_and_not_moving(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=STUCK_AFTER)
    htpc.start()
    agent_id = "hb-stall"
    epoch = secrets.token_hex(8)
    async with _http(htpc) as client:
        await _publish(nats_server.url, agent_id, _record(agent_id, epoch, 1, [(1, "S", 0, []), (2, "U", 0, [1, "a"])]))
        await _applied(client, agent_id, 2)
        await apoll(lambda: _ok(client), WAIT, "health ok after the first transaction")

        # The first part of a two-part transaction; its final part does not come (yet).
        await _publish(nats_server.url, agent_id, _record(agent_id, epoch, 3, [(3, "U", 0, [2, "b"])], final=False))
        health = await apoll(
            lambda: _degraded(client, "the central store is behind the stream and not moving"), WAIT, "stalled"
        )
        assert any(f"agent {agent_id} is 1 change behind what it published (seq 3)" in p for p in health["problems"])
        assert health["stream"]["consumer_ack_pending"] >= 1 and health["stream"]["ack_floor"] is not None
        assert await _metric(client, "replicator_consumer_ack_pending") is not None
        assert await _metric(client, "replicator_agent_lag_changes", agent=agent_id) == 1.0
        assert await _metric(client, "replicator_healthy") == 0.0

        await _publish(nats_server.url, agent_id, _record(agent_id, epoch, 4, [(4, "U", 0, [3, "c"])]))
        await _applied(client, agent_id, 4)
        await apoll(lambda: _ok(client), WAIT, "health ok once the transaction completed")
        assert await _metric(client, "replicator_healthy") == 1.0
        assert table_digest(htpc.central_db(agent_id), "notes", ("id", "body"))[0] == 3


async def test_a_central_file_lost_while_serving_is_reported_until_the_agent_is_resynced(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--stuck-after", "3"])
    htpc.start()
    agent_id = "hb-lost"

    async with _http(htpc) as client:
        async with _notes_agent(htpc, agent_id, tmp_path) as storage:
            await _write_notes(storage, htpc, {i: f"row {i}" for i in range(20)})
        await apoll(lambda: _ok(client), WAIT, "health ok before")
        finished_before = await _metric(client, "replicator_resyncs_finished_total") or 0.0

        # The agent is offline; its central file goes away under the running HTPC.
        central = htpc.central_db(agent_id)
        for path in (central, central.with_name(central.name + "-wal"), central.with_name(central.name + "-shm")):
            path.unlink(missing_ok=True)
        health = await apoll(
            lambda: _degraded(client, f"agent {agent_id}: resync requested"), WAIT, "the lost copy reported"
        )
        assert health["lag"][agent_id] > 0, health  # what the stream holds of it is not in the (new) central copy
        assert await _metric(client, "replicator_agent_resync_pending", agent=agent_id) == 1.0

        # The agent comes back: the waiting resync is served, the central copy is whole again.
        async with _notes_agent(htpc, agent_id, tmp_path) as storage:
            await apoll(lambda: _ok(client), WAIT * 2, "health ok once the agent was resynced")
            await _same_rows(storage, htpc, agent_id)
        assert (await _metric(client, "replicator_resyncs_finished_total") or 0.0) > finished_before
        assert await _metric(client, "replicator_agent_resync_pending", agent=agent_id) == 0.0


async def test_a_frozen_nats_server_degrades_health_until_it_runs_again(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=STUCK_AFTER)
    htpc.start()
    agent_id = "hb-frozen"
    async with _notes_agent(htpc, agent_id, tmp_path) as storage, _http(htpc) as client:
        await _write_notes(storage, htpc, {1: "before"})
        await apoll(lambda: _ok(client), WAIT, "health ok before")

        with _frozen(nats_server):
            await storage.write_data("notes", {"id": 2, "body": "while frozen"})  # local writes never wait

            async def unreadable() -> dict[str, Any] | None:
                return await _degraded(client, "cannot read stream") or await _degraded(client, "not connected to NATS")

            await apoll(unreadable, WAIT, "degraded while nats-server is frozen")
            assert await _metric(client, "replicator_healthy") == 0.0

        await apoll(lambda: _ok(client), WAIT * 2, "health ok once nats-server runs again")
        await storage.flush(timeout=60)
        await _same_rows(storage, htpc, agent_id)


async def test_a_near_idle_replicator_counts_no_fetch_stalls(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url)
    htpc.start()
    agent_id = "hb-idle"
    async with _notes_agent(htpc, agent_id, tmp_path) as storage, _http(htpc) as client:
        await _write_notes(storage, htpc, {1: "one"})
        first_fetch = (await client.get("/health")).json()["consumer"]["last_fetch_at"]
        # ~30 s of a near-idle HTPC: the consumer's 0.5 s fetches end empty some 60 times, none of them a stall.
        for i in range(6):
            await asyncio.sleep(5)
            await storage.write_data("notes", {"id": 100 + i, "body": "trickle"})
        await storage.flush(timeout=30)
        await _same_rows(storage, htpc, agent_id)
        health = await apoll(lambda: _ok(client), WAIT, "health ok")
        assert health["consumer"]["last_fetch_at"] > first_fetch  # it kept fetching all along
        text = (await client.get("/metrics")).text
        assert _samples(text)[("replicator_records_fetch_stalls_total", ())] == 0.0
        assert "fetch stalled" not in htpc.log_tail(500)
