"""SIGKILL of `replicator serve` while it applies, then restart: the central copy converges to exactly the agent's.

A real agent (AgentStorage in this process) writes thousands of rows in many transactions (inserts, updates,
deletes, primary-key changes, and transactions large enough to be split into several records) while the
replicator subprocess is SIGKILLed and restarted several times. During the run every observation of the central
copy must be a committed prefix (no half transaction); at the end it must equal the local tables row for row,
with the watermark at the agent's last committed sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from agent_client import AgentStorage, Migration
from tests.support.htpc import (
    AckDroppingProxy,
    HtpcProcess,
    apoll,
    open_agent,
    rows_digest,
    sqlite_rows,
)
from tests.support.nats_server import NatsServer

AGENT = "crash-agent"
ACCOUNTS, START_BALANCE = 50, 1000
BIG_TX_ROWS = 400
SCHEMA = Migration(
    1,
    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);\n"
    "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, score REAL, raw BLOB, tag TEXT);\n"
    "CREATE TABLE kv (k TEXT PRIMARY KEY, v)",
)
TABLES = {
    "accounts": ("id", "balance"),
    "notes": ("id", "body", "score", "raw", "tag"),
    "kv": ("k", "v"),
}


class Workload:
    """Many small and some large transactions; every one keeps two invariants the central copy must show too:
    the balances always sum to ACCOUNTS * START_BALANCE, and a tagged bulk insert is all there or not at all."""

    def __init__(self, storage: AgentStorage, seed: int) -> None:
        self.storage = storage
        self.rng = random.Random(seed)
        self.transactions = 0
        self.big = 0

    async def setup(self) -> None:
        await self.storage.batch_write(
            [{"table": "accounts", "data": {"id": k, "balance": START_BALANCE}} for k in range(ACCOUNTS)]
        )
        self.transactions += 1

    async def step(self, i: int) -> None:
        rng, st = self.rng, self.storage
        kind = i % 7
        if i % 150 == 149:
            # Large enough to be split into several records (max_record_bytes is small): still one central commit.
            self.big += 1
            async with st.transaction() as tx:
                for k in range(BIG_TX_ROWS):
                    await tx.write_data(
                        "notes", {"body": f"bulk {self.big}.{k} " + "x" * 40, "tag": f"bulk-{self.big}"}
                    )
                await tx.execute("UPDATE accounts SET balance = balance + CASE WHEN id % 2 = 0 THEN 7 ELSE -7 END")
        elif kind == 0:
            await st.batch_write(
                [
                    {
                        "table": "notes",
                        "data": {
                            "body": f"note {i}.{k}",
                            "score": rng.random() * 1e6,
                            "raw": rng.randbytes(rng.randrange(0, 24)),
                        },
                    }
                    for k in range(rng.randrange(1, 10))
                ]
            )
        elif kind in (1, 4):
            a, b = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randrange(1, 50)
            async with st.transaction() as tx:
                await tx.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, a))
                await tx.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, b))
        elif kind == 2:
            async with st.transaction() as tx:
                await tx.execute(
                    "UPDATE notes SET body = body || '+', score = -0.0 WHERE tag IS NULL AND id % 13 = ?",
                    (rng.randrange(13),),
                )
        elif kind == 3:
            async with st.transaction() as tx:
                await tx.execute(
                    "DELETE FROM notes WHERE id IN (SELECT id FROM notes WHERE tag IS NULL ORDER BY random() LIMIT 3)"
                )
        elif kind == 5:
            value: Any = rng.choice([rng.randrange(-(2**63), 2**63), rng.random(), f"s{i}", rng.randbytes(4), None])
            await st.write_data("kv", {"k": f"k{rng.randrange(40)}", "v": value})
        else:  # primary-key change: DELETE of the old key and upsert of the new one, in one transaction
            async with st.transaction() as tx:
                await tx.execute(
                    "UPDATE notes SET id = (SELECT max(id) FROM notes) + 1 "
                    "WHERE id = (SELECT min(id) FROM notes WHERE tag IS NULL)"
                )
        self.transactions += 1


def check_invariants(rows: list[list[Any]]) -> str | None:
    """One `/relay/query` observation of the central copy; returns what is wrong with it, if anything."""
    ((accounts, total, bad_bulk),) = rows
    if accounts not in (0, ACCOUNTS):
        return f"{accounts} accounts: the initial transaction is half visible"
    if total != accounts * START_BALANCE:
        return f"balances sum to {total}, not {accounts * START_BALANCE}: a transfer is half visible"
    if bad_bulk:
        return f"bulk transactions partly visible: {bad_bulk}"
    return None


INVARIANT_SQL = (
    "SELECT (SELECT count(*) FROM accounts), (SELECT coalesce(sum(balance), 0) FROM accounts), "
    f"(SELECT group_concat(tag || ':' || n) FROM (SELECT tag, count(*) AS n FROM notes WHERE tag IS NOT NULL "
    f"GROUP BY tag HAVING count(*) != {BIG_TX_ROWS}))"
)


async def test_sigkill_replicator_mid_apply_then_restart_is_exactly_once(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url)
    await asyncio.to_thread(htpc.start)
    storage = await open_agent(
        AGENT,
        tmp_path / "agent",
        htpc_url=htpc.url,
        nats_url=nats_server.url,
        migrations=[SCHEMA],
        visibility=dict.fromkeys(TABLES, "always"),
        max_record_bytes=8 * 1024,
    )
    workload = Workload(storage, seed=20260106)
    kill_seed = random.randrange(2**32)  # where the kills land varies per run; the seed is in every failure message
    kill_rng = random.Random(kill_seed)
    observations: list[str] = []
    violations: list[str] = []
    kills: list[tuple[int, int]] = []  # (watermark seen just before the kill, agent's last committed seq then)
    try:
        await workload.setup()
        writer_done = asyncio.Event()

        stop_writing = asyncio.Event()

        async def writer(count: int) -> None:
            # At least `count` transactions, and on until the kills are done: on a slow machine a fixed amount
            # could all be applied before the last kill, leaving nothing to kill "mid-apply".
            i = 0
            while i < count or not stop_writing.is_set():
                await workload.step(i)
                i += 1
                if i % 25 == 0:
                    await asyncio.sleep(0)  # let the publisher and the monitor run
            writer_done.set()

        async with httpx.AsyncClient(base_url=htpc.url, timeout=5) as client:

            async def watermark() -> int:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    resp = await client.get(f"/relay/agents/{AGENT}")
                    if resp.status_code == 200:
                        return int(resp.json()["watermark"])
                return -1

            async def observe() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    resp = await client.post("/relay/query", json={"agent_id": AGENT, "query": INVARIANT_SQL})
                    if resp.status_code == 200:
                        observations.append(str(resp.json()["rows"]))
                        problem = check_invariants(resp.json()["rows"])
                        if problem:
                            violations.append(problem)

            async def kill_mid_apply(floor: int) -> None:
                """SIGKILL once the replicator has applied past a random point above `floor` (but not yet the
                agent's last change), so the kills land at different places of the apply."""
                head = await storage.last_committed_seq()
                target = floor + kill_rng.randint(1, max(1, (head - floor) // 2))

                async def applying() -> tuple[int, int] | None:
                    await observe()
                    wm = await watermark()
                    last = await storage.last_committed_seq()
                    return (wm, last) if target <= wm < last else None

                seen = await apoll(applying, 30, f"replicator applying past {floor}", interval=0.01)
                await asyncio.to_thread(htpc.kill)
                kills.append(seen)

            writing = asyncio.create_task(writer(1200))
            try:
                await kill_mid_apply(0)  # 1: during live replication
                await asyncio.sleep(0.5)  # the agent keeps writing into JetStream while the HTPC is dead
                for _ in range(3):  # 2-4: during catch-up on the backlog, right after a restart
                    await asyncio.to_thread(htpc.start)
                    await kill_mid_apply(kills[-1][0])
                # 5: a graceful SIGTERM in the middle of catch-up: the batch in hand commits, exit code 0.
                await asyncio.to_thread(htpc.start)
                await apoll(lambda: _applying_past(watermark, kills[-1][0]), 30, "catch-up under way")
                await asyncio.to_thread(htpc.stop)
                await asyncio.to_thread(htpc.start)
                stop_writing.set()
                while not writer_done.is_set():
                    await observe()
                    await asyncio.sleep(0.05)
            finally:
                stop_writing.set()  # also when a step above failed: the writer must end
                await writing  # re-raises a failed write

            last = await storage.last_committed_seq()
            await storage.flush(timeout=30)

            async def converged() -> dict[str, Any] | None:
                await observe()
                resp = await client.get(f"/relay/agents/{AGENT}")
                body: dict[str, Any] = resp.json()
                return body if resp.status_code == 200 and body["watermark"] >= last else None

            state = await apoll(converged, 60, f"watermark reaching the agent's last committed seq {last}")

        where = f"kill seed {kill_seed}, kills (watermark, agent seq) {kills}, last seq {last}"
        assert len(kills) == 4, where
        assert all(0 < wm < last_then for wm, last_then in kills), where
        assert workload.transactions > 1000 and workload.big >= 7
        assert observations and not violations, (where, violations[:5])
        assert state["epoch"] == storage.epoch
        assert state["watermark"] == last  # exactly the agent's last committed sequence, not beyond

        central = htpc.central_db(AGENT)
        for table, columns in TABLES.items():
            cols = ", ".join(columns)
            local = [tuple(r.values()) for r in await storage.query_local(f"SELECT {cols} FROM {table}")]
            remote = sqlite_rows(central, f"SELECT {cols} FROM {table}")
            assert rows_digest(remote) == rows_digest(local), f"{table}: central differs from local ({where})"
            pk = columns[0]
            ((count, distinct),) = sqlite_rows(central, f"SELECT count(*), count(DISTINCT {pk}) FROM {table}")
            assert count == distinct == len(local), (table, count, distinct, len(local))
        notes = len(await storage.query_local("SELECT id FROM notes"))
        assert notes > 3000, notes  # thousands of rows, really
        # The relay API answers from the same converged copy.
        async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
            resp = await client.post(
                "/relay/query", json={"agent_id": AGENT, "query": "SELECT count(*), total(balance) FROM accounts"}
            )
            assert resp.json()["rows"] == [[ACCOUNTS, float(ACCOUNTS * START_BALANCE)]]
    finally:
        await storage.close()
    await asyncio.to_thread(htpc.stop)  # SIGTERM after all that: still a clean exit 0


async def test_sigkill_with_relay_writes_in_flight(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    """HTTP relay writes accepted (202) before, during and after a replicator crash all land, each exactly once
    (the table has no key, so a record applied twice would show as an extra row)."""
    htpc = htpc_factory(nats_server.url)
    await asyncio.to_thread(htpc.start)
    accepted: list[int] = []

    async def send(client: httpx.AsyncClient, n: int) -> None:
        for attempt in range(200):  # while the HTPC is down the write is refused; a guide client would retry
            try:
                resp = await client.post(
                    "/relay/immediate",
                    json={"agent_id": "relay-crash", "table": "events", "data": {"n": n}},  # no id: no key
                    headers={"Idempotency-Key": f"event-{n}"},
                )
                if resp.status_code == 202:
                    accepted.append(n)
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05 + attempt * 0.01)
        raise AssertionError(f"write {n} never accepted")

    async with httpx.AsyncClient(base_url=htpc.url, timeout=5) as client:
        senders = [asyncio.create_task(send(client, n)) for n in range(300)]
        await apoll(lambda: _ready(len(accepted) > 50), 30, "some writes accepted")
        await asyncio.to_thread(htpc.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(htpc.start)
        await asyncio.gather(*senders)

        async def count() -> list[list[Any]] | None:
            resp = await client.post(
                "/relay/query",
                json={"agent_id": "relay-crash", "query": "SELECT count(*), count(DISTINCT n), sum(n) FROM events"},
            )
            rows: list[list[Any]] = resp.json().get("rows", [])
            return rows if rows and rows[0][0] >= 300 else None

        rows = await apoll(count, 30, "all 300 relay writes applied")
    assert sorted(accepted) == list(range(300))
    assert rows == [[300, 300, sum(range(300))]]
    await asyncio.to_thread(htpc.stop)


async def _ready(value: bool) -> bool:
    return value


async def _applying_past(watermark: Callable[[], Awaitable[int]], floor: int) -> bool:
    return await watermark() > floor


async def test_relay_writes_applied_once_when_acks_are_lost(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess]
) -> None:
    """A relay record the replicator committed but could not ack is redelivered (ack_wait): it must not be
    applied a second time, neither doubling a key-less row nor overwriting a newer value of a keyed row."""
    proxy = AckDroppingProxy(nats_server.port)
    htpc = htpc_factory(proxy.url)
    try:
        await asyncio.to_thread(htpc.start)
        async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:

            async def write(table: str, data: dict[str, Any]) -> None:
                resp = await client.post(
                    "/relay/immediate", json={"agent_id": "lost-acks", "table": table, "data": data}
                )
                assert resp.status_code == 202, resp.text

            async def rows(sql: str) -> list[list[Any]]:
                resp = await client.post("/relay/query", json={"agent_id": "lost-acks", "query": sql})
                return resp.json()["rows"] if resp.status_code == 200 else []

            await write("events", {"n": 0})
            await write("settings", {"id": "mode", "value": "initial"})
            await apoll(lambda: _has(rows("SELECT count(*) FROM settings"), [[1]]), 15, "first writes applied")

            proxy.drop_acks = True  # from here the replicator's acks never reach nats-server
            await write("events", {"n": 1})
            await write("settings", {"id": "mode", "value": "old"})
            await apoll(lambda: _has(rows("SELECT value FROM settings"), [["old"]]), 15, "writes applied, acks lost")

            async def both_acks_dropped() -> bool:  # the acks go out just after the commit a query already sees
                return proxy.dropped >= 2

            await apoll(both_acks_dropped, 15, "the acks of both records dropped")
            proxy.drop_acks = False
            await write("settings", {"id": "mode", "value": "new"})
            await write("events", {"n": 2})
            await apoll(lambda: _has(rows("SELECT count(*) FROM events WHERE n = 2"), [[1]]), 15, "later writes")

            # The unacked records come back after the consumer's ack_wait (5 s); give them time to be re-applied.
            async def redelivered() -> bool:
                metrics = (await client.get("/metrics")).text
                return "replicator_messages_total" in metrics and _counter(metrics, "replicator_messages_total") >= 8

            await apoll(redelivered, 20, "the two unacked records redelivered")
            await asyncio.sleep(0.5)
            assert await rows("SELECT n, count(*) FROM events GROUP BY n ORDER BY n") == [[0, 1], [1, 1], [2, 1]]
            assert await rows("SELECT value FROM settings") == [["new"]]
    finally:
        proxy.close()
    await asyncio.to_thread(htpc.stop)


async def _has(query: Awaitable[list[list[Any]]], expected: list[list[Any]]) -> bool:
    return await query == expected


def _counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
