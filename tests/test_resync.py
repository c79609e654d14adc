"""Resync end to end: the one way back from every broken state, through real processes.

A real nats-server, a real `replicator serve` (tests/support/htpc.py) and real agents (AgentStorage in this
process). Each test breaks an agent's central copy the way it breaks in life (a record the HTPC rejects, a
record gone from the stream, a central file deleted while the HTPC is down, history aged out of the stream,
an agent offline when asked), lets the HTPC notice and resync (or asks for it as an operator would), and ends
with central == local, compared by checksum over every row and storage class. No file is moved by hand except
the central file a test deletes on purpose.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats.js.errors

from agent_client import STREAM_NAME, AgentStorage, ChangeRecord, Migration, changes_subject, decode_record
from tests.support.htpc import (
    HtpcProcess,
    agent_session,
    apoll,
    central_db_path,
    client_and_agent,
    open_agent,
    rows_digest,
    sqlite_rows,
    wait_agent_applied,
)
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import jetstream, subject_message_count

NOTES = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, raw BLOB, score REAL)")
COLUMNS = ("id", "body", "raw", "score")


def local_digest(storage: AgentStorage, table: str = "notes") -> tuple[int, str]:
    return rows_digest(sqlite_rows(storage.db_path, f"SELECT {', '.join(COLUMNS)} FROM {table}"))


def central_digest(htpc: HtpcProcess, agent_id: str, table: str = "notes") -> tuple[int, str] | None:
    path = central_db_path(htpc.data_dir, agent_id)
    try:
        return rows_digest(sqlite_rows(path, f"SELECT {', '.join(COLUMNS)} FROM {table}"))
    except sqlite3.Error:
        return None  # not there (yet)


async def agent_state(client: httpx.AsyncClient, agent_id: str) -> dict[str, Any] | None:
    resp = await client.get(f"/relay/agents/{agent_id}")
    return resp.json() if resp.status_code == 200 else None


async def converged(
    client: httpx.AsyncClient, htpc: HtpcProcess, storage: AgentStorage, *, timeout: float = 12.0
) -> dict[str, Any]:
    """Wait until the central copy equals the local one (checksum), not blocked, no resync pending."""
    await storage.flush(timeout=timeout)
    seq = await storage.last_committed_seq()

    async def check() -> dict[str, Any] | None:
        state = await agent_state(client, storage.agent_id)
        if state is None or state["epoch"] != storage.epoch or state["watermark"] < seq:
            return None
        if state["blocked"] or state["resync_pending"]:
            return None
        return state if central_digest(htpc, storage.agent_id) == local_digest(storage) else None

    return await apoll(check, timeout, f"central copy of {storage.agent_id} == local at seq {seq}")


def row(i: int, size: int = 20) -> dict[str, Any]:
    return {"id": i, "body": f"note {i} " + "x" * size, "raw": bytes([i % 256]) * 3, "score": i / 3}


async def test_a_dead_lettered_record_in_the_sequence_is_healed_by_an_automatic_resync(
    htpc_factory: Callable[..., HtpcProcess], nats_server: NatsServer, tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--max-agent-bytes", str(1024 * 1024)])
    htpc.start()
    async with client_and_agent(htpc, "dl-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(50)])
        await wait_agent_applied(client, "dl-agent", await storage.last_committed_seq(), epoch=storage.epoch)
        # One transaction the HTPC rejects (over the agent's 1 MiB quota), then more: the sequence is broken.
        await storage.write_data("notes", row(1000, size=700_000))
        await storage.write_data("notes", {"id": 1000, "body": "small again", "raw": None, "score": None})
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(50, 60)])
        state = await converged(client, htpc, storage)
        assert state["resyncs"] >= 1 and state["dead_letters"] >= 1
        letters = (await client.get("/relay/dead-letters", params={"agent_id": "dl-agent"})).json()["dead_letters"]
        assert any("quota" in d["reason"] for d in letters)
        # The dead letter's changes are covered by the resync: retrying it now finds nothing to do.
        answer = await client.post(f"/relay/dead-letters/{letters[-1]['id']}/retry")
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "already_applied"
        health = (await client.get("/health")).json()
        assert health["resyncs"]["finished"] >= 1 and health["resyncs"]["pending"] == 0


async def agent_messages(url: str, agent_id: str) -> list[tuple[int, ChangeRecord]]:
    """(stream seq, record) of every change record on the agent's subject still in the stream."""
    subject = changes_subject(agent_id)
    found: list[tuple[int, ChangeRecord]] = []
    async with jetstream(url) as js:
        info = await js.stream_info(STREAM_NAME)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(STREAM_NAME, seq)
            except nats.js.errors.NotFoundError:
                continue
            if msg.subject == subject:
                record = decode_record(msg.data or b"")
                if isinstance(record, ChangeRecord):
                    found.append((seq, record))
    return found


async def test_a_gap_that_never_fills_is_healed_after_resync_after(
    htpc_factory: Callable[..., HtpcProcess], nats_server: NatsServer, tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--resync-after", "1s"])
    htpc.start()
    async with client_and_agent(htpc, "gap-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(20)])
        applied = await wait_agent_applied(client, "gap-agent", await storage.last_committed_seq())
        htpc.stop()
        for i in range(20, 23):  # three records while the HTPC is down
            await storage.write_data("notes", row(i))
            await storage.flush(timeout=10)
        later = [
            (seq, rec)
            for seq, rec in await agent_messages(nats_server.url, "gap-agent")
            if rec.first_seq > applied["watermark"]
        ]
        assert len(later) >= 2
        async with jetstream(nats_server.url) as js:
            assert await js.delete_msg(STREAM_NAME, later[0][0])  # the next change is gone for good
        htpc.start()
        state = await converged(client, htpc, storage)
        assert state["resyncs"] == 1 and state["waiting_records"] == 0


async def test_the_central_file_deleted_while_the_htpc_is_down_is_resynced_at_start(
    htpc: HtpcProcess, tmp_path: Path
) -> None:
    async with client_and_agent(htpc, "lost-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(30)])
        await converged(client, htpc, storage)
        htpc.stop()
        central = central_db_path(htpc.data_dir, "lost-agent")
        for suffix in ("", "-wal", "-shm"):
            central.with_name(central.name + suffix).unlink(missing_ok=True)
        htpc.start()  # nothing more is written: the HTPC must notice the loss by itself
        state = await converged(client, htpc, storage)
        assert state["resyncs"] == 1 and state["watermark"] == await storage.last_committed_seq()


async def test_history_aged_out_of_the_stream_below_the_watermark_is_resynced(
    htpc_factory: Callable[..., HtpcProcess], nats_server: NatsServer, tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--stream-max-age", "2s", "--resync-after", "1s"])
    htpc.start()
    async with client_and_agent(htpc, "aged-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(20)])
        await converged(client, htpc, storage)
        htpc.stop()
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(20, 40)])
        async with storage.transaction() as tx:
            await tx.execute("DELETE FROM notes WHERE id < 5")
        await storage.flush(timeout=10)

        async def aged_out() -> bool:
            async with jetstream(nats_server.url) as js:
                return await subject_message_count(js, changes_subject("aged-agent")) == 0

        await apoll(aged_out, 10, "the agent's records aged out of the stream", interval=0.2)
        htpc.start()
        await storage.write_data("notes", row(40))  # the agent goes on: its next change lands after a hole
        state = await converged(client, htpc, storage)
        assert state["resyncs"] == 1


async def test_an_agent_offline_when_the_resync_is_requested_is_served_when_it_reconnects(
    htpc: HtpcProcess, tmp_path: Path
) -> None:
    agent_dir = tmp_path / "agent"
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        async with agent_session(
            "away-agent", agent_dir, htpc_url=htpc.url, migrations=[NOTES], visibility={"notes": "always"}
        ) as first:
            await first.batch_write([{"table": "notes", "data": row(i)} for i in range(10)])
            await converged(client, htpc, first)
        resp = await client.post("/relay/agents/away-agent/resync", json={"reason": "test: the agent is away"})
        assert resp.status_code == 202, resp.text
        request = resp.json()
        assert request["agent_id"] == "away-agent" and request["state"] in ("pending", "sent")

        async def waiting() -> dict[str, Any] | None:
            pending = (await client.get("/relay/resyncs")).json()["resyncs"]
            found = [p for p in pending if p["agent_id"] == "away-agent" and p["last_error"]]
            return found[0] if found and "offline" in found[0]["last_error"] else None

        entry = await apoll(waiting, 10, "the request waiting for the offline agent")
        assert entry["request_id"] == request["request_id"] and entry["state"] == "pending"
        health = (await client.get("/health")).json()
        assert health["status"] == "degraded" and any("away-agent" in p for p in health["problems"])
        # Written while the agent process is away (another process: captured, not published yet).
        conn = sqlite3.connect(agent_dir / "away-agent.db")
        with conn:
            conn.execute("DELETE FROM notes WHERE id = 3")
            conn.execute("INSERT INTO notes (id, body) VALUES (99, 'while away')")
        conn.close()
        second = await open_agent("away-agent", agent_dir, htpc_url=htpc.url)
        try:
            state = await converged(client, htpc, second)
            assert state["resyncs"] == 1
            assert (await client.get("/relay/resyncs")).json()["resyncs"] == []
        finally:
            await second.close()


async def test_readers_see_the_old_copy_or_the_new_one_never_a_mix(htpc: HtpcProcess, tmp_path: Path) -> None:
    rows = 20_000
    async with client_and_agent(htpc, "big-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        for start in range(0, rows, 5_000):
            await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(start, start + 5_000)])
        await converged(client, htpc, storage, timeout=30)
        seen: list[int | str] = []
        stop = threading.Event()

        def read() -> None:  # a reader of the central file, as the query engine reads it
            conn = sqlite3.connect(f"file:{central_db_path(htpc.data_dir, 'big-agent')}?mode=ro", uri=True)
            try:
                while not stop.is_set():
                    try:
                        seen.append(conn.execute("SELECT count(*) FROM notes").fetchone()[0])
                    except sqlite3.Error as exc:
                        seen.append(f"{type(exc).__name__}: {exc}")
            finally:
                conn.close()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            await asyncio.sleep(0.2)
            resp = await client.post("/relay/agents/big-agent/resync", json={"reason": "test: atomicity"})
            assert resp.status_code == 202, resp.text

            async def finished() -> dict[str, Any] | None:
                state = await agent_state(client, "big-agent")
                return state if state and state["resyncs"] == 1 and not state["resync_pending"] else None

            await apoll(finished, 30, "the resync applied")
            await asyncio.sleep(0.2)
        finally:
            stop.set()
            reader.join(timeout=10)
        assert len(seen) > 50, "the reader did not read during the resync"
        assert set(seen) == {rows}, sorted({str(v) for v in seen})[:5]
        records = [rec for _seq, rec in await agent_messages(htpc.nats_url or "", "big-agent")]
        start = max(i for i, rec in enumerate(records) if rec.resync_request is not None)
        resync_parts = records[start : next(i for i, rec in enumerate(records) if i >= start and rec.final) + 1]
        assert len(resync_parts) >= 3, "the resync was not a multi-part transaction: nothing to see half of"
        await converged(client, htpc, storage)


async def test_automatic_resyncs_are_bounded_and_an_operator_resync_heals_after_the_fix(
    htpc_factory: Callable[..., HtpcProcess], nats_server: NatsServer, tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url, extra_args=["--max-agent-bytes", str(1024 * 1024), "--resync-after", "1s"])
    htpc.start()
    async with client_and_agent(htpc, "huge-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        for i in range(30):  # 1.5 MB: more than this agent's central copy may hold; a fresh copy cannot fit either
            await storage.write_data("notes", row(i, size=50_000))

        async def gave_up() -> dict[str, Any] | None:
            state = await agent_state(client, "huge-agent")
            return state if state and "resync failed after 3 attempt" in (state["blocked"] or "") else None

        state = await apoll(gave_up, 20, "the automatic resync given up")
        assert not state["resync_pending"]
        health = (await client.get("/health")).json()
        assert health["resyncs"]["started"] == 1 and health["resyncs"]["failed"] == 1
        assert any("huge-agent" in p and "resync failed" in p for p in health["problems"])

        htpc.restart()  # the bound is remembered: still stuck, the HTPC does not try again by itself
        await asyncio.sleep(2.5)
        health = (await client.get("/health")).json()
        assert health["resyncs"]["started"] == 0 and health["status"] == "degraded"
        state = await agent_state(client, "huge-agent")
        assert state is not None and "resync failed" in (state["blocked"] or "") and not state["resync_pending"]

        async with storage.transaction() as tx:  # the fix: the agent keeps less
            await tx.execute("DELETE FROM notes WHERE id >= 8")
        resp = await client.post("/relay/agents/huge-agent/resync", json={"reason": "test: fixed"})
        assert resp.status_code == 202, resp.text
        state = await converged(client, htpc, storage)
        assert state["resyncs"] >= 1


async def test_a_central_file_lost_while_serving_or_damaged_at_start_is_noticed_and_resynced(
    htpc: HtpcProcess, tmp_path: Path
) -> None:
    async with client_and_agent(htpc, "gone-agent", tmp_path / "agent", [NOTES], ["notes"]) as (client, storage):
        await storage.batch_write([{"table": "notes", "data": row(i)} for i in range(30)])
        await converged(client, htpc, storage)
        central = central_db_path(htpc.data_dir, "gone-agent")
        central.unlink()  # while serving: the HTPC's open connection would go on writing into a deleted file
        state = await converged(client, htpc, storage)
        assert state["resyncs"] == 1 and central.exists()

        htpc.stop()
        central.write_bytes(b"garbage, not a database" * 1000)  # damaged while the HTPC was down
        htpc.start()
        state = await converged(client, htpc, storage)
        assert state["resyncs"] == 1  # a fresh file, resynced once
        (quarantined,) = (htpc.data_dir / "quarantine").glob("gone-agent-*.db")
        assert quarantined.read_bytes().startswith(b"garbage")
