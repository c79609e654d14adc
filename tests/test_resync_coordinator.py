"""The resync coordinator against a real nats-server: the agent's side is a real NATS responder on the agent's
query subject that answers as a live, broken, outdated or hostile agent would (or nobody answers: offline).
The central store and the consumer's apply thread are the real ones on SQLite files; only the JetStream
consumer loop is not running (the coordinator is driven through the calls the consumer makes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from agent_client import query_subject
from replicator.central_store import CentralStore
from replicator.consumer import Consumer
from replicator.data_dir import DataDir
from replicator.dead_letters import DeadLetterStore
from replicator.errors import InvalidAgent
from replicator.resync import ResyncCoordinator
from tests.support.htpc import apoll
from tests.support.nats_server import NatsServer

Answer = Callable[[dict[str, Any]], dict[str, Any] | None]


class Setup:
    def __init__(self, tmp_path: Path, nc: NATS) -> None:
        self.data = DataDir(tmp_path / "htpc")
        self.nc = nc
        self.store = CentralStore(self.data)
        self.dead = DeadLetterStore(self.data.dead_letters_db)
        self.consumer = Consumer(None, self.store, self.dead)  # type: ignore[arg-type]  # js: not used here
        self.asked: list[dict[str, Any]] = []
        self._subs: list[Any] = []

    def coordinator(self, **options: Any) -> ResyncCoordinator:
        options.setdefault("tick_s", 0.05)
        return ResyncCoordinator(self.data.recovery_db, self.store, self.consumer, lambda: self.nc, **options)

    async def agent(self, agent_id: str, answer: Answer) -> None:
        """A live agent answering resync requests with `answer(request)` (None: it never answers)."""

        async def respond(msg: Msg) -> None:
            request = orjson.loads(msg.data)
            self.asked.append(request)
            reply = answer(request)
            if reply is not None:
                await msg.respond(orjson.dumps(reply))

        self._subs.append(await self.nc.subscribe(query_subject(agent_id), cb=respond))
        await self.nc.flush()

    async def close(self) -> None:
        for sub in self._subs:
            await sub.unsubscribe()
        self.consumer._executor.shutdown()
        self.store.close()
        self.dead.close()


@pytest.fixture
async def setup(module_nats: NatsServer, tmp_path: Path) -> AsyncIterator[Setup]:
    nc = await nats.connect(module_nats.url)
    parts = Setup(tmp_path, nc)
    try:
        yield parts
    finally:
        await parts.close()
        await nc.close()


def accept(at_seq: int = 42) -> Answer:
    return lambda req: {"resync": "accepted", "request_id": req["request_id"], "at_seq": at_seq}


async def pending_of(coordinator: ResyncCoordinator, agent_id: str) -> dict[str, Any] | None:
    found = [p for p in coordinator.pending() if p["agent_id"] == agent_id]
    return found[0] if found else None


async def test_a_request_waits_while_the_agent_is_offline_and_is_sent_when_it_is_back(setup: Setup) -> None:
    coordinator = setup.coordinator()
    coordinator.start()
    try:
        answer = await coordinator.request("rc-away", "test", by="operator")
        assert answer["state"] == "pending" and len(answer["request_id"]) == 32
        assert (await coordinator.request("rc-away", "again"))["request_id"] == answer["request_id"]  # one per agent

        async def offline() -> dict[str, Any] | None:
            entry = await pending_of(coordinator, "rc-away")
            return entry if entry and "offline" in (entry["last_error"] or "") and entry["sends"] >= 2 else None

        await apoll(offline, 10, "the request seen offline twice")
        await setup.agent("rc-away", accept(7))
        coordinator.agents_seen({"rc-away"})  # a record of it arrived: it is back, ask now

        async def accepted() -> dict[str, Any] | None:
            entry = await pending_of(coordinator, "rc-away")
            return entry if entry and entry["state"] == "accepted" else None

        entry = await apoll(accepted, 3, "the request accepted")
        assert entry["at_seq"] == 7 and entry["request_id"] == answer["request_id"]
        assert setup.asked == [{"control": "resync", "request_id": answer["request_id"]}]
        coordinator.resync_applied("rc-away", answer["request_id"])
        assert coordinator.pending() == []
        assert (coordinator.started, coordinator.finished, coordinator.failed) == (1, 1, 0)
    finally:
        await coordinator.stop()


async def test_an_accepted_request_that_does_not_arrive_is_asked_again_with_the_same_id(setup: Setup) -> None:
    await setup.agent("rc-slow", accept())
    coordinator = setup.coordinator(resend_after_s=0.3)
    coordinator.start()
    try:
        answer = await coordinator.request("rc-slow", "test")
        await apoll(lambda: asyncio.sleep(0, len(setup.asked) >= 3), 5, "three sends")
        assert {r["request_id"] for r in setup.asked} == {answer["request_id"]}
    finally:
        await coordinator.stop()


async def test_errors_make_new_attempts_then_the_request_fails_and_the_agent_stays_blocked(setup: Setup) -> None:
    await setup.agent("rc-broken", lambda req: {"error": "resync_failed", "message": "disk on fire"})
    coordinator = setup.coordinator(max_attempts=3)
    coordinator.start()
    try:
        await coordinator.request("rc-broken", "test")

        async def failed() -> bool:
            return coordinator.failed == 1

        await apoll(failed, 10, "the request given up")
        assert len({r["request_id"] for r in setup.asked}) == 3  # each attempt with a new id
        assert coordinator.pending() == []

        async def blocked() -> str | None:
            view = setup.store.view.agent("rc-broken")
            return view.blocked if view is not None else None

        reason = await apoll(blocked, 5, "the agent marked blocked")
        assert "resync failed after 3 attempt(s)" in reason and "disk on fire" in reason
        assert "replicator resync rc-broken" in reason
    finally:
        await coordinator.stop()


async def test_an_agent_that_does_not_know_resync_fails_at_once(setup: Setup) -> None:
    await setup.agent("rc-old", lambda req: {"error": "unknown_control", "message": "no such control"})
    coordinator = setup.coordinator()
    coordinator.start()
    try:
        await coordinator.request("rc-old", "test")
        await apoll(lambda: asyncio.sleep(0, coordinator.failed == 1), 5, "failed")
        assert len(setup.asked) == 1
    finally:
        await coordinator.stop()


async def test_a_rejected_resync_record_is_a_failed_attempt_and_any_applied_resync_finishes(setup: Setup) -> None:
    await setup.agent("rc-bad", accept())
    coordinator = setup.coordinator()
    coordinator.start()
    try:
        first = await coordinator.request("rc-bad", "test")
        coordinator.resync_rejected("rc-bad", first["request_id"], "schema mismatch")
        entry = await pending_of(coordinator, "rc-bad")
        assert entry is not None and entry["attempts"] == 2 and entry["request_id"] != first["request_id"]
        assert "schema mismatch" in entry["last_error"]
        coordinator.resync_applied("rc-bad", "f" * 32)  # requested elsewhere (another replicator): heals it too
        assert coordinator.pending() == [] and coordinator.finished == 1
    finally:
        await coordinator.stop()


async def test_automatic_requests_are_bounded_per_agent(setup: Setup) -> None:
    coordinator = setup.coordinator(auto_limit=2)
    coordinator.open()
    try:
        for _ in range(2):
            assert coordinator._request("rc-loop", "dead letter", "auto")["state"] == "pending"
            coordinator.resync_applied("rc-loop", None)
        refused = coordinator._request("rc-loop", "dead letter", "auto")
        assert refused["state"] == "refused" and "2 automatic resyncs" in refused["last_error"]
        assert (coordinator.started, coordinator.refused) == (2, 1)
        assert (await coordinator.request("rc-loop", "by hand"))["state"] == "pending"  # an operator may
        assert coordinator._request("rc-other", "gap", "auto")["state"] == "pending"  # another agent may
        with pytest.raises(InvalidAgent):
            await coordinator.request("Not An Id!", "x")
    finally:
        await coordinator.stop()


async def test_requests_survive_a_restart_and_a_lost_file_is_noticed_at_start(setup: Setup) -> None:
    coordinator = setup.coordinator()
    coordinator.open()
    first = await coordinator.request("rc-kept", "test")
    coordinator._note_agents(["rc-lost", "rc-here"])
    await coordinator.stop()
    setup.store.replica("rc-here")  # its file exists; rc-lost has none
    again = setup.coordinator()
    again.open()
    try:
        by_agent = {p["agent_id"]: p for p in again.pending()}
        assert by_agent["rc-kept"]["request_id"] == first["request_id"]
        assert "missing" in by_agent["rc-lost"]["reason"] and by_agent["rc-lost"]["by"] == "htpc"
        assert set(by_agent) == {"rc-kept", "rc-lost"}
        setup.store.publish_view()
        view = setup.store.view.agent("rc-here")
        assert view is not None and view.resync_pending is None
    finally:
        await again.stop()


async def test_the_views_show_pending_resyncs(setup: Setup) -> None:
    setup.store.replica("rc-shown")
    setup.store.publish_view()
    coordinator = setup.coordinator()
    coordinator.open()
    try:
        before = time.time()
        await coordinator.request("rc-shown", "a test reason")
        view = setup.store.view.agent("rc-shown")
        assert view is not None and view.resync_pending == "a test reason"
        assert view.resync_requested_at is not None and view.resync_requested_at >= before
        coordinator.resync_applied("rc-shown", None)
        view = setup.store.view.agent("rc-shown")
        assert view is not None and view.resync_pending is None
    finally:
        await coordinator.stop()


async def test_a_damaged_recovery_database_is_set_aside_and_started_afresh(setup: Setup) -> None:
    setup.data.recovery_db.write_bytes(b"not a database at all" * 50)
    setup.store.replica("rc-survivor")
    setup.store.publish_view()
    coordinator = setup.coordinator()
    coordinator.open()
    try:
        (moved,) = setup.data.quarantine.glob("recovery-*.db")
        assert moved.read_bytes().startswith(b"not a database")
        assert coordinator.pending() == [] and "rc-survivor" in coordinator._known  # known again from the files
        assert (await coordinator.request("rc-survivor", "works"))["state"] == "pending"
    finally:
        await coordinator.stop()
