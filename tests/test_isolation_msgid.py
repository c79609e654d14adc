"""Isolation, issue 9 items 1 and 10: message-id squatting, and relay rows SQLite would refuse.

Everything runs against real processes with authentication on: `replicator serve --auth on` with its embedded
nats-server secured by the generated per-agent nkeys, agents with only their own NATS key and API token.

Item 1: JetStream deduplicates by `Nats-Msg-Id` over the whole stream, so an agent that could compute another
agent's next message ids could publish them first (on its own subject) and make the victim's records
"duplicates" that JetStream drops. Ids are now keyed with a secret only their owner holds (the agent's
database; the HTPC for relay writes). The tests squat every id an attacker could compute, then check the victim's
rows arrive complete (count + checksum) with lag 0; and, with the victim's own secret (a leak), that a duplicate
PubAck the victim never earned is an alarm: the record is kept, republished under a fresh id, and reported.

Item 10: a relay row SQLite would refuse (2,001 columns, a record above --max-record-bytes) is answered with a
4xx before anything is published, and one that reaches the stream anyway is dead-lettered, never retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client as NATS

from agent_client import (
    REPLICATOR_INBOX,
    STREAM_NAME,
    AgentStorage,
    Migration,
    agent_inbox_prefix,
    changes_subject,
    msg_id,
    relay_subject,
)
from agent_client.query_responder import answer_query
from tests.support.credentials import make_credentials
from tests.support.htpc import HtpcProcess, apoll, rows_digest, sqlite_rows
from tests.support.nats_server import NatsServer, free_port
from tests.support.stream_reader import read_agent_stream

NOTES = [Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")]
AGENTS = ("agent-a", "agent-b", "agent-c", "agent-d", "agent-e", "agent-w")
MAX_RECORD_BYTES = 64 * 1024  # the HTPC's --max-record-bytes here (its smallest allowed value)
#: Change sequence numbers ahead of the victim's watermark whose every range the attacker squats.
SQUAT_AHEAD = 30


@dataclass
class Secured:
    htpc: HtpcProcess
    tokens: dict[str, str]
    seeds: dict[str, Path]
    replicator_seed: Path
    nats_url: str

    def client(self, who: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.htpc.url, headers={"Authorization": f"Bearer {self.tokens[who]}"}, timeout=15
        )

    async def nats_as(self, who: str) -> NATS:
        """A NATS connection holding only `who`'s key (an agent id, or "replicator")."""
        if who == "replicator":
            seed, inbox = self.replicator_seed, REPLICATOR_INBOX
        else:
            seed, inbox = self.seeds[who], agent_inbox_prefix(who)
        return await nats.connect(
            self.nats_url, nkeys_seed_str=seed.read_text().strip(), inbox_prefix=inbox, allow_reconnect=False
        )


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    data = tmp_path_factory.mktemp("isolation-msgid") / "htpc"
    tokens, seeds = make_credentials(data, AGENTS)
    htpc = HtpcProcess(data, None, extra_args=["--auth", "on", "--max-record-bytes", str(MAX_RECORD_BYTES)])
    htpc.start()
    try:
        url = str(htpc.get("/relay/info").json()["nats_url"])
        yield Secured(htpc, tokens, seeds, data / "auth" / "replicator.nk", url)
    finally:
        htpc.close()


@pytest.fixture
async def agent_storage(secured: Secured, tmp_path: Path) -> AsyncIterator[Any]:
    """`await open_as(agent_id)`: an agent with its own key and token, table `notes` replicated; all closed after."""
    opened: list[AgentStorage] = []

    async def open_as(agent_id: str) -> AgentStorage:
        st = AgentStorage(
            agent_id,
            tmp_path / agent_id,
            htpc_url=secured.htpc.url,
            nats_url=secured.nats_url,
            nats_seed_file=secured.seeds[agent_id],
            htpc_token=secured.tokens[agent_id],
            max_record_bytes=16 * 1024,
        )
        await st.open()
        opened.append(st)
        await st.migrate(NOTES)
        await st.set_visibility("notes", "always")
        return st

    try:
        yield open_as
    finally:
        for st in opened:
            await st.close()


def _secret_of(st: AgentStorage) -> bytes:
    """The agent's message id secret, read from its database file (what a leak would hand an attacker)."""
    rows = sqlite_rows(st.db_path, "SELECT key FROM _cr_secret")
    assert len(rows) == 1 and isinstance(rows[0][0], bytes) and len(rows[0][0]) == 32
    return rows[0][0]


async def _agent_state(secured: Secured, who: str, agent_id: str, *, missing_ok: bool = False) -> dict[str, Any] | None:
    """`who`'s view of `agent_id` on the HTPC; None (with missing_ok) while the HTPC has applied nothing of it."""
    async with secured.client(who) as c:
        resp = await c.get(f"/relay/agents/{agent_id}")
        if missing_ok and resp.status_code == 404:
            return None
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body


async def _applied(secured: Secured, st: AgentStorage, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the HTPC's watermark of `st` reaches its last local commit (lag 0); its /relay/agents entry."""
    last = await st.last_committed_seq()

    async def check() -> dict[str, Any] | None:
        body = await _agent_state(secured, "ops", st.agent_id, missing_ok=True)
        return body if body and body["epoch"] == st.epoch and body["watermark"] >= last else None

    return await apoll(check, timeout, f"{st.agent_id} applied up to {last}")


async def _central_notes(secured: Secured, agent_id: str) -> list[list[Any]]:
    async with secured.client(agent_id) as c:
        resp = await c.post("/relay/query", json={"agent_id": agent_id, "query": "SELECT id, body FROM notes"})
        assert resp.status_code == 200, resp.text
        rows: list[list[Any]] = resp.json()["rows"]
        return rows


async def _assert_complete(secured: Secured, st: AgentStorage, expected_rows: int) -> tuple[int, str]:
    """The victim's central copy equals its local table exactly (count + checksum), and lag is 0."""
    state = await _applied(secured, st)
    local = [[r["id"], r["body"]] for r in await st.query_local("SELECT id, body FROM notes")]
    central = await _central_notes(secured, st.agent_id)
    assert len(local) == expected_rows
    assert rows_digest(central) == rows_digest(local), "the central copy differs from the agent's rows"
    assert state["watermark"] == await st.last_committed_seq()
    return rows_digest(local)


def _guessable_ids(agent_id: str, epoch: str, first: int, last: int) -> list[str]:
    """Every id of changes first..last an attacker can compute from what it may read (agent id, epoch, seqs)."""
    text = f"{epoch}:{first}-{last}"
    keys = [epoch.encode(), agent_id.encode().ljust(16, b"\0"), bytes(32), (agent_id + epoch).encode()]
    return [
        f"{agent_id}:{text}",  # the old form
        f"{agent_id}:" + hashlib.sha256(text.encode()).hexdigest()[:32],
        *(f"{agent_id}:" + hmac.new(k, text.encode(), hashlib.sha256).hexdigest()[:32] for k in keys),
    ]


async def _publish_all(nc: NATS, subject: str, ids: list[str], payload: bytes) -> list[Any]:
    js = nc.jetstream(timeout=10)
    acks: list[Any] = []
    for start in range(0, len(ids), 200):
        chunk = ids[start : start + 200]
        acks += await asyncio.gather(*(js.publish(subject, payload, headers={"Nats-Msg-Id": i}) for i in chunk))
    return acks


# --------------------------------------------------------------------------- (a) the squatting attack


async def test_squatting_the_victims_next_ids_loses_nothing(secured: Secured, agent_storage: Any) -> None:
    victim: AgentStorage = await agent_storage("agent-b")
    for i in range(5):
        await victim.write_data("notes", {"id": i, "body": f"before {i}"})
    await victim.flush(timeout=20)
    await _applied(secured, victim)

    # The attacker reads the victim's epoch and watermark like any agent may, and squats, on its own subject
    # with its own key, every id the victim's next records could carry by any rule it can compute.
    seen = await _agent_state(secured, "agent-a", "agent-b")
    assert seen is not None
    epoch, watermark = seen["epoch"], seen["watermark"]
    assert (epoch, watermark) == (victim.epoch, await victim.last_committed_seq())
    ids = [
        mid
        for first in range(watermark + 1, watermark + SQUAT_AHEAD + 1)
        for last in range(first, watermark + SQUAT_AHEAD + 1)
        for mid in _guessable_ids("agent-b", epoch, first, last)
    ]
    attacker = await secured.nats_as("agent-a")
    try:
        started = time.monotonic()
        acks = await _publish_all(attacker, changes_subject("agent-a"), ids, b'{"v":1,"squat":true}')
        squat_s = time.monotonic() - started
    finally:
        await attacker.close()
    assert all(a.stream == STREAM_NAME and not a.duplicate for a in acks), "every squatting message was stored"
    squat_seqs = {a.seq for a in acks}

    # The victim writes SQUAT_AHEAD changes: single-row records (flushed one by one, so the first is exactly
    # watermark+1..watermark+1) and two five-row transactions.
    started = time.monotonic()
    for i in range(20):
        await victim.write_data("notes", {"id": 100 + i, "body": f"after {i}"})
        await victim.flush(timeout=20)
    for b in range(2):
        await victim.batch_write([{"table": "notes", "data": {"id": 200 + 10 * b + k, "body": "tx"}} for k in range(5)])
    await victim.flush(timeout=20)
    flush_s = time.monotonic() - started
    assert await victim.last_committed_seq() == watermark + SQUAT_AHEAD

    count, digest = await _assert_complete(secured, victim, 5 + 20 + 10)
    health = await victim.health_check()
    assert health["msg_id_collisions"] == 0 and health["last_msg_id_collision"] is None
    assert health["backlog"]["changes"] == 0

    # Control: the squatted old-form id of the victim's first record is still in the duplicate window (so
    # with the old ids that record would have been dropped), while the victim's real, keyed id of that same
    # record names the victim's own message, not one of the attacker's.
    replicator = await secured.nats_as("replicator")
    try:
        js = replicator.jetstream(timeout=10)
        subject = changes_subject("agent-b")
        old = await js.publish(
            subject, b"control", headers={"Nats-Msg-Id": f"agent-b:{epoch}:{watermark + 1}-{watermark + 1}"}
        )
        assert old.duplicate is True and old.seq in squat_seqs
        real_id = msg_id("agent-b", epoch, watermark + 1, watermark + 1, secret=_secret_of(victim))
        assert real_id.startswith("agent-b:") and real_id not in ids
        real = await js.publish(subject, b"control", headers={"Nats-Msg-Id": real_id})
        assert real.duplicate is True and real.seq not in squat_seqs
    finally:
        await replicator.close()
    print(
        f"\nsquatting: {len(ids)} ids squatted in {squat_s:.2f} s; victim wrote {SQUAT_AHEAD} changes "
        f"(22 records) and flushed in {flush_s:.2f} s; central copy {count} rows, sha256 {digest[:16]}, lag 0"
    )


# --------------------------------------------------------------------------- (b) a collision with a leaked secret


async def test_a_duplicate_pubAck_never_earned_is_a_reported_collision_and_loses_nothing(
    secured: Secured, agent_storage: Any
) -> None:
    victim: AgentStorage = await agent_storage("agent-d")
    for i in range(3):
        await victim.write_data("notes", {"id": i, "body": f"first {i}"})
    await victim.flush(timeout=20)
    await _applied(secured, victim)
    secret = _secret_of(victim)  # the leak: whoever holds it can compute the victim's ids
    squatter = await secured.nats_as("agent-d")  # and publish on the victim's subject with the victim's key
    try:
        js = squatter.jetstream(timeout=10)
        # 1. the next record is exactly watermark+1..watermark+1 (one row, nothing else in flight)
        w = await victim.last_committed_seq()
        taken = msg_id("agent-d", victim.epoch, w + 1, w + 1, secret=secret)
        squat = await js.publish(changes_subject("agent-d"), b"squatted", headers={"Nats-Msg-Id": taken})
        assert not squat.duplicate
        await victim.write_data("notes", {"id": 10, "body": "collided"})
        await victim.flush(timeout=30)
        health = await victim.health_check()
        assert health["msg_id_collisions"] == 1
        last = health["last_msg_id_collision"]
        assert (last["first_seq"], last["last_seq"], last["msg_id"], last["stream_seq"]) == (
            w + 1,
            w + 1,
            taken,
            squat.seq,
        )
        await _assert_complete(secured, victim, 4)

        # 2. a burst: several records in flight behind the one that collides (whatever its length)
        w = await victim.last_committed_seq()
        ids = [msg_id("agent-d", victim.epoch, w + 1, last, secret=secret) for last in range(w + 1, w + 21)]
        await _publish_all(squatter, changes_subject("agent-d"), ids, b"squatted")
        started = time.monotonic()
        for i in range(20):
            await victim.write_data("notes", {"id": 100 + i, "body": f"burst {i}"})
        await victim.flush(timeout=30)
        flush_s = time.monotonic() - started
    finally:
        await squatter.close()
    health = await victim.health_check()
    assert health["msg_id_collisions"] == 2
    assert health["last_msg_id_collision"]["first_seq"] == w + 1
    count, _digest = await _assert_complete(secured, victim, 24)

    async def nonces_forgotten() -> bool:  # kept only until the record is acknowledged and trimmed
        return (await victim.query_local("SELECT count(*) AS n FROM _cr_msg_nonce"))[0]["n"] == 0

    await apoll(nonces_forgotten, 10, "fresh-id nonces trimmed")
    print(f"\ncollision: 2 collisions reported, burst of 20 rows flushed in {flush_s:.2f} s, {count} rows, lag 0")


async def test_a_fresh_id_saved_before_a_crash_is_used_after_it(nats_server: NatsServer, tmp_path: Path) -> None:
    """The nonce of a record's fresh id is in the database: after a restart the record goes out under it."""
    dead_url = f"nats://127.0.0.1:{free_port()}"  # nothing listens: the agent works offline and logs
    async with AgentStorage("agent-n", tmp_path, nats_url=dead_url) as st:
        await st.migrate(NOTES)
        await st.set_visibility("notes", "always")
        for i in range(6):
            await st.write_data("notes", {"id": i, "body": f"row {i}"})
            await asyncio.sleep(0.15)  # the publisher closes each group on its own
        db_path, epoch, secret = st.db_path, st.epoch, _secret_of(st)
    conn = sqlite3.connect(db_path)
    try:
        groups = conn.execute("SELECT min(seq), max(seq) FROM _cr_log GROUP BY tx ORDER BY tx").fetchall()
        first, last = groups[-1]  # one record per group (all small)
        conn.execute("INSERT INTO _cr_msg_nonce (first, last, nonce) VALUES (?, ?, 'saved-nonce')", (first, last))
        conn.commit()
    finally:
        conn.close()
    async with AgentStorage("agent-n", tmp_path, nats_url=nats_server.url) as st:
        await st.flush(timeout=20)
        assert (await st.health_check())["msg_id_collisions"] == 0

        async def trimmed() -> bool:
            return (await st.query_local("SELECT count(*) AS n FROM _cr_msg_nonce"))[0]["n"] == 0

        await apoll(trimmed, 10, "nonce trimmed with its record")
    messages = await read_agent_stream(nats_server.url, "agent-n")
    by_range = {(m.record.first_seq, m.record.last_seq): m.msg_id for m in messages}
    assert by_range[(first, last)] == msg_id("agent-n", epoch, first, last, secret=secret, nonce="saved-nonce")
    others = {k: v for k, v in by_range.items() if k != (first, last)}
    assert others and all(v == msg_id("agent-n", epoch, a, b, secret=secret) for (a, b), v in others.items())


async def test_the_secret_is_made_once_per_database_and_kept(tmp_path: Path) -> None:
    async with AgentStorage("agent-s", tmp_path / "one", replicate=False) as st:
        one = _secret_of(st)
        assert not await st.visibility()  # internal: not a user table
        health = await st.health_check()
        assert one.hex() not in repr(health) and "_cr_secret" not in repr(health)
    async with AgentStorage("agent-s", tmp_path / "one", replicate=False) as st:
        again = _secret_of(st)
    async with AgentStorage("agent-s", tmp_path / "two", replicate=False) as st:
        other = _secret_of(st)
    assert one == again != other


async def test_the_secret_is_not_readable_by_a_forwarded_query(tmp_path: Path) -> None:
    """The HTPC forwards on_demand queries to the agent: they may read declared tables only, never `_cr_secret`."""
    async with AgentStorage("agent-q", tmp_path, replicate=False) as st:
        await st.migrate(NOTES)
        await st.set_visibility("notes", "on_demand")
        path = st.db_path
    for sql in ("SELECT key FROM _cr_secret", 'SELECT key FROM "agent-q"._cr_secret', "SELECT * FROM _cr_msg_nonce"):
        answer = answer_query(path, {"query": sql}, "agent-q")
        assert answer.get("error") == "query_not_allowed", (sql, answer)
    assert answer_query(path, {"query": "SELECT count(*) FROM notes"}, "agent-q")["rows"] == [[0]]


async def test_an_older_database_gets_a_secret_at_open(tmp_path: Path) -> None:
    async with AgentStorage("agent-o", tmp_path, replicate=False) as st:
        await st.migrate(NOTES)
        path = st.db_path
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE _cr_secret")  # as a database made before ids were keyed
    conn.execute("DROP TABLE _cr_msg_nonce")
    conn.commit()
    conn.close()
    async with AgentStorage("agent-o", tmp_path, replicate=False) as st:
        assert len(_secret_of(st)) == 32


# --------------------------------------------------------------------------- (c) relay ids


async def test_an_agent_cannot_make_a_relay_write_a_duplicate(secured: Secured) -> None:
    """Agent E squats, on its own subject, every relay id of agent C's next Idempotency-Keys it can compute."""
    keys = [f"order-{i}" for i in range(5)]
    squat_ids = []
    for key in keys:
        text = f"agent-c\0{key}".encode()
        squat_ids += [
            f"relay:agent-c:{key}",  # the old form
            "relay:agent-c:" + hashlib.sha256(text).hexdigest()[:32],
            "relay:agent-c:" + hmac.new(bytes(32), text, hashlib.sha256).hexdigest()[:32],
        ]
    attacker = await secured.nats_as("agent-e")
    try:
        acks = await _publish_all(attacker, changes_subject("agent-e"), squat_ids, b"squat")
    finally:
        await attacker.close()
    assert all(not a.duplicate for a in acks)

    for agent in ("agent-c",):
        async with secured.client(agent) as c:
            for i, key in enumerate(keys):
                body = {"agent_id": agent, "table": "orders", "data": {"id": i, "item": f"item {i}"}}
                first = await c.post("/relay/immediate", json=body, headers={"Idempotency-Key": key})
                assert first.status_code == 202, first.text
                assert first.json()["duplicate"] is False, f"{agent}'s write with key {key} was squatted"
                again = await c.post("/relay/immediate", json=body, headers={"Idempotency-Key": key})
                assert again.status_code == 202 and again.json()["duplicate"] is True
                assert again.json()["stream_seq"] == first.json()["stream_seq"]

            async def orders(c: httpx.AsyncClient = c, agent: str = agent) -> list[Any] | None:
                resp = await c.post("/relay/query", json={"agent_id": agent, "query": "SELECT id, item FROM orders"})
                rows = resp.json().get("rows") if resp.status_code == 200 else None
                return rows if rows and len(rows) == len(keys) else None

            rows = await apoll(orders, 20, f"{agent}'s relay rows applied")
            assert sorted(map(tuple, rows)) == [(i, f"item {i}") for i in range(len(keys))]


# --------------------------------------------------------------------------- (d) item 10: rows SQLite would refuse


def _wide(columns: int, value: int = 7) -> dict[str, Any]:
    return {"id": 1, **{f"c{i}": value for i in range(1, columns)}}


async def _relay_rows(c: httpx.AsyncClient, agent: str, sql: str) -> list[Any] | None:
    resp = await c.post("/relay/query", json={"agent_id": agent, "query": sql})
    return resp.json().get("rows") if resp.status_code == 200 else None


async def _dead_letters(secured: Secured, agent: str) -> list[dict[str, Any]]:
    async with secured.client("ops") as ops:
        resp = await ops.get("/relay/dead-letters", params={"agent_id": agent, "limit": 1000})
        assert resp.status_code == 200, resp.text
        letters: list[dict[str, Any]] = resp.json()["dead_letters"]
        return letters


async def test_too_many_columns_or_bytes_is_a_4xx_and_2000_columns_apply(secured: Secured) -> None:
    async with secured.client("agent-w") as c:
        resp = await c.post("/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": _wide(2001)})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"] == "too_many_columns" and "2000" in resp.json()["message"]

        resp = await c.post("/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": _wide(2000)})
        assert resp.status_code == 202, resp.text
        rows = await apoll(lambda: _relay_rows(c, "agent-w", "SELECT id, c1, c1999 FROM wide"), 20, "2,000 columns")
        assert rows == [[1, 7, 7]]
        # the table now has 2,000 columns: one more, under any name, cannot be added
        resp = await c.post(
            "/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": {"id": 2, "x": 1}}
        )
        assert resp.status_code == 400 and resp.json()["error"] == "too_many_columns", resp.text
        resp = await c.post(
            "/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": {"id": 2, "C5": 9}}
        )
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_identifier", resp.text  # c5 to SQLite
        resp = await c.post(
            "/relay/immediate", json={"agent_id": "agent-w", "table": "WIDE", "data": {"id": 2, "c5": 9}}
        )
        assert resp.status_code == 400 and resp.json()["error"] == "invalid_identifier", resp.text
        resp = await c.post(
            "/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": {"id": 2, "c5": 9}}
        )
        assert resp.status_code == 202, resp.text

        big = {"id": 1, "blob": "x" * (MAX_RECORD_BYTES + 1000)}
        resp = await c.post("/relay/immediate", json={"agent_id": "agent-w", "table": "big", "data": big})
        assert resp.status_code == 413 and resp.json()["error"] == "record_too_large", resp.text
        many = [{"table": "big", "data": {"id": i, "v": "y" * 1000}} for i in range(100)]  # each row small, 100 KB
        resp = await c.post("/relay/batch", json={"agent_id": "agent-w", "records": many})
        assert resp.status_code == 413 and resp.json()["error"] == "record_too_large", resp.text
        resp = await c.post(
            "/relay/immediate", json={"agent_id": "agent-w", "table": "wide", "data": {"id": 3, "c2": 3}}
        )
        assert resp.status_code == 202

        async def rows_2_and_3() -> list[Any] | None:
            rows = await _relay_rows(c, "agent-w", "SELECT id, c2, c5 FROM wide WHERE id > 1 ORDER BY id")
            return rows if rows and len(rows) == 2 else None

        rows = await apoll(rows_2_and_3, 20, "rows 2 and 3")
        assert rows == [[2, None, 9], [3, 3, None]]
        assert await _relay_rows(c, "agent-w", "SELECT count(*) FROM big") is None  # nothing of `big` was written
    assert await _dead_letters(secured, "agent-w") == []


def _relay_record(agent: str, table: str, data: dict[str, Any]) -> bytes:
    return orjson.dumps({"v": 1, "kind": "relay", "agent_id": agent, "rows": [{"table": table, "data": data}]})


async def test_a_2001_column_relay_record_on_the_stream_is_dead_lettered_not_retried(secured: Secured) -> None:
    """Published directly with the replicator's own key (past the API's checks): a dead letter, and the next
    relay write of the same agent is applied."""
    replicator = await secured.nats_as("replicator")
    try:
        js = replicator.jetstream(timeout=10)
        bad = await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "wide2", _wide(2001)))
        good = await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "after", {"id": 1, "v": "ok"}))
    finally:
        await replicator.close()
    async with secured.client("agent-c") as c:
        rows = await apoll(lambda: _relay_rows(c, "agent-c", "SELECT id, v FROM after"), 20, "the next write")
        assert rows == [[1, "ok"]]
        assert await _relay_rows(c, "agent-c", "SELECT count(*) FROM wide2") is None
    letters = [d for d in await _dead_letters(secured, "agent-c") if d["stream_seq"] == bad.seq]
    assert len(letters) == 1 and "2001 columns" in letters[0]["reason"], letters
    assert good.seq == bad.seq + 1


async def test_relay_columns_added_beyond_the_limit_on_the_stream_are_dead_lettered(secured: Secured) -> None:
    """A relay table with 1,999 columns; then records adding two more (2,001), and one naming c7 as C7 (one
    column to SQLite): each is dead-lettered (or, for C7, applied to c7), never retried; the next is applied."""
    replicator = await secured.nats_as("replicator")
    try:
        js = replicator.jetstream(timeout=10)
        await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "grow", _wide(1999)))
        bad = await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "grow", {"id": 2, "n1": 1, "n2": 2}))
        case = await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "grow", {"id": 3, "C7": 3}))
        await js.publish(relay_subject("agent-c"), _relay_record("agent-c", "grow", {"id": 4, "c8": 4}))
    finally:
        await replicator.close()
    async with secured.client("agent-c") as c:

        async def settled() -> tuple[dict[int, dict[str, Any]], list[Any]] | None:
            letters = {d["stream_seq"]: d for d in await _dead_letters(secured, "agent-c")}
            rows = await _relay_rows(c, "agent-c", "SELECT id, c7, c8 FROM grow WHERE id > 1 ORDER BY id") or []
            case_done = [3, 3, None] in rows or case.seq in letters
            return (letters, rows) if bad.seq in letters and case_done and [4, None, 4] in rows else None

        letters, rows = await apoll(settled, 15, "both records dead-lettered or applied, and the next applied")
    reason = letters[bad.seq]["reason"]
    assert "2001 columns" in reason or "too many columns" in reason, reason
    assert [2, None, None] not in rows and len(rows) in (1, 2)
