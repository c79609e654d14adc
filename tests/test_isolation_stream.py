"""Isolation on the stream side: what one agent's NATS key can do to other agents' replication.

A real `replicator serve --auth on` (embedded nats-server secured with per-agent
nkeys) with a victim agent replicating through its own AgentStorage, while an
attacker holding only its own key publishes what a hostile agent would: tens of
thousands of out-of-order records, relay records, acknowledgements redirected onto
the victim's subject, empty and oversized messages, another agent's message ids,
and more data than its quota. Each test checks the victim's central copy against
its local database (count and checksum), and that the attacker got a clear refusal
or was marked blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NATS

from agent_client import (
    STREAM_NAME,
    AgentStorage,
    Migration,
    agent_inbox_prefix,
    changes_subject,
    relay_subject,
)
from tests.support.credentials import make_credentials
from tests.support.htpc import (
    HtpcProcess,
    forged_record,
    poll,
    run_cli,
    sqlite_rows,
    table_digest,
    wait_agent_applied,
)

SCHEMA = [Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, at REAL)")]
COLUMNS = ("id", "body", "at")
LAYOUT = {
    "0": {
        "table": "loot",
        "columns": ["id", "v"],
        "pk": ["id"],
        "types": ["INTEGER", "TEXT"],
        "sql": "CREATE TABLE loot (id INTEGER PRIMARY KEY, v TEXT)",
    }
}
AGENTS = ("victim", "flooder", "relayer", "replier", "junker", "squatter", "hog")
HELD_CAP = 3_000
FLOOD = 25_000


class Cluster:
    def __init__(self, htpc: HtpcProcess, tokens: dict[str, str], seeds: dict[str, str]) -> None:
        self.htpc, self.tokens, self.seeds = htpc, tokens, seeds

    @property
    def nats_url(self) -> str:
        return str(self.htpc.get("/relay/info").json()["nats_url"])

    def ops(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.htpc.url, headers={"Authorization": f"Bearer {self.tokens['ops']}"}, timeout=15
        )

    def agent_status(self, agent: str) -> dict[str, Any]:
        with self.ops() as c:
            resp = c.get(f"/relay/agents/{agent}")
            return dict(resp.json()) if resp.status_code == 200 else {}

    def dead_letters(self, agent: str) -> list[dict[str, Any]]:
        with self.ops() as c:
            resp = c.get("/relay/dead-letters", params={"agent_id": agent, "limit": 1000})
            assert resp.status_code == 200, resp.text
            return list(resp.json()["dead_letters"])

    def metric(self, name: str) -> float:
        with self.ops() as c:
            for line in c.get("/metrics").text.splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
        raise AssertionError(f"metric {name} not exposed")

    @contextlib.asynccontextmanager
    async def raw(self, agent: str) -> AsyncIterator[NATS]:
        """A bare NATS connection with `agent`'s own key: what a hostile agent holds."""
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc = await nats.connect(
            self.nats_url,
            nkeys_seed_str=self.seeds[agent],
            inbox_prefix=agent_inbox_prefix(agent).encode(),
            allow_reconnect=False,
            error_cb=on_error,
        )
        try:
            yield nc
        finally:
            await nc.close()

    @contextlib.asynccontextmanager
    async def storage(self, agent: str, path: Path, **options: Any) -> AsyncIterator[AgentStorage]:
        async with AgentStorage(
            agent,
            path,
            htpc_url=self.htpc.url,
            nats_seed=self.seeds[agent],
            htpc_token=self.tokens[agent],
            **options,
        ) as st:
            await st.migrate(SCHEMA)
            await st.set_visibility("notes", "always")
            yield st


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    data = tmp_path_factory.mktemp("isolation") / "htpc"
    tokens, seed_files = make_credentials(data, AGENTS)
    seeds = {agent: path.read_text().strip() for agent, path in seed_files.items()}
    htpc = HtpcProcess(
        data,
        None,
        extra_args=[
            "--auth",
            "on",
            "--max-held-per-agent",
            str(HELD_CAP),
            "--dead-letters-per-agent",
            "10",
            "--dead-letter-payload-bytes",
            "1024",
            "--max-agent-bytes",
            str(2 * 1024 * 1024),
            "--max-record-bytes",
            str(256 * 1024),
        ],
    )
    htpc.start()
    try:
        yield Cluster(htpc, tokens, seeds)
    finally:
        htpc.close()


async def _wait_replicated(cluster: Cluster, st: AgentStorage, timeout: float = 60) -> None:
    """Until the HTPC has applied everything the agent committed."""
    await st.flush(timeout=timeout)
    last = await st.last_committed_seq()
    headers = {"Authorization": f"Bearer {cluster.tokens['ops']}"}
    async with httpx.AsyncClient(base_url=cluster.htpc.url, headers=headers, timeout=15) as client:
        # The module's agents reopen with new databases (new epochs): wait for this one's, not a watermark
        # left by an earlier test's epoch.
        await wait_agent_applied(client, st.agent_id, last, epoch=st.epoch, timeout=timeout)


def _assert_central_equals_local(cluster: Cluster, st: AgentStorage) -> tuple[int, str]:
    local = table_digest(st.db_path, "notes", COLUMNS)
    central = table_digest(cluster.htpc.central_db(st.agent_id), "notes", COLUMNS)
    assert central == local, (central, local)
    return local


async def _publish_all(nc: NATS, subject: str, payloads: list[bytes], headers: list[dict[str, str] | None]) -> int:
    """Publish through JetStream, 500 in flight; the number acknowledged."""
    js = nc.jetstream()
    acked = 0
    for start in range(0, len(payloads), 500):
        chunk = zip(payloads[start : start + 500], headers[start : start + 500], strict=True)
        results = await asyncio.gather(
            *(js.publish(subject, p, headers=h, timeout=30) for p, h in chunk), return_exceptions=True
        )
        acked += sum(1 for r in results if not isinstance(r, BaseException))
    return acked


# ----------------------------------------------------------------------------- 2. gap flood
async def test_a_gap_flood_blocks_the_flooder_and_never_starves_the_victim(cluster: Cluster, tmp_path: Path) -> None:
    """25,000 out-of-order records from one key: the victim's delay stays near its baseline, the flooder is
    blocked at --max-held-per-agent, and nothing is left pending in the consumer (before: everyone stopped)."""
    async with cluster.storage("victim", tmp_path / "victim") as victim:
        delays: dict[str, list[float]] = {"before": [], "during": [], "after restart": []}
        next_id = 0

        async def probe(phase: str, count: int) -> None:
            nonlocal next_id
            for _ in range(count):
                next_id += 1
                started = time.monotonic()
                await victim.write_data("notes", {"id": next_id, "body": phase, "at": time.time()})
                await _wait_replicated(cluster, victim, timeout=60)
                delays[phase].append(time.monotonic() - started)

        await probe("before", 20)
        epoch = "f100d0000000abcd"
        payloads = [
            forged_record("flooder", first, [(first, "U", 0, [first, "x"])], LAYOUT, epoch=epoch)
            for first in range(2, FLOOD + 2)  # change 1 never comes: every record is ahead of its turn
        ]
        async with cluster.raw("flooder") as nc:
            flood = asyncio.create_task(_publish_all(nc, changes_subject("flooder"), payloads, [None] * FLOOD))
            while not flood.done():
                await probe("during", 1)
            acked = await flood
        assert acked == FLOOD
        await probe("during", 5)

        flooder = await asyncio.to_thread(
            poll,
            lambda: s if (s := cluster.agent_status("flooder")).get("blocked") else None,
            60,
            "flooder blocked",
        )
        assert f"over {HELD_CAP} records" in flooder["blocked"]
        assert flooder["waiting_records"] == HELD_CAP and flooder["watermark"] == 0
        over_cap = cluster.metric("replicator_records_over_cap_total")
        assert over_cap >= FLOOD - HELD_CAP

        # Nothing of the flood occupies the consumer's ack-pending window, and a restart changes nothing.
        assert await asyncio.to_thread(cluster.htpc.stop) == 0
        await asyncio.to_thread(cluster.htpc.start)
        await probe("after restart", 10)
        _assert_central_equals_local(cluster, victim)
        assert cluster.agent_status("victim")["blocked"] is None
        assert cluster.agent_status("flooder")["waiting_records"] == HELD_CAP
        with cluster.ops() as ops:
            assert ops.get("/health").json()["consumer"]["running"] is True

        def p(values: list[float], q: float) -> float:
            return sorted(values)[min(len(values) - 1, int(q * len(values)))] * 1000

        print(
            "\nvictim write->applied delay (ms): "
            + "; ".join(
                f"{phase}: n={len(v)} p50={statistics.median(v) * 1000:.1f} p99={p(v, 0.99):.1f}"
                for phase, v in delays.items()
            )
            + f"; flood {FLOOD} records, terminated over the cap {over_cap:.0f}"
        )


# ----------------------------------------------------------------------------- 6. relay writes
async def test_only_the_htpc_writes_relay_records_and_never_into_an_agents_own_tables(
    cluster: Cluster, tmp_path: Path
) -> None:
    async with cluster.storage("victim", tmp_path / "victim") as victim:
        await victim.write_data("notes", {"id": 900_001, "body": "the victim's own row", "at": 1.0})
        await _wait_replicated(cluster, victim)
        before = _assert_central_equals_local(cluster, victim)
        relay_into_victim = orjson.dumps(
            {"v": 1, "kind": "relay", "agent_id": "victim", "rows": [{"table": "notes", "data": {"id": 900_001}}]}
        )
        relay_own = orjson.dumps(
            {"v": 1, "kind": "relay", "agent_id": "relayer", "rows": [{"table": "t", "data": {"id": 1, "v": "x"}}]}
        )
        async with cluster.raw("relayer") as nc:
            js = nc.jetstream()
            # An agent's key may not publish on any relay subject (its own included): no acknowledgement.
            for subject in (relay_subject("relayer"), relay_subject("victim")):
                with pytest.raises((nats.errors.Error, nats.js.errors.Error)):
                    await js.publish(subject, relay_own, timeout=2)
            # On its own changes subject a relay record is refused by the consumer.
            await js.publish(changes_subject("relayer"), relay_own)
        letters = await asyncio.to_thread(
            poll, lambda: cluster.dead_letters("relayer") or None, 30, "the relay record dead-lettered"
        )
        assert any("a relay record may not be published on 'agents.relayer.changes'" in d["reason"] for d in letters)

        # A relay record published by the HTPC's own key (the API, racing the agent's schema change) into the
        # victim's agent-owned table is refused where records are applied.
        replicator_seed = (cluster.htpc.data_dir / "auth" / "replicator.nk").read_text().strip()
        nc = await nats.connect(cluster.nats_url, nkeys_seed_str=replicator_seed, inbox_prefix=b"_INBOX_replicator")
        try:
            await nc.jetstream().publish(
                relay_subject("victim"), relay_into_victim, headers={"Nats-Msg-Id": "relay:victim:t1"}
            )
        finally:
            await nc.close()
        letters = await asyncio.to_thread(
            poll,
            lambda: [d for d in cluster.dead_letters("victim") if "belongs to agent victim" in d["reason"]] or None,
            30,
            "the relay write into an agent table dead-lettered",
        )
        assert letters
        assert _assert_central_equals_local(cluster, victim) == before


# ----------------------------------------------------------------------------- 7. redirected PubAcks
async def test_acknowledgements_redirected_onto_another_agents_subject_are_not_its_dead_letters(
    cluster: Cluster, tmp_path: Path
) -> None:
    before = len(cluster.dead_letters("victim"))
    foreign_before = cluster.metric("replicator_foreign_messages_total")
    async with cluster.raw("replier") as nc:
        for i in range(5):
            record = forged_record("replier", i + 1, [(i + 1, "U", 0, [i, "x"])], LAYOUT, epoch="aaaa0000bbbb1111")
            await nc.publish(changes_subject("replier"), record, reply=changes_subject("victim"))
        await nc.flush()
    async with cluster.storage("victim", tmp_path / "victim") as victim:
        await victim.write_data("notes", {"id": 910_001, "body": "after the trick", "at": 2.0})
        await _wait_replicated(cluster, victim)
        _assert_central_equals_local(cluster, victim)
    # Where the server stores the acknowledgements (it does unless it refuses the reply subject), the consumer
    # drops them; either way none of them becomes the victim's dead letter.
    assert len(cluster.dead_letters("victim")) == before
    stored_on_victim = await _count_stream_messages(cluster, changes_subject("victim"), b'"stream"')
    foreign = cluster.metric("replicator_foreign_messages_total") - foreign_before
    assert foreign == stored_on_victim, (foreign, stored_on_victim)
    print(f"\nacknowledgements stored on the victim's subject and dropped: {stored_on_victim}")


async def _count_stream_messages(cluster: Cluster, subject: str, marker: bytes) -> int:
    """How many messages on `subject` contain `marker` (read with the replicator's own key)."""
    seed = (cluster.htpc.data_dir / "auth" / "replicator.nk").read_text().strip()
    nc = await nats.connect(cluster.nats_url, nkeys_seed_str=seed, inbox_prefix=b"_INBOX_replicator")
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM_NAME)
        found = 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await js.get_msg(STREAM_NAME, seq)
                if msg.subject == subject and marker in (msg.data or b"") and not msg.headers:
                    found += 1
        return found
    finally:
        await nc.close()


# ----------------------------------------------------------------------------- 9, 11. junk and bounds
async def test_junk_is_bounded_and_listed_and_oversized_records_are_refused(cluster: Cluster) -> None:
    async with cluster.raw("junker") as nc:
        js = nc.jetstream()
        await js.publish(changes_subject("junker"), b"")  # an empty message
        for i in range(30):
            await js.publish(changes_subject("junker"), os.urandom(100 * 1024) + str(i).encode())
        with pytest.raises((nats.errors.Error, nats.js.errors.Error)) as refused:  # past --max-record-bytes
            await js.publish(changes_subject("junker"), b"x" * (300 * 1024), timeout=5)
    print(f"\noversized record refused: {refused.value!r}")
    letters = await asyncio.to_thread(
        poll,
        lambda: (
            d
            if cluster.metric("replicator_dead_letters_pruned_total") >= 21 and (d := cluster.dead_letters("junker"))
            else None
        ),
        30,
        "junk dead-lettered and pruned",
    )
    assert len(letters) == 10  # --dead-letters-per-agent
    assert all(d["payload_bytes"] >= 100 * 1024 for d in letters)
    stored = sqlite_rows(
        cluster.htpc.data_dir / "dead_letters.db",
        "SELECT max(length(payload)) FROM dead_letters WHERE agent_id = ?",
        ("junker",),
    )
    assert stored[0][0] <= 1024  # --dead-letter-payload-bytes
    # Listing them works (an empty payload once made this a 500 / a TypeError in the CLI).
    out = run_cli("dead-letters", "--url", cluster.htpc.url, f"--token={cluster.tokens['ops']}", "--agent", "junker")
    assert out.returncode == 0, out.stderr
    empty = run_cli("dead-letters", "--url", cluster.htpc.url, f"--token={cluster.tokens['ops']}", "--limit", "1000")
    assert empty.returncode == 0, empty.stderr


async def test_an_empty_message_is_listed_as_a_dead_letter(cluster: Cluster) -> None:
    async with cluster.raw("junker") as nc:
        await nc.jetstream().publish(changes_subject("junker"), b"", headers={"Nats-Msg-Id": "junker:empty"})
    letters = await asyncio.to_thread(
        poll,
        lambda: [d for d in cluster.dead_letters("junker") if d["payload_bytes"] == 0] or None,
        30,
        "the empty message listed",
    )
    assert letters[0]["payload_preview"] == "" and letters[0]["reason"]


async def test_an_agent_over_its_storage_quota_is_blocked_and_others_go_on(cluster: Cluster, tmp_path: Path) -> None:
    async with (
        cluster.storage("hog", tmp_path / "hog") as hog,
        cluster.storage("victim", tmp_path / "victim") as victim,
    ):
        body = "h" * 60_000
        for i in range(45):  # 2.7 MB against a 2 MiB quota
            await hog.write_data("notes", {"id": i, "body": body, "at": float(i)})
        await hog.flush(timeout=120)
        status = await asyncio.to_thread(
            poll, lambda: s if (s := cluster.agent_status("hog")).get("blocked") else None, 60, "hog blocked"
        )
        assert "over its storage quota" in status["blocked"]
        assert cluster.htpc.central_db("hog").stat().st_size <= 2 * 1024 * 1024 + 2 * 256 * 1024 + 16 * 1024 * 1024
        applied = sqlite_rows(cluster.htpc.central_db("hog"), "SELECT count(*), sum(length(body)) FROM notes")[0]
        assert 0 < applied[0] < 45 and applied[1] <= 2 * 1024 * 1024
        await victim.write_data("notes", {"id": 920_001, "body": "still replicated", "at": 3.0})
        await _wait_replicated(cluster, victim)
        _assert_central_equals_local(cluster, victim)


# ----------------------------------------------------------------------------- 1. ids on the wrong subject
async def test_a_message_id_of_another_agent_is_an_alarm_and_a_dead_letter(cluster: Cluster, tmp_path: Path) -> None:
    alarms = cluster.metric("replicator_msg_id_alarms_total")
    async with cluster.raw("squatter") as nc:
        record = forged_record("squatter", 1, [(1, "U", 0, [1, "x"])], LAYOUT, epoch="5a5a5a5a5a5a5a5a")
        for msg_id in ("victim:0000000000000000:1-1", "relay:victim:any-key", "victim:" + "f" * 32):
            await nc.jetstream().publish(changes_subject("squatter"), record, headers={"Nats-Msg-Id": msg_id})
    letters = await asyncio.to_thread(
        poll,
        lambda: [d for d in cluster.dead_letters("squatter") if "id squatting" in d["reason"]] or None,
        30,
        "squatting attempts dead-lettered",
    )
    assert len(letters) == 3
    assert cluster.metric("replicator_msg_id_alarms_total") - alarms == 3
    async with cluster.storage("victim", tmp_path / "victim") as victim:
        await victim.write_data("notes", {"id": 930_001, "body": "after the squatting", "at": 4.0})
        await _wait_replicated(cluster, victim)
        _assert_central_equals_local(cluster, victim)
    assert json.dumps(cluster.agent_status("victim"))  # the victim shows no alarm of its own
    assert cluster.agent_status("victim")["blocked"] is None
