"""Per-agent NATS credentials from `replicator auth`, enforced by a real nats-server with the generated config.

Agent A may publish only its own changes and answer only its own queries; it
cannot publish as B, read B's query requests, or read replies sent to other
inboxes. The replicator's key can run the stream and the durable consumer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest

from agent_client import REPLICATOR_INBOX, STREAM_NAME, AgentStorage, Migration, agent_inbox_prefix, ensure_stream
from replicator.auth import AuthStore
from tests.support.nats_server import NatsServer, start_nats_server


@pytest.fixture
def secured(tmp_path: Path) -> tuple[NatsServer, AuthStore, dict[str, str]]:
    store = AuthStore(tmp_path / "auth")
    store.init()
    seeds = {name: store.add_agent(name)[0] for name in ("agent-a", "agent-b")}
    seeds["replicator"] = store.replicator_seed_file().read_text().strip()
    conf = tmp_path / "nats.conf"
    conf.write_text(store.nats_authorization_conf())
    server = start_nats_server(tmp_path / "js", config_file=conf)
    yield server, store, seeds
    server.close()


async def _connect(url: str, seed: str | None, inbox: str) -> tuple[nats.NATS, list[Exception]]:
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    kwargs = {"nkeys_seed_str": seed} if seed else {}
    nc = await nats.connect(url, inbox_prefix=inbox, error_cb=on_error, allow_reconnect=False, **kwargs)
    return nc, errors


async def _violations(errors: list[Exception], timeout: float = 3.0) -> list[str]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline and not errors:
        await asyncio.sleep(0.05)
    return [str(e) for e in errors if "ermission" in str(e)]


async def test_server_config_is_valid_and_requires_credentials(
    secured: tuple[NatsServer, AuthStore, dict[str, str]],
) -> None:
    server, _store, _seeds = secured
    with pytest.raises(Exception, match=r"(?i)authoriz"):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


async def test_agent_publishes_only_its_own_changes(secured: tuple[NatsServer, AuthStore, dict[str, str]]) -> None:
    server, _store, seeds = secured
    rep, _ = await _connect(server.url, seeds["replicator"], REPLICATOR_INBOX)
    await ensure_stream(rep.jetstream())
    nc, errors = await _connect(server.url, seeds["agent-a"], agent_inbox_prefix("agent-a"))
    try:
        js = nc.jetstream()
        ack = await js.publish("agents.agent-a.changes", b"{}", timeout=5)
        assert ack.stream == STREAM_NAME
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await js.publish("agents.agent-b.changes", b"{}", timeout=2)
        assert await _violations(errors), "the server should report a publish permissions violation"
        info = await rep.jetstream().stream_info(STREAM_NAME)
        assert info.state.messages == 1  # B's subject got nothing
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.Error)):
            await nc.jetstream(timeout=2).add_stream(name="EVIL", subjects=["evil.>"])
    finally:
        await nc.close()
        await rep.close()


async def test_agent_cannot_read_other_agents_requests_or_replies(
    secured: tuple[NatsServer, AuthStore, dict[str, str]],
) -> None:
    server, _store, seeds = secured
    a, a_errors = await _connect(server.url, seeds["agent-a"], agent_inbox_prefix("agent-a"))
    b, _ = await _connect(server.url, seeds["agent-b"], agent_inbox_prefix("agent-b"))
    rep, _ = await _connect(server.url, seeds["replicator"], REPLICATOR_INBOX)
    try:
        stolen: list[bytes] = []

        async def steal(msg: nats.aio.msg.Msg) -> None:
            stolen.append(msg.data)

        for subject in ("agents.agent-b.query", f"{REPLICATOR_INBOX}.>", f"{agent_inbox_prefix('agent-b')}.>"):
            await a.subscribe(subject, cb=steal)
        violations = await _violations(a_errors)
        assert violations, "subscribing outside its own subjects must be refused"

        async def answer(msg: nats.aio.msg.Msg) -> None:
            await msg.respond(b"b's private answer")

        await b.subscribe("agents.agent-b.query", cb=answer)
        await b.flush()
        reply = None
        for _ in range(30):  # B's interest can take a moment to be visible to another connection
            try:
                reply = await rep.request("agents.agent-b.query", b"select 1", timeout=3)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.1)
        assert reply is not None, "agent B never answered its own query subject"
        assert reply.data == b"b's private answer"  # B answers through allow_responses
        await asyncio.sleep(0.3)
        assert stolen == [], "agent A received another agent's request or reply"
    finally:
        for nc in (a, b, rep):
            await nc.close()


async def test_agent_storage_replicates_with_its_credentials(
    tmp_path: Path, secured: tuple[NatsServer, AuthStore, dict[str, str]]
) -> None:
    server, store, seeds = secured
    rep, _ = await _connect(server.url, seeds["replicator"], REPLICATOR_INBOX)
    await ensure_stream(rep.jetstream())
    seed_file = store.root / "agents" / "agent-a.nk"
    async with AgentStorage("agent-a", tmp_path / "a", nats_url=server.url, nats_seed_file=seed_file) as st:
        await st.migrate([Migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")])
        await st.set_visibility("t", "always")
        await st.write_data("t", {"v": "hello"})
        await st.flush(timeout=10)
    info = await rep.jetstream().stream_info(STREAM_NAME)
    assert info.state.messages >= 1
    await rep.close()
    # the same agent id with another agent's key is refused by the server: nothing is published
    async with AgentStorage("agent-a", tmp_path / "a2", nats_url=server.url, nats_seed=seeds["agent-b"]) as st:
        await st.migrate([Migration(1, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")])
        await st.set_visibility("t", "always")
        await st.write_data("t", {"v": "spoof"})
        with pytest.raises(Exception, match=r"(?i)acknowledged|timeout"):
            await st.flush(timeout=3)
