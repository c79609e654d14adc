"""A publisher that cannot send says so (health_check, agent status records) and never retries silently;
status records go out after every (re)connect. Real nats-server, real SQLite files."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path
from typing import Any

from agent_client import STREAM_NAME, AgentStatusRecord, ensure_stream
from tests.support.nats_server import NatsServer
from tests.support.stream_reader import (
    assert_rows_identical,
    create_tables,
    flatten,
    jetstream,
    local_rows,
    read_agent_statuses,
    read_agent_stream,
    replay,
    set_max_msg_size,
    storage,
    wait_until,
)

AGENT = "agent-1"


async def _statuses(url: str) -> list[AgentStatusRecord]:
    return [s.record for s in await read_agent_statuses(url, AGENT)]


async def test_jetstream_refusing_a_record_blocks_visibly_and_it_heals_when_the_limit_is_raised(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The stream's limit is lowered behind the agent's back (it reads it once a minute): JetStream itself
    refuses the record. The agent reports it, keeps retrying on a long backoff, and goes on once it fits."""
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)", always=["t"])
        await st.write_data("t", {"id": 1, "body": b"small"})
        await st.flush()
        await set_max_msg_size(nats_server.url, 32 * 1024)
        await st.write_data("t", {"id": 2, "body": secrets.token_bytes(60_000)})
        big = await st.last_committed_seq()

        async def blocked() -> bool:
            return bool((await st.health_check())["blocked"])

        await wait_until(blocked, timeout=15, what="the publisher to report the refusal")
        health = await st.health_check()
        assert re.search(rf"JetStream refused changes {big}-{big}: .*(size|maximum)", health["blocked"]), health
        assert health["backlog"]["changes"] == 1
        assert "refused" in (health["nats"]["last_error"] or "")

        async def reported() -> bool:
            return any(s.blocked == health["blocked"] for s in await _statuses(nats_server.url))

        await wait_until(reported, timeout=15, what="a status record with the reason")
        # while blocked it keeps reporting (every 30 s by default; shortened here, the pace is not under test)
        assert st._publisher is not None
        st._publisher.status_interval = 0.2

        async def reported_again() -> bool:
            return sum(s.blocked == health["blocked"] for s in await _statuses(nats_server.url)) >= 3

        await wait_until(reported_again, timeout=15, interval=0.1, what="repeated status records while blocked")
        since = health["blocked_since"]
        await asyncio.sleep(0.5)
        assert (await st.health_check())["blocked_since"] == since, "the block is one episode, not reset per try"

        await set_max_msg_size(nats_server.url, -1)  # the operator raises the limit: the next try goes through
        await st.flush(timeout=30)
        assert (await st.health_check())["blocked"] is None
        db_path = st.db_path
    statuses = await _statuses(nats_server.url)
    assert statuses[-1].blocked is None and statuses[-1].acked_seq == big
    assert_rows_identical(
        replay(flatten(await read_agent_stream(nats_server.url, AGENT)))["t"], local_rows(db_path, "t")
    )


async def test_a_status_record_follows_every_connect(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", always=["t"])
        await st.flush()

        async def statuses_at_least(n: int) -> Any:
            got = await read_agent_statuses(nats_server.url, AGENT)
            return got if len(got) >= n else None

        await wait_until(lambda: statuses_at_least(1), timeout=15, what="a status record after the first connect")
        first = await read_agent_statuses(nats_server.url, AGENT)
        await asyncio.to_thread(nats_server.stop)
        await st.write_data("t", {"id": 1, "v": "written while NATS is down"})
        await asyncio.to_thread(nats_server.start)
        await st.flush(timeout=30)
        await wait_until(
            lambda: statuses_at_least(len(first) + 1), timeout=20, what="a status record after the reconnect"
        )
        last = await st.last_committed_seq()
        health = await st.health_check()
        assert health["status_reports"] >= 2
    statuses = await read_agent_statuses(nats_server.url, AGENT)
    ids = [s.msg_id for s in statuses]
    assert len(set(ids)) == len(ids), "every status record has a fresh message id"
    assert all(i is not None and re.fullmatch(rf"{AGENT}:[0-9a-f]{{32}}", i) for i in ids)
    assert all(s.record.agent_id == AGENT and s.record.blocked is None for s in statuses)
    assert max(s.record.last_seq for s in statuses) <= last


async def test_publishing_that_never_succeeds_while_connected_is_reported_as_blocked(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The stream is deleted under a connected agent: every publish fails (no responders). After `stuck_after_s`
    of that the agent says it is blocked, and says so no more once publishing works again."""
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", always=["t"])
        await st.flush()
        assert st._publisher is not None
        st._publisher.stuck_after_s = 0.5  # a minute by default; the length is not under test
        async with jetstream(nats_server.url) as js:
            await js.delete_stream(STREAM_NAME)
        await st.write_data("t", {"id": 1, "v": "nowhere to go"})

        async def blocked() -> str | None:
            reason: str | None = (await st.health_check())["blocked"]
            return reason

        await wait_until(blocked, timeout=20, interval=0.1, what="the agent to report it is stuck")
        reason = await blocked()
        assert reason is not None and "nothing acknowledged by JetStream" in reason and "while connected" in reason
        assert (await st.health_check())["nats"]["connected"] is True
        async with jetstream(nats_server.url) as js:
            await ensure_stream(js)
        await st.flush(timeout=20)
        assert await blocked() is None
