"""The `replicator` command line as an operator uses it: `serve` (embedded or external NATS), `status`,
`dead-letters`, `rebuild`; all as real subprocesses against real nats-servers, over real HTTP.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import nats

from agent_client import AgentStorage, Migration, changes_subject
from tests.support.htpc import (
    FORGED_LAYOUT,
    HtpcProcess,
    agent_session,
    apoll,
    forged_record,
    poll,
    rows_digest,
    run_cli,
    wait_agent_applied,
)
from tests.support.nats_server import NatsServer, free_port

NOTES = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT, score REAL, raw BLOB)")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _metric(text: str, name: str, labels: str = "") -> float | None:
    pattern = "^" + re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


async def test_serve_with_embedded_nats_learned_url_and_clean_sigterm(
    htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    nats_port = free_port()
    htpc = htpc_factory(None, nats_port=nats_port)  # no --nats-url: `serve` runs the wheel's nats-server itself
    await asyncio.to_thread(htpc.start)
    assert _port_open(nats_port)

    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        info = (await client.get("/relay/info")).json()
        assert info["nats_url"] == f"nats://127.0.0.1:{nats_port}"
        assert info["stream"] == "AGENT_CHANGES"
        assert info["versions"]["record"] == 1 and info["versions"]["nats_server"]

        # An agent given only the HTPC URL learns the NATS URL from /relay/info and replicates through it.
        storage = AgentStorage("embedded-agent", tmp_path / "agent", htpc_url=htpc.url)
        await storage.open()
        try:
            await storage.migrate([NOTES])
            await storage.set_visibility("notes", "always")
            await storage.batch_write(
                [
                    {"table": "notes", "data": {"id": k, "body": f"n{k}", "score": k / 3, "raw": b"\x00"}}
                    for k in range(7)
                ]
            )
            await storage.flush(timeout=20)  # JetStream acknowledged everything: the learned URL works
            health = await storage.health_check()
            assert health["nats"]["connected"] is True
            answer = await storage.query_network("SELECT count(*), total(score) FROM notes", fresh=True)
            assert answer["rows"] == [[7, sum(k / 3 for k in range(7))]]
            last = await storage.last_committed_seq()
        finally:
            await storage.close()

        resp = await client.get("/health")
        assert resp.status_code == 200
        health = resp.json()
        assert health["status"] == "ok" and health["nats"]["embedded"] is True
        assert health["nats"]["connected"] is True and health["consumer"]["running"] is True

        resp = await client.get("/metrics")
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
        assert _metric(resp.text, "replicator_agent_watermark", 'agent="embedded-agent"') == float(last)
        assert _metric(resp.text, "replicator_agent_lag_changes", 'agent="embedded-agent"') == 0.0
        assert _metric(resp.text, "replicator_nats_connected") == 1.0
        assert _metric(resp.text, "replicator_consumer_running") == 1.0
        assert "# TYPE replicator_agent_watermark gauge" in resp.text

        resp = await client.get("/docs")
        assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
        assert "swagger" in resp.text.lower()
        resp = await client.get("/openapi.json")
        assert resp.status_code == 200
        paths = resp.json()["paths"]
        for path in ("/relay/immediate", "/relay/batch", "/relay/query", "/relay/info", "/relay/agents", "/health"):
            assert path in paths, sorted(paths)

    status = await asyncio.to_thread(run_cli, "status", "--url", htpc.url)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"HTPC {htpc.url}: ok; NATS connected"), status.stdout
    assert lines[1].split()[:4] == ["AGENT", "EPOCH", "APPLIED", "LAG"], status.stdout
    row = next(line.split() for line in lines if line.startswith("embedded-agent"))
    assert row[2] == str(last) and row[3] == "0" and "notes" in row, status.stdout

    # The embedded nats-server is supervised: SIGKILL it and `serve` restarts it on the same port and store.
    children = _children(htpc.pid, "nats-server")
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:

        async def recovered() -> dict[str, Any] | None:
            health = (await client.get("/health")).json()
            return health if health["nats"]["embedded_restarts"] == 1 and health["status"] == "ok" else None

        await apoll(recovered, 30, "embedded nats-server restarted and reconnected")
        async with agent_session("embedded-agent", tmp_path / "agent", htpc_url=htpc.url) as storage:
            await storage.write_data("notes", {"id": 100, "body": "after the nats-server crash"})
            answer = await storage.query_network("SELECT count(*) FROM notes", fresh=True)
            assert answer["rows"] == [[8]]  # nothing of the stream was lost with the server process
    restarted = _children(htpc.pid, "nats-server")
    assert len(restarted) == 1 and restarted != children

    await asyncio.to_thread(htpc.stop)  # SIGTERM: exit 0 (asserted), and the embedded nats-server goes with it
    await apoll(lambda: _async(not _port_open(nats_port)), 10, "embedded nats-server stopped")
    assert not Path(f"/proc/{restarted[0]}").exists() or _state(restarted[0]) == "Z"
    assert "replicator: stopped" in htpc.log_tail()


def _children(parent: int, name: str) -> list[int]:
    """Pids of `parent`'s live children whose command name is `name` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if comm == name and int(fields[1]) == parent and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return sorted(out)


def _state(pid: int) -> str:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return text[text.rindex(")") + 2 :].split()[0]


async def _async(value: bool) -> bool:
    return value


def test_status_and_dead_letters_against_an_unreachable_htpc() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (("status", "--url", url), ("dead-letters", "--url", url)):
        result = run_cli(*args, timeout=30)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "cannot" in result.stderr and url in result.stderr
        assert "Traceback" not in result.stderr


def test_second_serve_on_the_same_data_dir_is_refused(htpc: HtpcProcess) -> None:
    result = run_cli(
        "serve",
        "--data-dir",
        str(htpc.data_dir),
        "--nats-url",
        str(htpc.nats_url),
        "--port",
        str(free_port()),
        timeout=30,
    )
    assert result.returncode != 0
    assert "in use by another replicator" in result.stderr
    assert htpc.running and htpc.get("/health").json()["status"] == "ok"


def _central_fingerprint(data_dir: Path) -> dict[str, Any]:
    """Each agent's replicated tables (sorted, type-exact digests) and replication position."""
    out: dict[str, Any] = {}
    for db in sorted((data_dir / "agents").glob("*.db")):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM _cr_tables ORDER BY name")]
            state = dict(conn.execute("SELECT key, value FROM _cr_state WHERE key IN ('epoch', 'watermark')"))
            out[db.stem] = {
                "state": state,
                "tables": {
                    t: rows_digest(conn.execute(f'SELECT * FROM "{t}"').fetchall())
                    for t in tables
                    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (t,)).fetchone()
                },
            }
        finally:
            conn.close()
    return out


async def test_rebuild_reproduces_the_central_store_and_serve_continues(
    nats_server: NatsServer, htpc_factory: Callable[..., HtpcProcess], tmp_path: Path
) -> None:
    htpc = htpc_factory(nats_server.url)
    await asyncio.to_thread(htpc.start)
    agent_dir = tmp_path / "agent"
    kv = Migration(2, "CREATE TABLE kv (k TEXT PRIMARY KEY, v)")
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        async with agent_session(
            "rebuild-agent",
            agent_dir,
            htpc_url=htpc.url,
            nats_url=nats_server.url,
            migrations=[NOTES, kv],
            visibility={"notes": "always", "kv": "always"},
        ) as storage:
            for chunk in range(10):
                await storage.batch_write(
                    [
                        {
                            "table": "notes",
                            "data": {
                                "id": chunk * 50 + k,
                                "body": f"b{k}",
                                "score": -0.0 if k % 2 else k,
                                "raw": bytes([k]),
                            },
                        }
                        for k in range(50)
                    ]
                )
            async with storage.transaction() as tx:
                await tx.execute("DELETE FROM notes WHERE id % 7 = 0")
                await tx.execute("UPDATE notes SET body = body || '!' WHERE id % 5 = 0")
            for k in range(20):
                await storage.write_data("kv", {"k": f"k{k % 8}", "v": [k, 2**63 - 1, "x", None][k % 4]})
            epoch, last = storage.epoch, await storage.last_committed_seq()
            await storage.flush(timeout=10)
        # An HTTP-only agent's rows (no key: re-applying them would show as extra rows), one undecodable record,
        # and an agent blocked behind a dead letter (its seq 3 stays unacked for good: rebuild must still finish).
        for n in range(5):
            resp = await client.post(
                "/relay/immediate",
                json={"agent_id": "rebuild-http", "table": "log", "data": {"n": n, "what": f"event {n}"}},
            )
            assert resp.status_code == 202, resp.text
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.publish(changes_subject("rebuild-junk"), b"not a record")
            mismatch = {"0": {**FORGED_LAYOUT, "columns": ["id", "nickname"]}}
            for payload in (
                forged_record("rebuild-forged", 1, [(1, "S", 0, [])], {"0": FORGED_LAYOUT}),
                forged_record("rebuild-forged", 2, [(2, "U", 0, [1, "x"])], mismatch),
                forged_record("rebuild-forged", 3, [(3, "U", 0, [2, "y"])], {"0": FORGED_LAYOUT}),
            ):
                await js.publish(changes_subject("rebuild-forged"), payload)
        finally:
            await nc.close()
        await wait_agent_applied(client, "rebuild-agent", last, epoch=epoch)

        async def relay_applied() -> bool:
            resp = await client.post(
                "/relay/query", json={"agent_id": "rebuild-http", "query": "SELECT count(*) FROM log"}
            )
            return resp.status_code == 200 and resp.json()["rows"] == [[5]]

        await apoll(relay_applied, 15, "relay rows applied")
        await apoll(lambda: _dead_letter_count(client, 2), 15, "the junk and the mismatched record dead-lettered")

    await asyncio.to_thread(htpc.stop)
    before = _central_fingerprint(htpc.data_dir)
    assert before["rebuild-agent"]["state"] == {"epoch": epoch, "watermark": last}
    assert set(before["rebuild-agent"]["tables"]) == {"notes", "kv"} and set(before["rebuild-http"]["tables"]) == {
        "log"
    }

    result = await asyncio.to_thread(
        run_cli, "rebuild", "--data-dir", str(htpc.data_dir), "--nats-url", nats_server.url, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "2 dead letters" in result.stderr and "resumes at stream seq" in result.stderr, result.stderr
    after = _central_fingerprint(htpc.data_dir)
    assert after == before
    backups = list(htpc.data_dir.glob("rebuild-backup-*"))
    assert len(backups) == 1 and (backups[0] / "agents" / "rebuild-agent.db").exists()

    # serve again: it resumes after the rebuilt position; nothing is applied twice, new writes arrive.
    await asyncio.to_thread(htpc.start)
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        agents = {a["agent_id"]: a for a in (await client.get("/relay/agents")).json()["agents"]}
        assert agents["rebuild-agent"]["watermark"] == last and agents["rebuild-agent"]["epoch"] == epoch
        letters = (await client.get("/relay/dead-letters")).json()["dead_letters"]
        assert sorted(d["agent_id"] for d in letters) == ["rebuild-forged", "rebuild-junk"]
        assert agents["rebuild-forged"]["watermark"] == 1 and "2-2" in agents["rebuild-forged"]["blocked"]

        async with agent_session("rebuild-agent", agent_dir, htpc_url=htpc.url, nats_url=nats_server.url) as storage:
            assert storage.epoch == epoch
            await storage.write_data("notes", {"id": 10_000, "body": "after rebuild"})
            answer = await storage.query_network("SELECT body FROM notes WHERE id = 10000", fresh=True)
            assert answer["rows"] == [["after rebuild"]]
            new_last = await storage.last_committed_seq()
        resp = await client.post(
            "/relay/immediate",
            json={"agent_id": "rebuild-http", "table": "log", "data": {"n": 5, "what": "after rebuild"}},
        )
        assert resp.status_code == 202

        async def six_rows() -> list[list[Any]] | None:
            resp = await client.post(
                "/relay/query",
                json={"agent_id": "rebuild-http", "query": "SELECT count(*), count(DISTINCT n) FROM log"},
            )
            rows: list[list[Any]] = resp.json()["rows"]
            return rows if rows[0][0] >= 6 else None

        assert await apoll(six_rows, 15, "the new relay row") == [[6, 6]]  # old relay rows were not re-applied
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "replicator_records_duplicates_total") == 0.0
        assert _metric(metrics, "replicator_records_dead_letters_total") == 0.0  # the junk was not seen again
        assert _metric(metrics, "replicator_agent_watermark", 'agent="rebuild-agent"') == float(new_last)
        assert len((await client.get("/relay/dead-letters")).json()["dead_letters"]) == 2
        assert list((await client.get("/health")).json()["blocked_agents"]) == ["rebuild-forged"]
    await asyncio.to_thread(htpc.stop)


async def _dead_letter_count(client: httpx.AsyncClient, n: int) -> bool:
    resp = await client.get("/relay/dead-letters")
    return len(resp.json()["dead_letters"]) == n


def test_poll_reports_the_last_value_on_timeout() -> None:
    """The helper the suite relies on must fail loudly, not pass silently."""
    calls: list[int] = []

    def never() -> int:
        calls.append(1)
        return 0

    try:
        poll(never, 0.2, "something that never happens", interval=0.05)
    except AssertionError as exc:
        assert "something that never happens" in str(exc) and "last: 0" in str(exc)
    else:
        raise AssertionError("poll() returned without its condition")
    assert len(calls) >= 3
