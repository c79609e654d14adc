"""Resync: the one way back for an agent whose central copy cannot be continued from the stream.

The HTPC asks the live agent for a fresh full copy of its replicated tables
(`{"control": "resync", "request_id": ...}` on `agents.<id>.query`, NATS
request/reply). The agent logs an R change, supersedes what it had not sent,
and publishes the snapshot as one transaction; the consumer replaces the
agent's central copy with it atomically (sequencer: Verdict.RESYNC) and tells
the coordinator, which marks the request finished.

`ResyncCoordinator` (`service.resync`) owns the requests:

- persisted in `DataDir.recovery_db` (they survive restarts), one active request per agent; `request()`
  answers it as JSON, `pending()` lists the active ones (an immutable snapshot, safe on the event loop);
- a task sends each pending request; an agent offline (no responders, no answer within the timeout) is
  asked again with backoff and at once when a record of it arrives (it is back); an accepted request whose
  copy has not been applied within `resend_after_s` is sent again (the same id: no new work on the agent);
- an attempt fails when the agent answers an error or its resync record is rejected; a new attempt (a new
  request id) follows, up to `max_attempts`; then the request fails and the agent stays blocked with the
  reason until an operator resyncs it;
- automatic requests (the consumer's: a dead letter in the agent's sequence, a gap that will not fill, ...)
  are bounded per agent: at most `auto_limit` in `auto_window_s`, and none after one failed in that window,
  so a hostile or broken agent cannot make the HTPC loop;
- the HTPC's own losses start requests too: an agent known here (`agents` table) whose central file is
  missing at start, a file quarantined as damaged (central_store), a file deleted or replaced while serving
  (checked every `file_check_interval_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import nats.errors
import orjson
from nats.aio.client import Client as NATS

from agent_client import Backoff, is_valid_agent_id, query_subject

from .central_store import is_damaged
from .errors import InvalidAgent
from .replica_state import ReplicaState

if TYPE_CHECKING:
    from .central_store import CentralStore
    from .consumer import Consumer

log = logging.getLogger("replicator.resync")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, first_seen REAL NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS resync_requests (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL,"
    " request_id TEXT NOT NULL, attempt_ids TEXT NOT NULL, reason TEXT NOT NULL, by TEXT NOT NULL,"
    " requested_at REAL NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL, at_seq INTEGER,"
    " accepted_at REAL, sent_at REAL, sends INTEGER NOT NULL DEFAULT 0, last_error TEXT, ended_at REAL)",
    "CREATE INDEX IF NOT EXISTS resync_requests_by_agent ON resync_requests (agent_id, requested_at)",
)
#: Request states. Active: pending (to be sent; the agent may be offline), sent (in flight), accepted (the
#: agent made the copy; it is on its way). Ended: finished (applied), failed (attempts exhausted).
ACTIVE = ("pending", "sent", "accepted")
#: Who asked: "operator" (or an operator's identity), "auto" (the consumer: bounded), "htpc" (a lost file).
AUTO = "auto"
HTPC = "htpc"
_KEEP_ENDED_S = 30 * 86_400.0  # ended requests kept this long (the auto bound reads the last hour)


def stuck_reason(state: ReplicaState, *, idle: bool) -> tuple[str, str]:
    """(kind, why) when something says the agent's copy should move and it cannot by itself, else ("", "").

    - "gap": records wait ahead of their turn for a change that has not arrived (a gap that does not fill,
      also at the start of a new epoch, or below what retention removed from the stream);
    - "report": with nothing left to deliver (`idle`), the agent reports changes JetStream acknowledged that
      the copy lacks (they aged out of the stream, or the central file was lost).

    The consumer asks for a resync when the same state lasts --resync-after seconds (Consumer._stuck_scan).
    """
    if state.ahead:
        return "gap", (
            f"{state.ahead} record(s) wait for an earlier change that has not arrived (the central copy stands at "
            f"change {state.watermark} of epoch {state.epoch})"
        )
    if idle and _reported_ahead(state):
        return "report", (
            f"the agent reports change {state.agent_acked_seq} of epoch {state.agent_epoch} acknowledged by "
            f"JetStream, the central copy stands at change {state.watermark} of epoch {state.epoch}, and the stream "
            "delivers nothing more (aged out, or the central file was lost)"
        )
    return "", ""


def _reported_ahead(state: ReplicaState) -> bool:
    """The agent's own report says JetStream holds changes the central copy lacks."""
    acked, epoch = state.agent_acked_seq, state.agent_epoch
    if acked is None or epoch is None or state.agent_reported_at is None:
        return False
    if epoch == state.epoch:
        return acked > state.watermark
    return epoch not in state.retired and acked > 0


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for stmt in _SCHEMA:
            conn.execute(stmt)
        conn.execute(
            "DELETE FROM resync_requests WHERE state NOT IN (?, ?, ?) AND ended_at < ?",
            (*ACTIVE, time.time() - _KEEP_ENDED_S),
        )
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass
class _Request:
    """One request (the event loop owns it); its row in `resync_requests` follows every change."""

    row: int
    agent_id: str
    request_id: str
    attempt_ids: list[str]
    reason: str
    by: str
    requested_at: float
    state: str = "pending"
    attempts: int = 1
    at_seq: int | None = None
    accepted_at: float | None = None
    sent_at: float | None = None
    sends: int = 0
    last_error: str | None = None
    ended_at: float | None = None
    next_try: float = 0.0  # monotonic
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 5.0))
    task: asyncio.Task[None] | None = None

    def answer(self) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "request_id": self.request_id,
            "reason": self.reason,
            "by": self.by,
            "requested_at": self.requested_at,
            "state": self.state,
            "attempts": self.attempts,
            "at_seq": self.at_seq,
            "accepted_at": self.accepted_at,
            "last_sent_at": self.sent_at,
            "sends": self.sends,
            "last_error": self.last_error,
            "ended_at": self.ended_at,
        }


class ResyncCoordinator:
    def __init__(
        self,
        path: Path,
        store: CentralStore,
        consumer: Consumer,
        nc: Callable[[], NATS | None],
        *,
        max_attempts: int = 3,
        auto_limit: int = 3,
        auto_window_s: float = 3_600.0,
        request_timeout_s: float = 2.0,
        resend_after_s: float = 30.0,
        file_check_interval_s: float = 2.0,
        tick_s: float = 0.5,
    ) -> None:
        self.path = path
        self.store = store
        self.consumer = consumer
        self._nc = nc
        self.max_attempts = max_attempts
        self.auto_limit = auto_limit
        self.auto_window_s = auto_window_s
        self.request_timeout_s = request_timeout_s
        self.resend_after_s = resend_after_s
        self.file_check_interval_s = file_check_interval_s
        self.tick_s = tick_s
        self.started = 0  # requests made (not counting one joined to an active request, or refused)
        self.finished = 0  # resync records applied (the agent's copy replaced by its fresh one)
        self.failed = 0  # requests given up (attempts exhausted)
        self.refused = 0  # automatic requests refused by the bound
        self._active: dict[str, _Request] = {}  # agent -> its active request
        self._known: set[str] = set()  # agents in the `agents` table
        self._snapshot: tuple[Mapping[str, Any], ...] = ()
        self._conn: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._files_checked = 0.0
        self._side_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Open the recovery database, load the active requests, and find what was lost while the HTPC was
        down: agents known here without a central file, central files quarantined as damaged, blocked agents
        with no request (automatic: the bound applies)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(self.path)
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            moved = self._set_aside()
            log.error(
                "%s is damaged (%s): moved to %s; pending resyncs are requested again as needed", self.path, exc, moved
            )
            conn = _connect(self.path)
        self._conn = conn
        self._known = {r[0] for r in conn.execute("SELECT agent_id FROM agents")}
        for row in conn.execute(
            "SELECT id, agent_id, request_id, attempt_ids, reason, by, requested_at, state, attempts, at_seq, "
            "accepted_at, sent_at, sends, last_error FROM resync_requests WHERE state IN (?, ?, ?) ORDER BY id",
            ACTIVE,
        ).fetchall():
            req = _Request(
                row=row[0],
                agent_id=row[1],
                request_id=row[2],
                attempt_ids=list(orjson.loads(row[3])),
                reason=row[4],
                by=row[5],
                requested_at=row[6],
                state="accepted" if row[7] == "accepted" else "pending",  # one in flight when we stopped: again
                attempts=row[8],
                at_seq=row[9],
                accepted_at=row[10],
                sent_at=row[11],
                sends=row[12],
                last_error=row[13],
            )
            self._active[req.agent_id] = req
        view = self.store.view
        for req in list(self._active.values()):
            agent = view.agent(req.agent_id)
            if agent is not None and agent.last_resync in req.attempt_ids:  # applied before a crash said so
                self._end(req, "finished")
        missing = sorted(a for a in self._known if a not in view.agents and not self.store.path_for(a).exists())
        for agent_id in missing:
            self._request(agent_id, "its central file is missing (deleted while the HTPC was down)", HTPC)
        self._note_agents(view.agent_ids())
        for agent in view.agents.values():  # blocked, and no request (its last one failed, or it was lost)
            if agent.blocked and agent.agent_id not in self._active:
                self._request(agent.agent_id, f"it is blocked: {agent.blocked}", AUTO)
        for found in self.store.take_quarantined():
            self._request(
                found.agent_id, f"its central file was damaged ({found.reason}); set aside as {found.moved_to}", HTPC
            )
        self._publish()

    def _set_aside(self) -> Path:
        """Move a damaged recovery database (and its side files) to the quarantine directory."""
        target = self.store.data_dir.quarantine / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            src = self.path.with_name(self.path.name + suffix)
            if src.exists():
                src.rename(target.with_name(target.name + suffix))
        return target

    def start(self) -> None:
        """Listen to the consumer and send requests (opening the recovery database first if needed)."""
        if self._conn is None:
            self.open()
        self.consumer.resyncs = self
        self._task = asyncio.create_task(self._run(), name="resync-coordinator")

    async def stop(self) -> None:
        if self.consumer.resyncs is self:
            self.consumer.resyncs = None
        tasks = [t for t in (self._task, *(r.task for r in self._active.values()), *self._side_tasks) if t]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ requests
    async def request(self, agent_id: str, reason: str, *, by: str = "operator") -> dict[str, Any]:
        """Request a resync of `agent_id` (any valid id: its central copy may be lost); answered at once.

        An active request of the agent is answered instead of a new one. Raises InvalidAgent for a bad id.
        """
        return self._request(agent_id, reason, by)

    def pending(self) -> list[dict[str, Any]]:
        """The active requests (oldest first), as of the last change."""
        return [dict(entry) for entry in self._snapshot]

    def _request(self, agent_id: str, reason: str, by: str) -> dict[str, Any]:
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        active = self._active.get(agent_id)
        if active is not None:
            return active.answer()
        now = time.time()
        if by == AUTO:
            refusal = self._auto_refusal(agent_id, now)
            if refusal is not None:
                self.refused += 1
                log.warning("agent %s: no automatic resync (%s); wanted because %s", agent_id, refusal, reason)
                return {
                    "agent_id": agent_id,
                    "request_id": None,
                    "reason": reason,
                    "by": by,
                    "requested_at": now,
                    "state": "refused",
                    "last_error": refusal,
                }
        request_id = secrets.token_hex(16)
        conn = self._db()
        cur = conn.execute(
            "INSERT INTO resync_requests (agent_id, request_id, attempt_ids, reason, by, requested_at, state, "
            "attempts) VALUES (?, ?, ?, ?, ?, ?, 'pending', 1)",
            (agent_id, request_id, orjson.dumps([request_id]).decode(), reason[:2000], by, now),
        )
        req = _Request(int(cur.lastrowid or 0), agent_id, request_id, [request_id], reason[:2000], by, now)
        self._active[agent_id] = req
        self.started += 1
        log.warning("agent %s: resync requested by %s (%s): %s", agent_id, by, request_id, reason)
        self._publish()
        self._wake.set()
        return req.answer()

    def _auto_refusal(self, agent_id: str, now: float) -> str | None:
        """Why an automatic request for the agent is refused now (the bound), or None."""
        since = now - self.auto_window_s
        rows = (
            self._db()
            .execute(
                "SELECT state FROM resync_requests WHERE agent_id = ? AND by = ? AND requested_at > ? ORDER BY id",
                (agent_id, AUTO, since),
            )
            .fetchall()
        )
        window = f"{self.auto_window_s / 60:g} min"
        if rows and rows[-1][0] == "failed":
            return f"the last automatic resync failed less than {window} ago; fix the cause and resync it by hand"
        if len(rows) >= self.auto_limit:
            return f"{len(rows)} automatic resyncs in the last {window} (the bound)"
        return None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the resync coordinator is not open")
        return self._conn

    def _save(self, req: _Request) -> None:
        self._db().execute(
            "UPDATE resync_requests SET request_id = ?, attempt_ids = ?, state = ?, attempts = ?, at_seq = ?, "
            "accepted_at = ?, sent_at = ?, sends = ?, last_error = ?, ended_at = ? WHERE id = ?",
            (
                req.request_id,
                orjson.dumps(req.attempt_ids).decode(),
                req.state,
                req.attempts,
                req.at_seq,
                req.accepted_at,
                req.sent_at,
                req.sends,
                req.last_error,
                req.ended_at,
                req.row,
            ),
        )

    def _publish(self) -> None:
        """New immutable snapshots for readers: `pending()` and the store view's resync marks."""
        active = sorted(self._active.values(), key=lambda r: r.requested_at)
        self._snapshot = tuple(MappingProxyType(r.answer()) for r in active)
        self.store.mark_resyncs({r.agent_id: (r.reason, r.requested_at) for r in active})

    def _end(self, req: _Request, state: str) -> None:
        req.state = state
        req.ended_at = time.time()
        if self._active.get(req.agent_id) is req:
            del self._active[req.agent_id]
        if req.task is not None and req.task is not asyncio.current_task():
            req.task.cancel()
        self._save(req)
        self._publish()

    def _attempt_failed(self, req: _Request, why: str) -> None:
        """This attempt will not bring the copy: another one (a new request id), or give up."""
        req.last_error = why[:2000]
        if req.attempts >= self.max_attempts:
            self.failed += 1
            self._end(req, "failed")
            reason = (
                f"resync failed after {req.attempts} attempt(s) ({why}); fix the cause, then run "
                f"`replicator resync {req.agent_id}`"
            )
            log.error("agent %s: %s", req.agent_id, reason)
            self._spawn(self.consumer.mark_blocked(req.agent_id, reason[:2000]))
            return
        req.attempts += 1
        req.request_id = secrets.token_hex(16)
        req.attempt_ids.append(req.request_id)
        req.state, req.at_seq, req.accepted_at = "pending", None, None
        req.next_try = time.monotonic() + req.backoff.next()
        log.warning("agent %s: resync attempt %d failed (%s); trying again", req.agent_id, req.attempts - 1, why)
        self._save(req)
        self._publish()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    # ------------------------------------------------------------ from the consumer (ResyncListener)
    def resync_wanted(self, agent_id: str, reason: str) -> None:
        self._request(agent_id, reason, AUTO)

    def resync_applied(self, agent_id: str, request_id: str | None) -> None:
        """Any resync applied to the agent heals what its request was for (the copy is the agent's, fresh)."""
        self.finished += 1
        req = self._active.get(agent_id)
        if req is not None:
            if request_id is not None and request_id not in req.attempt_ids:
                req.last_error = f"healed by resync {request_id} (requested elsewhere)"
            self._end(req, "finished")
            log.warning("agent %s: resync finished (%s)", agent_id, request_id)

    def resync_rejected(self, agent_id: str, request_id: str, reason: str) -> None:
        req = self._active.get(agent_id)
        if req is not None and request_id in req.attempt_ids:
            self._attempt_failed(req, f"its resync record was rejected: {reason}")
        else:
            self._request(agent_id, f"a resync record ({request_id}) was rejected: {reason}", AUTO)

    def agents_seen(self, agents: Collection[str]) -> None:
        """Records of these agents arrived: one waiting because it was offline is asked now."""
        now = time.monotonic()
        for agent_id in agents:
            req = self._active.get(agent_id)
            if req is not None and req.state == "pending" and req.next_try > now:
                req.next_try = now
                req.backoff.reset()
                self._wake.set()
        self._note_agents(agents)

    # ------------------------------------------------------------ the task
    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # never die: the next tick tries again
                log.exception("resync coordinator: unexpected failure")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)

    async def _tick(self) -> None:
        now = time.monotonic()
        if now - self._files_checked >= self.file_check_interval_s:
            self._files_checked = now
            await self._check_files()
        for req in list(self._active.values()):
            if req.task is not None or req.next_try > now:
                continue
            if req.state == "accepted" and req.accepted_at is not None:
                if time.time() - (req.sent_at or req.accepted_at) < self.resend_after_s:
                    continue
                log.warning(
                    "agent %s: resync %s accepted %.0fs ago and not applied yet; asking again",
                    req.agent_id,
                    req.request_id,
                    time.time() - req.accepted_at,
                )
            req.task = asyncio.create_task(self._send(req), name=f"resync-{req.agent_id}")

    async def _send(self, req: _Request) -> None:
        try:
            await self._ask(req)
        finally:
            req.task = None

    async def _ask(self, req: _Request) -> None:
        """Send the request once and act on the answer (or on the silence)."""
        nc = self._nc()
        if nc is None or not nc.is_connected:
            self._later(req, "the HTPC is not connected to NATS")
            return
        request_id = req.request_id
        body = orjson.dumps({"control": "resync", "request_id": request_id})
        if req.state == "pending":
            req.state = "sent"
        req.sends += 1
        req.sent_at = time.time()
        try:
            msg = await nc.request(query_subject(req.agent_id), body, timeout=self.request_timeout_s)
        except nats.errors.NoRespondersError:
            self._later(req, "the agent is offline (nobody answers on its query subject)")
            return
        except (nats.errors.TimeoutError, TimeoutError):
            self._later(req, f"the agent did not answer within {self.request_timeout_s:g}s")
            return
        except (nats.errors.Error, OSError) as exc:
            self._later(req, f"cannot send the request: {type(exc).__name__}: {exc}")
            return
        if self._active.get(req.agent_id) is not req or req.request_id != request_id:
            return  # finished or moved on while we waited for the answer
        try:
            reply = orjson.loads(msg.data)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except ValueError:
            self._attempt_failed(req, f"the agent's answer is not JSON: {bytes(msg.data[:100])!r}")
            return
        if reply.get("resync") == "accepted" and reply.get("request_id") == request_id:
            at_seq = reply.get("at_seq")
            req.state = "accepted"
            req.at_seq = at_seq if isinstance(at_seq, int) else None
            req.accepted_at = req.accepted_at or time.time()
            req.last_error = None
            req.backoff.reset()
            self._save(req)
            self._publish()
            return
        code, message = str(reply.get("error") or "unexpected_answer"), str(reply.get("message") or reply)[:500]
        if code == "unknown_control":  # an agent_client that predates resync: asking again will not help
            req.attempts = self.max_attempts
        self._attempt_failed(req, f"the agent answered {code}: {message}")

    def _later(self, req: _Request, why: str) -> None:
        """The agent cannot be asked now: ask again after a backoff (or when a record of it arrives)."""
        if self._active.get(req.agent_id) is not req:
            return
        if req.state == "sent":
            req.state = "pending"
        if req.last_error != why:
            log.info("agent %s: resync %s waits: %s", req.agent_id, req.request_id, why)
        req.last_error = why
        req.next_try = time.monotonic() + req.backoff.next()
        self._save(req)
        self._publish()

    # ------------------------------------------------------------ central files
    def _note_agents(self, agents: Collection[str]) -> None:
        new = [a for a in agents if a not in self._known]
        if new:
            now = time.time()
            self._db().executemany(
                "INSERT OR IGNORE INTO agents (agent_id, first_seen) VALUES (?, ?)", [(a, now) for a in new]
            )
            self._known.update(new)

    async def _check_files(self) -> None:
        """Every central file still the one the HTPC opened? A lost one must not stay silently "ok"."""
        view = self.store.view
        self._note_agents(view.agent_ids())
        for agent in view.agents.values():
            if agent.file_id is None:
                continue
            try:
                st = os.stat(agent.path)
            except FileNotFoundError:
                lost = "deleted"
            except OSError as exc:
                log.debug("cannot stat %s: %s", agent.path, exc)
                continue
            else:
                if (st.st_dev, st.st_ino) == agent.file_id:
                    continue
                lost = "replaced"
            log.error(
                "agent %s: its central file %s was %s while serving; opening it anew", agent.agent_id, agent.path, lost
            )
            await self.consumer.reopen_lost(agent.agent_id)
            self._request(agent.agent_id, f"its central file was {lost} while the HTPC was serving", HTPC)
