"""`AgentStorage.follow()` through real processes: A -> nats-server -> `replicator serve` -> feed -> B's copy.

B's follower copy of A's table is read through B's `query_local` (`"<A>".items`) and compared with A's own
table by count and digest: after 10,000 rows with updates and deletes, across B's restart mid-stream, with
the HTPC down, and after A's database was recreated (must-refetch).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import sys
import threading
from pathlib import Path

import httpx
import pytest

from agent_client import AgentStorage, FeedError, FollowError, LocalDatabaseError, Migration
from tests.support.htpc import HtpcProcess, agent_session, apoll, client_and_agent, rows_digest, settle_agent

ITEMS = Migration(
    1,
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, qty REAL, data BLOB);\n"
    "CREATE TABLE asked (k TEXT PRIMARY KEY)",
    "followed tables",
)
NOTES = Migration(1, "CREATE TABLE notes (item_id INTEGER PRIMARY KEY, note TEXT)", "B's own table")
COLUMNS = "id, name, qty, data"


async def digest(storage: AgentStorage, source: str) -> tuple[int, str]:
    rows = await storage.query_local(f"SELECT {COLUMNS} FROM {source}")
    return rows_digest(tuple(r.values()) for r in rows)


async def converged(a: AgentStorage, b: AgentStorage, timeout: float = 60.0) -> tuple[int, str]:
    want = await digest(a, "items")
    source = f'"{a.agent_id}".items'

    async def same() -> bool:
        try:
            return await digest(b, source) == want
        except LocalDatabaseError:  # the copy's table appears with the first snapshot
            return False

    await apoll(same, timeout, f"B's copy of {a.agent_id}.items equal to A's ({want[0]} rows)")
    return want


async def write_rows(a: AgentStorage, start: int, n: int, batch: int = 100) -> None:
    """n rows in transactions of `batch`, then every 7th updated and every 11th deleted."""
    for i in range(start, start + n, batch):
        await a.batch_write(
            {"table": "items", "data": {"id": j, "name": f"n{j}", "qty": j / 7, "data": bytes([j % 256]) * 4}}
            for j in range(i, min(i + batch, start + n))
        )
    await a.execute("UPDATE items SET name = name || '!', qty = -qty WHERE id >= ? AND id % 7 = 0", (start,))
    await a.execute("DELETE FROM items WHERE id >= ? AND id % 11 = 0", (start,))


async def test_follow_10k_rows_restart_join_and_htpc_down(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(htpc, "fol-a1", tmp_path / "a", [ITEMS], ["items"]) as (client, a):
        await write_rows(a, 0, 2000)
        await settle_agent(client, a)
        b = AgentStorage("fol-b1", tmp_path / "b", htpc_url=htpc.url)
        await b.open()
        try:
            await b.migrate([NOTES])
            await b.follow("fol-a1", ["items"])
            await converged(a, b)
            # B restarts while A keeps writing: it resumes from its stored offset
            writer = asyncio.create_task(write_rows(a, 2000, 8000))
            await apoll(lambda: _rows_at_least(b, 2500), 60, "B's copy moving")
            await b.close()
            await asyncio.sleep(0.3)
            b = AgentStorage("fol-b1", tmp_path / "b", htpc_url=htpc.url)
            await b.open()  # the follow is restored from the declaration
            await writer
            await settle_agent(client, a)
            count, _ = await converged(a, b)
            assert count == 10_000 - len(range(0, 10_000, 11))
            health = (await b.health_check())["follows"]["fol-a1.items"]
            assert health["rows"] == count and health["offset"] is not None
            assert health["refetches"] == 0, health  # resumed, not refilled

            # a join of B's own table with the followed one, at local speed
            await b.batch_write({"table": "notes", "data": {"item_id": i, "note": f"note {i}"}} for i in range(0, 50))
            joined = await b.query_local(
                'SELECT n.note, i.name FROM notes n JOIN "fol-a1".items i ON i.id = n.item_id ORDER BY n.item_id'
            )
            assert len(joined) == len([i for i in range(50) if i % 11]) and joined[0] == {
                "note": "note 1",
                "name": "n1",
            }

            # read-only: not through query_local, and nothing of it is B's own data (never published)
            with pytest.raises(LocalDatabaseError, match="readonly"):
                await b.query_local('DELETE FROM "fol-a1".items')
            own = await b.query_local("SELECT name FROM sqlite_master WHERE name = 'items'")
            assert own == []

            # the HTPC goes away: B keeps answering from its copy, health tells it is behind
            htpc.kill()
            await apoll(lambda: _state_is(b, "disconnected", "connecting"), 30, "the follower noticing")
            assert await digest(b, '"fol-a1".items') == (count, _)
            health = (await b.health_check())["follows"]["fol-a1.items"]
            assert health["seconds_behind"] is not None and health["last_error"]
            await b.close()
            b = AgentStorage("fol-b1", tmp_path / "b", htpc_url=htpc.url)
            await b.open()  # and after a restart with the HTPC down
            assert await digest(b, '"fol-a1".items') == (count, _)
            htpc.start()
            await a.write_data("items", {"id": 99_999, "name": "after the outage"})
            await settle_agent(client, a)
            await converged(a, b)
            await apoll(lambda: _state_is(b, "live"), 30, "live again")
            assert (await b.health_check())["follows"]["fol-a1.items"]["seconds_behind"] == 0
        finally:
            await b.close()


async def test_must_refetch_refills_the_copy(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        httpx.AsyncClient(base_url=module_htpc.url, timeout=10) as client,
        agent_session("fol-b2", tmp_path / "b", htpc_url=module_htpc.url) as b,
    ):
        opts = {"htpc_url": module_htpc.url, "migrations": [ITEMS], "visibility": {"items": "always"}}
        async with agent_session("fol-a2", tmp_path / "a", **opts) as a:  # type: ignore[arg-type]
            await write_rows(a, 0, 500)
            await settle_agent(client, a)
            await b.follow("fol-a2", ["items"])
            await converged(a, b)
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / "a" / f"fol-a2.db{suffix}").unlink(missing_ok=True)
        async with agent_session("fol-a2", tmp_path / "a", **opts) as a2:  # type: ignore[arg-type]
            await write_rows(a2, 100_000, 300)
            await settle_agent(client, a2)
            count, _ = await converged(a2, b)
            assert count == 300 - len([i for i in range(100_000, 100_300) if i % 11 == 0])
            health = (await b.health_check())["follows"]["fol-a2.items"]
            assert health["refetches"] >= 1 and health["rows"] == count

            # A's table gains a column: the copy is refilled with the new layout
            await a2.execute("ALTER TABLE items ADD COLUMN extra TEXT")
            await a2.write_data("items", {"id": 100_001, "extra": "new column"})
            await settle_agent(client, a2)
            rows = await apoll(lambda: _extra(b, "fol-a2", 100_001), 30, "the new column in B's copy")
            assert rows == [{"id": 100_001, "extra": "new column"}]
            count, _ = await converged(a2, b)
            assert (await b.health_check())["follows"]["fol-a2.items"]["rows"] == count


async def test_what_cannot_be_followed(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        client_and_agent(module_htpc, "fol-a3", tmp_path / "a", [ITEMS], ["items"]) as (client, a),
        agent_session("fol-b3", tmp_path / "b", htpc_url=module_htpc.url) as b,
    ):
        await a.set_visibility("asked", "on_demand")
        await a.write_data("items", {"id": 1, "name": "x"})
        await settle_agent(client, a)
        with pytest.raises(FollowError, match="itself"):
            await b.follow("fol-b3", ["items"])
        with pytest.raises(FeedError) as refused:
            await b.follow("fol-a3", ["asked"])
        assert refused.value.code == "table_not_visible"
        with pytest.raises(FollowError):
            await b.follow("fol-a3", "items")  # one string, not a list
        with pytest.raises(FeedError) as unknown:
            await b.follow("ghost-x", ["items"])
        assert unknown.value.status == 404 and not (b.follow_dir / "ghost-x.db").exists()
        for i in range(9):  # declared past the HTPC's check (an agent that has not replicated yet)
            await b._followers.follow(f"ghost-{i}", ["items"])
        with pytest.raises(FollowError, match="at most 9"):
            await b.follow("fol-a3", ["items"])
        await apoll(lambda: _state_is(b, "refused"), 20, "the HTPC's refusal reported")
        ghost = (await b.health_check())["follows"]["ghost-0.items"]
        assert "unknown_agent" in ghost["last_error"] and ghost["seconds_behind"] is None
        for i in range(9):
            await b.unfollow(f"ghost-{i}")
        assert not list(b.follow_dir.glob("ghost-*"))
        await b.follow("fol-a3", ["items"])
        await converged(a, b)
        # values that JSON cannot carry as they are: TEXT that is not UTF-8, infinities, BLOBs
        await a.execute(
            "INSERT INTO items (id, name, qty, data) VALUES (77, CAST(x'ff00fe' AS TEXT), ?, x'00ff')", (float("-inf"),)
        )
        await settle_agent(client, a)
        await converged(a, b)
        typed = await b.query_local(
            'SELECT typeof(name) AS t, hex(name) AS h, qty, typeof(data) AS d FROM "fol-a3".items WHERE id = 77'
        )
        assert typed == [{"t": "text", "h": "FF00FE", "qty": float("-inf"), "d": "blob"}]
        # idle: the follower's SQLite thread ends (the open stream holds a socket, no thread)
        await apoll(lambda: _no_thread("follow:"), 20, "the follower's thread ending while idle")
        async with agent_session("fol-c3", tmp_path / "c") as c:  # no htpc_url
            with pytest.raises(FollowError, match="htpc_url"):
                await c.follow("fol-a3", ["items"])
        # the follower file itself is never written by anyone but the follower
        conn = sqlite3.connect(b.follow_dir / "fol-a3.db")
        try:
            assert conn.execute('SELECT "offset" IS NOT NULL FROM _cr_follow').fetchone() == (1,)
        finally:
            conn.close()


async def _rows_at_least(b: AgentStorage, n: int) -> bool:
    health = (await b.health_check())["follows"]
    return any(h["rows"] >= n for h in health.values())


async def _state_is(b: AgentStorage, *states: str) -> bool:
    health = (await b.health_check())["follows"]
    return all(h["state"] in states for h in health.values())


#: B as a child process: follows A's items and prints its copy's row count until it is killed.
_FOLLOWER_CHILD = """
import asyncio, json, sys
from agent_client import AgentStorage

async def main(data_dir, agent_id, htpc_url, followed):
    b = AgentStorage(agent_id, data_dir, htpc_url=htpc_url)
    await b.open()
    await b.follow(followed, ["items"])
    while True:
        h = (await b.health_check())["follows"][followed + ".items"]
        sys.stdout.write(json.dumps({"rows": h["rows"]}) + "\\n")
        sys.stdout.flush()
        await asyncio.sleep(0.02)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_follower_killed_mid_stream_resumes_consistent(module_htpc: HtpcProcess, tmp_path: Path) -> None:
    async with client_and_agent(module_htpc, "fol-a4", tmp_path / "a", [ITEMS], ["items"]) as (client, a):
        await write_rows(a, 0, 200)
        await settle_agent(client, a)
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _FOLLOWER_CHILD,
            str(tmp_path / "b"),
            "fol-b4",
            module_htpc.url,
            "fol-a4",
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
        )
        try:
            writer = asyncio.create_task(write_rows(a, 1000, 6000, batch=20))
            assert child.stdout is not None
            while True:  # kill B once its copy is well into A's stream
                line = await asyncio.wait_for(child.stdout.readline(), 60)
                assert line, "the follower child exited"
                if json.loads(line)["rows"] >= 1500:
                    break
            child.send_signal(signal.SIGKILL)
            await child.wait()
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()
        await writer
        # the copy the killed process left: every transaction whole, its row count and offset stored with it
        path = tmp_path / "b" / "fol-b4.follow" / "fol-a4.db"
        conn = sqlite3.connect(path)
        try:
            (stored_rows, offset), (count,) = (
                conn.execute('SELECT rows, "offset" FROM _cr_follow').fetchone(),
                conn.execute("SELECT count(*) FROM items").fetchone(),
            )
        finally:
            conn.close()
        assert offset is not None and stored_rows == count and count >= 1500
        await settle_agent(client, a)
        async with agent_session("fol-b4", tmp_path / "b", htpc_url=module_htpc.url) as b:
            count, _ = await converged(a, b)
            health = (await b.health_check())["follows"]["fol-a4.items"]
            assert health["refetches"] == 0 and health["rows"] == count


async def _no_thread(prefix: str) -> bool:
    return not [t for t in threading.enumerate() if t.name.startswith(prefix)]


async def _extra(b: AgentStorage, agent: str, item: int) -> list[dict[str, object]] | None:
    try:
        return await b.query_local(f'SELECT id, extra FROM "{agent}".items WHERE id = ?', (item,)) or None
    except LocalDatabaseError:  # no such column yet
        return None


async def test_follow_is_declared_while_the_htpc_is_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    async with agent_session("fol-b5", tmp_path / "b", htpc_url=dead, replicate=False) as b:
        await b.follow("fol-a5", ["items", "other"])
        await apoll(lambda: _state_is(b, "disconnected"), 20, "the follower retrying")
        follows = (await b.health_check())["follows"]
        assert sorted(follows) == ["fol-a5.items", "fol-a5.other"]
        assert all(h["seconds_behind"] is None and h["last_error"] for h in follows.values())
    async with agent_session("fol-b5", tmp_path / "b", htpc_url=dead, replicate=False) as b:
        assert sorted((await b.health_check())["follows"]) == ["fol-a5.items", "fol-a5.other"]  # restored
        await b.unfollow("fol-a5", ["other"])
        assert sorted((await b.health_check())["follows"]) == ["fol-a5.items"]
        await b.unfollow("fol-a5")
        assert (await b.health_check())["follows"] == {}
        assert not (b.follow_dir / "fol-a5.db").exists()
    async with agent_session("fol-b5", tmp_path / "b", htpc_url=dead, replicate=False) as b:
        assert (await b.health_check())["follows"] == {}
