"""The relay HTTP API: the storage guide's endpoints, served from the central store.

Routes only; their parts live beside it: request bodies (api_models), who is
calling (auth_backend), the body size limit (body_limit), relay writes
(relay_writer), the change feed (feed_hub) and the status view (status,
metrics). Writes from HTTP-only agents (`/relay/immediate`, `/relay/batch`)
are put on the same JetStream stream as every agent's change records and
answered once JetStream has them (202 with the stream sequence); the consumer
applies them like everything else; a write that names no agent is attributed
by `relay_writer.attribute` (never dropped). `/relay/changes` serves one agent
table's change feed (snapshot, then changes after an offset; JSON long-poll or
Server-Sent Events). Operators request resyncs (resync.py), retry or discard
dead letters (consumer.py) and take online backups (backup.py) here too.
Errors are JSON `{"error": code, "message": text}` with a stable code; bad
input never produces a bare 500.
"""

from __future__ import annotations

import copy
import logging
import uuid
from collections import defaultdict
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.authentication import AuthenticationMiddleware

from agent_client import RECORD_VERSION, STREAM_NAME, RelayRow, changes_subject, is_valid_agent_id, query_subject

from ._version import __version__
from .api_docs import install_api_docs
from .api_models import BatchWrite, ImmediateWrite, QueryRequest, ResyncRequest
from .auth import Principal
from .auth_backend import TokenAuthBackend, in_scope, operator_only, principal
from .backup import backup_response
from .body_limit import BodyLimit
from .console import install_console
from .consumer import Consumer
from .errors import (
    BadRequest,
    InvalidAgent,
    NatsUnavailable,
    PayloadTooLarge,
    ReplicatorError,
    UnknownAgent,
    error_body,
)
from .feed_hub import feed_response, parse_request
from .metrics import render_metrics
from .relay_writer import Attribution, Planned, attribute
from .resync import ResyncCoordinator
from .service import ReplicatorService
from .status import service_status

log = logging.getLogger("replicator.api")

#: How /relay/info names the subjects (the same functions NATS permissions are written with).
SUBJECT_TEMPLATES = {"changes": changes_subject("<agent_id>"), "query": query_subject("<agent_id>")}


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ReplicatorError)
    async def _replicator_error(_req: Request, exc: ReplicatorError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "invalid_json", "request body is not valid JSON")
        detail = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg")), "type": str(e.get("type"))}
            for e in errors[:20]
        ]
        first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
        where = ".".join(first["loc"][1:]) or "body"
        return _error(422, "invalid_request", f"{where}: {first['msg']}", detail=detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI raises a bare 400 when the body cannot be parsed at all (not UTF-8, nested beyond recursion).
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error: %r", exc)
        return _error(500, "internal_error", f"unexpected {type(exc).__name__}; see the replicator log")


def _at(index: int, exc: ReplicatorError) -> ReplicatorError:
    """`exc` (same class and code) with its message prefixed by the batch record it is about."""
    located = copy.copy(exc)
    located.args = (f"records[{index}]: {exc}",)
    return located


def _resync(service: ReplicatorService) -> ResyncCoordinator:
    if service.resync is None:
        raise NatsUnavailable("the HTPC is still starting; retry in a moment")
    return service.resync


def _consumer(service: ReplicatorService) -> Consumer:
    if service.consumer is None:
        raise NatsUnavailable("the consumer is not running; retry in a moment")
    return service.consumer


def create_app(service: ReplicatorService) -> FastAPI:
    s = service.settings
    writer = service.relay_writer
    app = FastAPI(
        title="commander-replicator relay API",
        version=__version__,
        description="Central query and relay API of Commander OS agent storage (the HTPC).",
        docs_url=None,  # /docs and /redoc are served from local assets (api_docs), never from a CDN
        redoc_url=None,
    )
    _install_error_handlers(app)
    defaults_used: set[Attribution] = set()

    def unnamed(header: str | None, who: Principal | None) -> Attribution:
        """The agent of rows that name none; said once in the log when it is a default."""
        found = attribute(header, who, s.default_agent_id)
        if found.by in ("built-in default", "--default-agent-id") and found not in defaults_used:
            defaults_used.add(found)
            log.warning(
                "relay writes that name no agent are attributed to %r (%s); name one with agent_id, "
                "the X-Agent-Id header or an agent token",
                found.agent_id,
                found.by,
            )
        return found

    @app.post("/relay/immediate", status_code=202, tags=["relay"])
    async def relay_immediate(
        body: ImmediateWrite,
        idempotency_key: str | None = Header(None, max_length=200),
        x_agent_id: str | None = Header(None, max_length=64),
        who: Principal | None = Depends(principal),
    ) -> dict[str, Any]:
        """One row from an HTTP-only agent; answered once durable in JetStream.

        Without `agent_id` the row is attributed like a batch's (X-Agent-Id, token, default agent).
        """
        attribution = Attribution(body.agent_id, "agent_id") if body.agent_id is not None else unnamed(x_agent_id, who)
        agent_id = attribution.agent_id
        in_scope(who, agent_id)
        planned: Planned = {}
        writer.check(agent_id, body.table, body.data, planned)
        key = idempotency_key or uuid.uuid4().hex
        payload = writer.encode(agent_id, [RelayRow(table=body.table, data=body.data)], body.timestamp)
        result = await writer.publish(agent_id, payload, key)
        writer.expect(agent_id, planned)
        return {"status": "accepted", **result, "attributed_by": attribution.by}

    @app.post("/relay/batch", status_code=202, tags=["relay"])
    async def relay_batch(
        body: BatchWrite,
        idempotency_key: str | None = Header(None, max_length=200),
        x_agent_id: str | None = Header(None, max_length=64),
        who: Principal | None = Depends(principal),
    ) -> dict[str, Any]:
        """Several rows; each agent's rows become one record (applied in one central transaction).

        A row's agent: its own `agent_id`, else the batch's, else the `X-Agent-Id` header, else the agent
        token's, else `--default-agent-id`, else `relay-default` (the guide's `{"records": [{"table", "data"}]}`
        names none and never reads the answer: its rows are kept, never dropped). `attributed` says where
        the rows that named no agent went. Every row is checked before anything is published.
        """
        if len(body.records) > s.max_batch_records:
            raise PayloadTooLarge(f"at most {s.max_batch_records} records per batch")
        fallback: Attribution | None = None
        unnamed_rows = 0
        per_agent: dict[str, list[RelayRow]] = defaultdict(list)
        planned: dict[str, Planned] = defaultdict(dict)
        for i, item in enumerate(body.records):
            agent_id = item.agent_id or body.agent_id
            try:
                if agent_id is None:
                    fallback = fallback or unnamed(x_agent_id, who)
                    agent_id = fallback.agent_id
                    unnamed_rows += 1
                in_scope(who, agent_id)
                writer.check(agent_id, item.table, item.data, planned[agent_id])
            except ReplicatorError as exc:
                raise _at(i, exc) from None
            per_agent[agent_id].append(RelayRow(table=item.table, data=item.data))
        key = idempotency_key or uuid.uuid4().hex
        payloads = {agent_id: writer.encode(agent_id, rows) for agent_id, rows in per_agent.items()}  # all, then send
        results = []
        for agent_id, payload in payloads.items():
            results.append(await writer.publish(agent_id, payload, key))
            writer.expect(agent_id, planned[agent_id])
        answer: dict[str, Any] = {"status": "accepted", "records": len(body.records), "published": results}
        if fallback is not None:
            answer["attributed"] = {"agent_id": fallback.agent_id, "by": fallback.by, "records": unnamed_rows}
        return answer

    @app.post("/relay/query", tags=["query"], response_class=Response)
    async def relay_query(body: QueryRequest, who: Principal | None = Depends(principal)) -> Response:
        """Read-only SQL over the central copies; `other_agent.table` reaches another agent.

        Answers `{"columns", "rows", "truncated", "applied_seq"}` (encoded off the event loop). Bounded per
        caller: 429 `too_many_queries` (with Retry-After) beyond `--query-max-concurrent` at once, 408
        `query_timeout`, 422 `result_too_large` / `value_too_large` / `query_too_complex`.
        """
        assert service.query_engine is not None
        in_scope(who, body.agent_id)
        answer = await service.query_engine.query(
            body.agent_id,
            body.query,
            body.params,
            principal=who.identity if who is not None else None,
            min_seq=body.min_seq,
            epoch=body.epoch,
            timeout_ms=body.timeout_ms,
            max_rows=body.max_rows,
        )
        return Response(answer, media_type="application/json")

    @app.get("/relay/changes", tags=["feed"], response_class=Response)
    async def relay_changes(
        agent: str | None = None,
        table: str | None = None,
        offset: str | None = None,
        live: str | None = None,
        timeout_ms: str | None = None,
        last_event_id: str | None = Header(None, max_length=200),
        accept: str | None = Header(None),
        _who: Principal | None = Depends(principal),
    ) -> Response:
        """One agent table's change feed: a snapshot (no `offset`), or the changes after `offset`.

        JSON (default): an array of feed messages; `live=true` waits up to `timeout_ms` (default 20000, at most
        60000) for a change once caught up; must-refetch is a 409. `Accept: text/event-stream`: the same
        messages as Server-Sent Events; with `live=true` the stream stays open. Any authenticated caller may read
        any agent's `always` tables: 404 `unknown_agent` / `unknown_table`, 403 `table_not_visible` (on_demand),
        400 `invalid_offset`, 503 `too_many_subscribers`.
        """
        hub = service.feed_hub
        if hub is None or service.store is None:
            raise NatsUnavailable("the HTPC is still starting; retry in a moment")
        request = parse_request(
            service.store.view,
            agent=agent,
            table=table,
            offset=offset,
            live=live,
            timeout_ms=timeout_ms,
            last_event_id=last_event_id,
            accept=accept,
        )
        return await feed_response(hub, request)

    @app.get("/relay/info", tags=["info"])
    async def relay_info(request: Request) -> dict[str, Any]:
        """How agents reach NATS, and versions."""
        return {
            "nats_url": service.advertised_nats_url(request.url.hostname),
            "stream": STREAM_NAME,
            "subjects": dict(SUBJECT_TEMPLATES),
            "versions": {
                "replicator": __version__,
                "record": RECORD_VERSION,
                "nats_server": await service.server_version(),
            },
        }

    @app.get("/relay/agents", tags=["info"])
    async def relay_agents(_who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Every agent the HTPC knows: epoch, watermark, lag, last seen, tables, dead letters."""
        return {"agents": service_status(service).agents()}

    @app.get("/relay/agents/{agent_id}", tags=["info"])
    async def relay_agent(agent_id: str, _who: Principal | None = Depends(principal)) -> dict[str, Any]:
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        found = service_status(service).agent(agent_id)
        if found is None:
            raise UnknownAgent(f"no data from agent {agent_id!r} yet")
        return found

    @app.get("/relay/agents/{agent_id}/tables", tags=["info"])
    async def relay_agent_tables(agent_id: str, who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """The agent's central tables: name, source (agent / relay), visibility, columns with types, primary key.

        `always` tables show what their change feed's schema message shows to any caller. The columns and
        primary key of an `on_demand` table are shown to operators, to the agent itself and to agents it
        shares them with (`replicator auth share OWNER --with READER`: those its queries may read); any other
        agent token gets `columns: null` and `pk: null`.
        """
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        view = service.store.view if service.store is not None else None
        found = view.agent(agent_id) if view is not None else None
        if found is None:
            raise UnknownAgent(f"no data from agent {agent_id!r} yet")
        auth = service.auth
        reads_on_demand = (
            who is None
            or who.is_operator
            or who.name == agent_id
            or (auth is not None and auth.may_read_on_demand(who.name, agent_id))
        )
        tables = []
        for name in sorted(found.tables):
            table = found.tables[name]
            shown = reads_on_demand or table.visibility == "always"
            tables.append(
                {
                    "name": table.name,
                    "source": table.source,
                    "visibility": table.visibility,
                    "columns": [{"name": c, "type": t} for c, t in zip(table.columns, table.types, strict=False)]
                    if shown
                    else None,
                    "pk": list(table.pk) if shown else None,
                }
            )
        return {"agent_id": agent_id, "tables": tables}

    @app.get("/relay/whoami", tags=["info"])
    async def relay_whoami(who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Who the caller's token is: `{"auth", "kind": "agent"|"operator"|null, "name", "operator"}`.

        With authentication off: `auth: false` and `operator: true` (every endpoint is open). 401 without a
        valid token when it is on. The console uses it to offer the operator actions only to operators.
        """
        if who is None:
            return {"auth": False, "kind": None, "name": None, "operator": True}
        return {"auth": True, "kind": who.kind, "name": who.name, "operator": who.is_operator}

    @app.get("/relay/dead-letters", tags=["info"])
    async def dead_letters(
        agent_id: str | None = None, limit: int = 100, who: Principal | None = Depends(principal)
    ) -> dict[str, Any]:
        """Records that could not be decoded or applied, newest first, with their reason (operators only)."""
        assert service.dead_letters is not None
        operator_only(who)
        if agent_id is not None and not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000")
        return {"dead_letters": service.dead_letters.list(agent_id=agent_id, limit=limit)}

    @app.post("/relay/dead-letters/{dead_letter_id}/retry", tags=["operations"])
    async def retry_dead_letter(dead_letter_id: int, who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Apply a dead letter again (after its cause was fixed); 404 unknown, 409 not retryable (operators only)."""
        operator_only(who)
        return await _consumer(service).retry_dead_letter(dead_letter_id)

    @app.post("/relay/dead-letters/{dead_letter_id}/discard", tags=["operations"])
    async def discard_dead_letter(dead_letter_id: int, who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Drop a dead letter for good; one in an agent's sequence requests a resync of it (operators only).

        Answers `{"discarded": id, "resync": {...} | null, "consequence": "..."}`.
        """
        operator_only(who)
        return await _consumer(service).discard_dead_letter(dead_letter_id)

    @app.post("/relay/agents/{agent_id}/resync", status_code=202, tags=["operations"])
    async def request_resync(
        agent_id: str, body: ResyncRequest | None = None, who: Principal | None = Depends(principal)
    ) -> dict[str, Any]:
        """Ask the agent for a fresh full copy of its replicated tables, replacing its central copy atomically.

        Answered at once (202) with the request; it waits while the agent is offline and is served when it
        reconnects (`GET /relay/resyncs`, `/relay/agents/{id}` show its progress). Operators only.
        """
        operator_only(who)
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        reason = body.reason if body is not None and body.reason else "requested by the operator"
        return await _resync(service).request(agent_id, reason, by=who.identity if who is not None else "operator")

    @app.get("/relay/resyncs", tags=["operations"])
    async def resyncs(who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Resyncs requested and not finished yet (operators only)."""
        operator_only(who)
        return {"resyncs": _resync(service).pending()}

    @app.post("/relay/admin/backup", tags=["operations"], response_class=Response)
    async def admin_backup(who: Principal | None = Depends(principal)) -> Response:
        """An online, consistent backup of the central store, streamed to the caller (`replicator backup`)."""
        operator_only(who)
        return await backup_response(service)

    @app.get("/health", tags=["info"])
    async def health() -> dict[str, Any]:
        return service_status(service).health()

    @app.get("/ready", tags=["info"])
    async def ready() -> JSONResponse:
        """Readiness (for load balancers and Kubernetes): 200 when nothing is wrong, else 503 with the reasons."""
        status = service_status(service)
        return JSONResponse(
            {
                "ready": status.healthy,
                "nats_connected": status.nats_connected,
                "consumer_running": status.consumer_running,
                "problems": status.problems,
            },
            status_code=200 if status.healthy else 503,
        )

    @app.get("/metrics", tags=["info"], response_class=PlainTextResponse)
    async def metrics(who: Principal | None = Depends(principal)) -> Response:
        operator_only(who)
        return PlainTextResponse(render_metrics(service_status(service)), media_type="text/plain; version=0.0.4")

    install_api_docs(app)
    install_console(app)
    app.add_middleware(AuthenticationMiddleware, backend=TokenAuthBackend(lambda: service.auth))
    app.add_middleware(BodyLimit, limit=s.max_body_bytes)  # outermost: nothing reads an oversized body
    return app
