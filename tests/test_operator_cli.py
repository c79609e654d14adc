"""The operator's entry points of issue 10 as real processes: the routes (auth on: an operator token works, an
agent token gets 403) and the `replicator` commands that call them (`resync`, `dead-letters retry|discard`,
`backup`, `status`), plus `--version`, `serve --bogus` and a port in use.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from agent_client import agent_inbox_prefix, changes_subject
from replicator._version import __version__
from tests.support.credentials import make_credentials
from tests.support.htpc import HtpcProcess, poll, run_cli
from tests.support.nats_server import free_port

AGENT = "ops-agent"


# ----------------------------------------------------------------------------- no HTPC needed
def test_version_and_usage_errors_name_their_command() -> None:
    out = run_cli("--version", timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, f"replicator {__version__}"), out.stderr
    out = run_cli("serve", "--bogus", timeout=30)
    assert out.returncode == 2, out
    assert out.stderr.startswith("usage: replicator serve ") and "unrecognized arguments: --bogus" in out.stderr
    out = run_cli("dead-letters", "retry", timeout=30)
    assert out.returncode == 2 and out.stderr.startswith("usage: replicator dead-letters ")
    assert "needs the dead letter's ID" in out.stderr


def test_a_port_in_use_is_said_plainly_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # NATS is unreachable: had serve started anything before checking the port, it would wait 30 s for it.
        out = run_cli(
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--port",
            str(port),
            "--nats-url",
            f"nats://127.0.0.1:{free_port()}",
            timeout=20,
        )
    assert out.returncode == 1, out
    message = f"port {port} on 127.0.0.1 is in use by another process; pick another with --port"
    assert out.stderr.strip() == f"replicator: {message}"
    assert "serving" not in out.stdout and "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- auth on
@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HtpcProcess, dict[str, str], dict[str, Path]]]:
    data = tmp_path_factory.mktemp("operator") / "htpc"
    tokens, seeds = make_credentials(data, (AGENT,))
    htpc = HtpcProcess(data, None, extra_args=["--auth", "on"])
    htpc.start()
    try:
        yield htpc, tokens, seeds
    finally:
        htpc.close()


def _cli(htpc: HtpcProcess, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--url", htpc.url, "--token", token, timeout=60)


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _publish_junk(htpc: HtpcProcess, seed: Path, n: int) -> None:
    """`n` undecodable messages on the agent's own changes subject, with the agent's own key."""
    url = htpc.get("/relay/info").json()["nats_url"]
    nc = await nats.connect(
        url, nkeys_seed_str=seed.read_text().strip(), inbox_prefix=agent_inbox_prefix(AGENT), allow_reconnect=False
    )
    try:
        for k in range(n):
            await nc.publish(changes_subject(AGENT), f"junk {k}".encode())
        await nc.flush()
    finally:
        await nc.close()


def _letters(htpc: HtpcProcess, token: str) -> list[dict[str, Any]]:
    resp = htpc.get("/relay/dead-letters", params={"agent_id": AGENT}, headers=_bearer(token))
    assert resp.status_code == 200, resp.text
    return list(resp.json()["dead_letters"])


def test_operator_routes_need_an_operator_token(ops: tuple[HtpcProcess, dict[str, str], dict[str, Path]]) -> None:
    htpc, tokens, _seeds = ops
    agent = _bearer(tokens[AGENT])
    for method, path in (
        ("POST", f"/relay/agents/{AGENT}/resync"),
        ("GET", "/relay/resyncs"),
        ("POST", "/relay/dead-letters/1/retry"),
        ("POST", "/relay/dead-letters/1/discard"),
        ("POST", "/relay/admin/backup"),
    ):
        resp = httpx.request(method, f"{htpc.url}{path}", headers=agent, timeout=10)
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden", (path, resp.text)
        resp = httpx.request(method, f"{htpc.url}{path}", timeout=10)
        assert resp.status_code == 401 and resp.json()["error"] == "unauthorized", (path, resp.text)
    out = _cli(htpc, tokens[AGENT], "resync", AGENT)
    assert out.returncode == 2 and "needs an operator token" in out.stderr, out
    out = _cli(htpc, tokens[AGENT], "dead-letters", "discard", "1")
    assert out.returncode == 2 and "needs an operator token" in out.stderr, out


def test_resync_route_and_command(ops: tuple[HtpcProcess, dict[str, str], dict[str, Path]]) -> None:
    htpc, tokens, _seeds = ops
    operator = _bearer(tokens["ops"])
    resp = htpc.post(f"/relay/agents/{AGENT}/resync", headers=operator, json={"reason": "test: by the route"})
    assert resp.status_code == 202, resp.text
    request = resp.json()
    assert request["agent_id"] == AGENT and len(request["request_id"]) == 32 and request["state"] == "pending"
    resp = htpc.post("/relay/agents/Not..Valid/resync", headers=operator)
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_agent_id", resp.text
    pending = htpc.get("/relay/resyncs", headers=operator).json()["resyncs"]
    assert request["request_id"] in {r["request_id"] for r in pending}, pending

    out = _cli(htpc, tokens["ops"], "resync", AGENT, "--reason", "test: by the command")
    assert out.returncode == 0, out
    assert out.stdout.startswith(f"resync of {AGENT} requested (request ") and "reconnects" in out.stdout


def test_dead_letters_retry_discard_and_listing(ops: tuple[HtpcProcess, dict[str, str], dict[str, Path]]) -> None:
    htpc, tokens, seeds = ops
    asyncio.run(_publish_junk(htpc, seeds[AGENT], 2))
    letters = poll(lambda: (found := _letters(htpc, tokens["ops"])) and len(found) >= 2 and found, 20, "2 dead letters")
    first, second = sorted(d["id"] for d in letters)[-2:]

    listing = _cli(htpc, tokens["ops"], "dead-letters", "--agent", AGENT)  # the plain form still lists
    assert listing.returncode == 0 and f"#{first} " in listing.stdout and f"#{second} " in listing.stdout, listing

    out = _cli(htpc, tokens["ops"], "dead-letters", "discard", str(first))
    assert out.returncode == 0, out
    assert out.stdout.startswith(f"dead letter #{first} discarded: ") and len(out.stdout.strip()) > 40, out.stdout
    assert first not in {d["id"] for d in _letters(htpc, tokens["ops"])}
    again = _cli(htpc, tokens["ops"], "dead-letters", "discard", str(first))
    assert again.returncode == 1 and "dead_letter_not_found" in again.stderr, again

    out = _cli(htpc, tokens["ops"], "dead-letters", "retry", str(second))
    # Junk is junk: retried, it fails again with its reason (exit 1) and stays a dead letter.
    assert out.returncode == 1 and out.stdout.startswith(f"dead letter #{second} retried: failed: "), out
    assert second in {d["id"] for d in _letters(htpc, tokens["ops"])}


def test_backup_route_and_command(ops: tuple[HtpcProcess, dict[str, str], dict[str, Path]], tmp_path: Path) -> None:
    htpc, tokens, _seeds = ops
    out = _cli(htpc, tokens["ops"], "backup", "--to", str(tmp_path / "backup"))
    assert out.returncode == 0, out
    manifest = json.loads((tmp_path / "backup" / "manifest.json").read_text())
    assert manifest["files"] and manifest["stream_seq"] >= 0, manifest
    assert "replicator restore --from" in out.stdout


def test_status_shows_lag_blocked_and_a_pending_resync(
    ops: tuple[HtpcProcess, dict[str, str], dict[str, Path]],
) -> None:
    htpc, tokens, _seeds = ops
    row = {"table": "inbox", "data": {"id": 1, "text": "known centrally from here on"}}
    assert htpc.post("/relay/immediate", headers=_bearer(tokens[AGENT]), json=row).status_code == 202
    poll(lambda: AGENT in {a["agent_id"] for a in htpc.agents_with(tokens["ops"])}, 20, f"{AGENT} known")
    assert htpc.post(f"/relay/agents/{AGENT}/resync", headers=_bearer(tokens["ops"])).status_code == 202
    out = _cli(htpc, tokens["ops"], "status")
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    assert any(line.startswith("  problem: ") and AGENT in line for line in lines), out.stdout  # degraded: why
    header, *rows = [line for line in lines if not line.startswith(("HTPC ", "  problem: ")) and line.strip()]
    assert header.split()[:4] == ["AGENT", "EPOCH", "APPLIED", "LAG"] and "RESYNC" in header and "BLOCKED" in header
    row = next(r for r in rows if r.startswith(AGENT))
    assert "pending (" in row, out.stdout
