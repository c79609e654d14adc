"""Publisher: JetStream dedup, NATS outages, and SIGKILL of the agent never lose nor double a change."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent_client import AgentStorage, FlushTimeout, changes_subject, msg_id
from tests.support.htpc import sqlite_rows
from tests.support.nats_server import NatsServer, free_port
from tests.support.stream_reader import (
    assert_exactly_once,
    assert_rows_identical,
    create_tables,
    flatten,
    local_rows,
    publish_raw,
    read_agent_statuses,
    read_agent_stream,
    replay,
    set_max_msg_size,
    storage,
    stream_message_count,
    wait_until,
)

AGENT = "agent-1"
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- dedup


async def test_republished_record_is_dropped_by_jetstream_dedup(nats_server: NatsServer, tmp_path: Path) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", always=["t"])
        for i in range(10):
            await st.write_data("t", {"id": i, "v": f"row {i}"})
        await st.flush()
        epoch = st.epoch
        last = await st.last_committed_seq()
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    total = await stream_message_count(nats_server.url)
    statuses = await read_agent_statuses(nats_server.url, AGENT)
    assert statuses, "the agent reports its status after it connects"
    assert total == len(messages) + len(statuses)

    for original in (messages[0], messages[-1]):
        assert original.msg_id is not None
        ack = await publish_raw(nats_server.url, changes_subject(AGENT), original.data, original.msg_id)
        assert ack.duplicate is True, f"JetStream stored a second copy of {original.msg_id}"
        assert ack.seq == original.stream_seq
    assert await stream_message_count(nats_server.url) == total
    assert_exactly_once(await read_agent_stream(nats_server.url, AGENT), AGENT, epoch, last)

    # control: the same bytes under a different id are stored (so the check above can fail)
    probe = "probe-agent"
    ack = await publish_raw(nats_server.url, changes_subject(probe), messages[0].data, "probe:" + messages[0].msg_id)
    assert ack.duplicate is not True
    assert await stream_message_count(nats_server.url) == total + 1


async def test_restarted_publisher_resends_with_the_same_ids(nats_server: NatsServer, tmp_path: Path) -> None:
    """A crash after PubAck but before the log was trimmed: the agent republishes, JetStream drops the copies.

    Reproduced exactly by restoring a copy of the database taken before it was published: same epoch, same
    log, so the publisher must cut the same records with the same Nats-Msg-Ids.
    """
    dead_url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: the agent works offline
    async with storage(tmp_path, dead_url) as st:
        await create_tables(
            st,
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)",
            "CREATE TABLE u (k TEXT PRIMARY KEY, n)",
            always=["t", "u"],
        )
        for i in range(300):
            await st.write_data("t", {"id": i, "v": "x" * (i % 50)})
            if i % 7 == 0:
                await st.batch_write([{"table": "u", "data": {"k": f"k{i}.{j}", "n": j}} for j in range(5)])
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
        health = await st.health_check()
    assert health["nats"]["connected"] is False
    assert health["backlog"]["changes"] == last
    backup = tmp_path / "backup"
    backup.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{db_path}{suffix}").exists():
            shutil.copy2(f"{db_path}{suffix}", backup / f"copy{suffix}")

    async with storage(tmp_path, nats_server.url, max_record_bytes=2048) as st:
        await st.flush(timeout=20)
    first = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(first, AGENT, epoch, last)
    assert len(first) > 5
    count = len(first)

    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)
        if (backup / f"copy{suffix}").exists():
            shutil.copy2(backup / f"copy{suffix}", f"{db_path}{suffix}")
    with contextlib.closing(sqlite3.connect(db_path)) as raw:  # everything looks unpublished again
        assert raw.execute("SELECT min(seq), max(seq) FROM _cr_log").fetchone() == (1, last)
    async with storage(tmp_path, nats_server.url, max_record_bytes=2048) as st:
        assert st.epoch == epoch
        await st.flush(timeout=20)
        republished = st.records_published
        # every resend came back `duplicate`, and every one is legitimate: those records were in the log at open
        assert (await st.health_check())["msg_id_collisions"] == 0
    assert republished == len(first), "the restarted publisher did not resend the same records"
    again = await read_agent_stream(nats_server.url, AGENT)
    assert len(again) == count, "a resent record was stored twice"
    assert [m.msg_id for m in again] == [m.msg_id for m in first]
    assert_rows_identical(replay(flatten(again))["t"], local_rows(db_path, "t"))


# --------------------------------------------------------------------------- NATS outages


async def _write_rows(st: AgentStorage, start: int, count: int) -> None:
    for i in range(start, start + count):
        if i % 10 == 9:
            await st.batch_write([{"table": "t", "data": {"id": i * 100 + k, "v": f"batch {i}"}} for k in range(3)])
        else:
            await st.write_data("t", {"id": i, "v": f"row {i}", "n": i * 0.5})


@pytest.mark.parametrize("outage", ["stop", "kill"])
async def test_local_writes_go_on_while_nats_is_down_and_the_backlog_drains(
    nats_server: NatsServer, tmp_path: Path, outage: str
) -> None:
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n REAL)", always=["t"])
        await _write_rows(st, 0, 50)
        await st.flush()
        assert (await st.health_check())["nats"]["connected"] is True

        # the server goes away while the agent keeps writing (and publishing)
        stop_writing = asyncio.Event()

        async def writer() -> int:
            i = 1000
            while not stop_writing.is_set():
                await _write_rows(st, i, 1)
                i += 1
                await asyncio.sleep(0.002)
            return i - 1000

        task = asyncio.create_task(writer())
        await asyncio.to_thread(nats_server.stop if outage == "stop" else nats_server.kill)
        stop_writing.set()
        written_during = await task
        assert written_during > 0

        await wait_until(lambda: _disconnected(st), timeout=15, what="health_check to show NATS disconnected")
        backlog1 = (await st.health_check())["backlog"]["changes"]
        rows_before = (await st.query_local("SELECT count(*) AS n FROM t"))[0]["n"]
        t0 = time.monotonic()
        await _write_rows(st, 2000, 200)
        elapsed = time.monotonic() - t0
        assert elapsed < 5.0, f"200 local writes took {elapsed:.1f}s with NATS down: writes wait on the network"
        health = await st.health_check()
        assert health["nats"]["connected"] is False
        assert health["backlog"]["changes"] >= backlog1 + 200
        assert health["backlog"]["oldest_age_s"] is not None and health["backlog"]["oldest_age_s"] >= 0
        assert health["last_committed_seq"] - health["acked_seq"] == health["backlog"]["changes"]
        with pytest.raises(FlushTimeout):
            await st.flush(timeout=0.3)
        # local reads and writes are fine
        rows_after = (await st.query_local("SELECT count(*) AS n FROM t"))[0]["n"]
        assert rows_after - rows_before == 180 + 20 * 3

        await asyncio.to_thread(nats_server.start)  # same store directory, same port
        await _write_rows(st, 3000, 20)
        await st.flush(timeout=30)
        health = await st.health_check()
        assert health["backlog"]["changes"] == 0 and health["nats"]["connected"] is True
        assert health["msg_id_collisions"] == 0  # resends of records in flight at the outage are no alarm
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))


async def _disconnected(st: AgentStorage) -> bool:
    return (await st.health_check())["nats"]["connected"] is False


async def test_agent_starts_offline_and_publishes_once_nats_appears(nats_server: NatsServer, tmp_path: Path) -> None:
    await asyncio.to_thread(nats_server.stop)
    async with storage(tmp_path, nats_server.url) as st:
        await create_tables(st, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT, n REAL)", always=["t"])
        await _write_rows(st, 0, 100)
        health = await st.health_check()
        assert health["nats"]["connected"] is False
        assert health["nats"]["last_error"], "an unreachable NATS should be reported in health"
        assert health["backlog"]["changes"] == health["last_committed_seq"] > 100
        assert health["acked_seq"] == 0
        await asyncio.to_thread(nats_server.start)
        await st.flush(timeout=30)
        last = await st.last_committed_seq()
        epoch = st.epoch
        db_path = st.db_path
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert_exactly_once(messages, AGENT, epoch, last)
    assert_rows_identical(replay(flatten(messages))["t"], local_rows(db_path, "t"))


# --------------------------------------------------------------------------- SIGKILL of the agent


class AgentProcess:
    """tests/support/agent_writer_proc.py as a child process whose progress lines we follow."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.last: dict[str, Any] = {}

    @classmethod
    async def start(cls, mode: str, data_dir: Path, url: str, seed: int = 0) -> AgentProcess:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.support.agent_writer_proc",
            mode,
            str(data_dir),
            AGENT,
            url,
            str(seed),
            cwd=REPO_ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def next_line(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            err = b""
            if self.proc.stderr is not None:
                err = await asyncio.wait_for(self.proc.stderr.read(), 10)
            raise AssertionError(f"agent process ended (rc={await self.proc.wait()}): {err.decode()[-2000:]}")
        self.last = json.loads(line)
        return self.last

    async def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        rc = await asyncio.wait_for(self.proc.wait(), 10)
        assert rc == -signal.SIGKILL

    async def ensure_dead(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), 10)


async def _kill_while_publishing(agent: AgentProcess, rng: random.Random, min_acked: int) -> dict[str, Any]:
    """Follow progress until JetStream has acked `min_acked` and changes are still unacked, then SIGKILL."""
    extra = rng.randrange(0, 40)
    deadline = time.monotonic() + 60
    while True:
        line = await agent.next_line()
        if line["acked"] >= min_acked and line["committed"] > line["acked"]:
            if extra == 0:
                break
            extra -= 1
        assert time.monotonic() < deadline, f"agent never got to acked >= {min_acked}: {line}"
    await agent.kill()
    return line


def _db_state(db_path: Path) -> tuple[int, str]:
    conn = sqlite3.connect(db_path)
    try:
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_cr_log'").fetchone()[0]
        epoch = conn.execute("SELECT value FROM _cr_meta WHERE key = 'epoch'").fetchone()[0]
        return int(last), str(epoch)
    finally:
        conn.close()


async def test_sigkill_of_the_agent_while_publishing_loses_and_doubles_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed = random.randrange(1_000_000)
    print(f"kill-timing seed {seed}")  # shown with a failure, to replay the same kill points
    rng = random.Random(seed)
    data_dir = tmp_path / "agent"
    agents: list[AgentProcess] = []
    kills: list[dict[str, Any]] = []
    try:
        # three lives, each SIGKILLed while records are in flight; every restart first resends what the
        # previous one left unacknowledged, then writes on
        for life in range(3):
            agent = await AgentProcess.start("write", data_dir, nats_server.url, seed + life)
            agents.append(agent)
            min_acked = kills[-1]["committed"] + rng.randrange(20, 120) if kills else rng.randrange(50, 250)
            kills.append(await _kill_while_publishing(agent, rng, min_acked))
        assert len({k["epoch"] for k in kills}) == 1, "a restart on the same database must keep its epoch"

        flusher = await AgentProcess.start("flush", data_dir, nats_server.url)
        agents.append(flusher)
        done = await flusher.next_line(timeout=60)
        assert await asyncio.wait_for(flusher.proc.wait(), 30) == 0
    finally:
        for agent in agents:
            await agent.ensure_dead()

    db_path = data_dir / f"{AGENT}.db"
    last, epoch = _db_state(db_path)
    assert done == {"flushed": last, "epoch": epoch}, f"seed {seed}"
    assert last >= kills[-1]["committed"] > kills[0]["committed"]
    messages = await read_agent_stream(nats_server.url, AGENT)
    assert {m.record.epoch for m in messages} == {epoch}
    assert_exactly_once(messages, AGENT, epoch, last)
    secret = sqlite_rows(db_path, "SELECT key FROM _cr_secret")[0][0]
    # every record went out under its own keyed id: no restart mistook its resends for collisions
    assert all(m.msg_id == msg_id(AGENT, epoch, m.record.first_seq, m.record.last_seq, secret=secret) for m in messages)
    replicated = replay(flatten(messages))
    for table in ("notes", "counters"):
        assert_rows_identical(replicated[table], local_rows(db_path, table))


async def test_records_fit_the_streams_own_bound_on_one_message(nats_server: NatsServer, tmp_path: Path) -> None:
    """A stream whose max_msg_size is below the agent's record size: the publisher cuts records to fit it
    (before, a transaction of 300 KB went out as one record JetStream refused on every attempt)."""
    import nats as nats_client

    from agent_client import STREAM_NAME, Migration

    await set_max_msg_size(nats_server.url, 100 * 1024)
    nc = await nats_client.connect(nats_server.url)
    try:
        js = nc.jetstream()
        async with AgentStorage("fit-agent", tmp_path / "a", nats_url=nats_server.url) as st:
            await st.migrate([Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")])
            await st.set_visibility("notes", "always")
            await st.batch_write([{"table": "notes", "data": {"id": i, "body": "b" * 30_000}} for i in range(10)])
            await st.flush(timeout=30)
        info = await js.stream_info(STREAM_NAME)
        sizes = [len((await js.get_msg(STREAM_NAME, seq)).data or b"") for seq in range(1, info.state.last_seq + 1)]
        assert max(sizes) <= 100 * 1024 and sum(1 for n in sizes if n > 30_000) >= 4, sizes
    finally:
        await nc.close()
