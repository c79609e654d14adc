"""The relay HTTP API: the storage guide's endpoints, served from the central store.

Writes from HTTP-only agents (`/relay/immediate`, `/relay/batch`) are put on
the same JetStream stream as every agent's change records and answered once
JetStream has them (202 with the stream sequence); the consumer applies them
like everything else. Errors are JSON `{"error": code, "message": text}` with a
stable code; bad input never produces a bare 500.
"""

from __future__ import annotations

import importlib.metadata
import logging
import uuid
from collections import defaultdict
from typing import Any

import nats.errors
import nats.js.errors
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_client import (
    RECORD_VERSION,
    STREAM_NAME,
    RelayRecord,
    RelayRow,
    changes_subject,
    encode_record,
    is_valid_agent_id,
    is_valid_identifier,
)

from .auth import Principal
from .central_store import relay_value
from .errors import (
    BadRequest,
    Forbidden,
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    PayloadTooLarge,
    RecordRejected,
    ReplicatorError,
    TableOwnedByAgent,
    Unauthorized,
    UnknownAgent,
)
from .metrics import render_metrics
from .service import ReplicatorService

log = logging.getLogger("replicator.api")

try:
    VERSION = importlib.metadata.version("commander-replicator")
except importlib.metadata.PackageNotFoundError:  # running from a checkout
    VERSION = "0.0.0+local"


# ----------------------------------------------------------------------------- request bodies
class ImmediateWrite(BaseModel):
    model_config = ConfigDict(extra="ignore")
    agent_id: str = Field(max_length=64)
    table: str = Field(max_length=128)
    data: dict[str, Any]
    timestamp: float | None = None


class BatchItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    agent_id: str | None = Field(None, max_length=64)
    table: str = Field(max_length=128)
    data: dict[str, Any]


class BatchWrite(BaseModel):
    model_config = ConfigDict(extra="ignore")
    agent_id: str | None = Field(None, max_length=64)
    records: list[BatchItem] = Field(min_length=1)


class QueryRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    agent_id: str = Field(max_length=64)
    query: str = Field(min_length=1, max_length=100_000)
    params: list[Any] | dict[str, Any] | None = None
    min_seq: int | None = Field(None, ge=0)
    epoch: str | None = Field(None, max_length=64)
    timeout_ms: int | None = Field(None, ge=1, le=60_000)
    max_rows: int | None = Field(None, ge=1)


# ----------------------------------------------------------------------------- helpers
def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


class BodyLimit:
    """Refuse request bodies over `limit` bytes, declared or streamed (413, JSON), before any parsing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(413, "payload_too_large", f"request body over {self.limit} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _check_row(agent_id: str, table: str, data: dict[str, Any]) -> None:
    if not is_valid_agent_id(agent_id):
        raise InvalidAgent(f"invalid agent id {agent_id!r}: must match [a-z0-9][a-z0-9_-]{{0,63}}")
    if not is_valid_identifier(table):
        raise InvalidName(f"invalid table name {table!r}: letters, digits and '_', not starting with a digit")
    if not data:
        raise InvalidValue(f"row for {table!r} has no columns")
    for column, value in data.items():
        if not is_valid_identifier(column):
            raise InvalidName(f"invalid column name {column!r} in {table!r}")
        try:
            relay_value(table, column, value)
        except RecordRejected as exc:
            raise InvalidValue(str(exc)) from None


def create_app(service: ReplicatorService) -> FastAPI:
    s = service.settings
    app = FastAPI(
        title="commander-replicator relay API",
        version=VERSION,
        description="Central query and relay API of Commander OS agent storage (the HTPC).",
    )

    @app.exception_handler(ReplicatorError)
    async def _replicator_error(_req: Request, exc: ReplicatorError) -> JSONResponse:
        return _error(exc.status, exc.code, str(exc))

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

    def principal(request: Request) -> Principal | None:
        """Who is calling: None when authentication is off, else the token's holder (401 otherwise)."""
        auth = service.auth
        if auth is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing bearer token: send `Authorization: Bearer <token>` (see `replicator auth`)")
        who = auth.authenticate(token.strip())
        if who is None:
            raise Unauthorized("unknown or revoked token")
        return who

    def in_scope(who: Principal | None, agent_id: str) -> None:
        if who is not None and not who.is_operator and who.name != agent_id:
            raise Forbidden(f"the token of agent {who.name!r} cannot act as agent {agent_id!r}")

    def operator_only(who: Principal | None) -> None:
        if who is not None and not who.is_operator:
            raise Forbidden("this endpoint needs an operator token")

    def check_target(agent_id: str, table: str, data: dict[str, Any]) -> None:
        _check_row(agent_id, table, data)
        rep = service.store.replicas.get(agent_id) if service.store is not None else None
        meta = rep.tables.get(table) if rep is not None else None
        if meta is not None and meta.source == "agent":
            raise TableOwnedByAgent(
                f"{agent_id}.{table} is {meta.visibility} on the agent's own database; "
                "write it there (the relay would race its replication)"
            )

    def encode(agent_id: str, rows: list[RelayRow], timestamp: float | None) -> bytes:
        record = RelayRecord(v=RECORD_VERSION, kind="relay", agent_id=agent_id, timestamp=timestamp, rows=rows)
        try:
            return encode_record(record)
        except TypeError as exc:  # orjson: nesting too deep once wrapped in the record, or unencodable text
            raise InvalidValue(f"the row cannot be encoded as a change record: {exc}") from None

    async def publish(agent_id: str, payload: bytes, key: str) -> dict[str, Any]:
        js = service.js
        if js is None or service.nc is None or not service.nc.is_connected:
            raise NatsUnavailable("the HTPC is not connected to NATS; retry later")
        try:
            ack = await js.publish(
                changes_subject(agent_id),
                payload,
                timeout=5.0,
                headers={"Nats-Msg-Id": f"relay:{agent_id}:{key}"},
            )
        except nats.errors.MaxPayloadError:  # retrying cannot help: not a 503
            raise PayloadTooLarge(f"the encoded record ({len(payload)} bytes) exceeds the NATS max_payload") from None
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise NatsUnavailable(f"JetStream did not store the write: {exc!r}") from None
        service.relay_published += 1
        return {"agent_id": agent_id, "stream": ack.stream, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)}

    @app.post("/relay/immediate", status_code=202, tags=["relay"])
    async def relay_immediate(
        body: ImmediateWrite,
        idempotency_key: str | None = Header(None, max_length=200),
        who: Principal | None = Depends(principal),
    ) -> dict[str, Any]:
        """One row from an HTTP-only agent; answered once durable in JetStream."""
        in_scope(who, body.agent_id)
        check_target(body.agent_id, body.table, body.data)
        key = idempotency_key or uuid.uuid4().hex
        payload = encode(body.agent_id, [RelayRow(table=body.table, data=body.data)], body.timestamp)
        result = await publish(body.agent_id, payload, key)
        return {"status": "accepted", **result}

    @app.post("/relay/batch", status_code=202, tags=["relay"])
    async def relay_batch(
        body: BatchWrite,
        idempotency_key: str | None = Header(None, max_length=200),
        who: Principal | None = Depends(principal),
    ) -> dict[str, Any]:
        """Several rows; each agent's rows become one record (applied in one central transaction).

        The guide's payload `{"records": [{"table", "data"}]}` names no agent: it is
        taken from the agent token when authentication is on, else give `agent_id`.
        """
        if len(body.records) > s.max_batch_records:
            raise PayloadTooLarge(f"at most {s.max_batch_records} records per batch")
        default_agent = body.agent_id or (who.name if who is not None and not who.is_operator else None)
        per_agent: dict[str, list[RelayRow]] = defaultdict(list)
        for i, item in enumerate(body.records):
            agent_id = item.agent_id or default_agent
            if agent_id is None:
                raise InvalidAgent(
                    f"records[{i}] has no agent_id: give one per record or for the batch, or use an agent token"
                )
            in_scope(who, agent_id)
            check_target(agent_id, item.table, item.data)
            per_agent[agent_id].append(RelayRow(table=item.table, data=item.data))
        key = idempotency_key or uuid.uuid4().hex
        payloads = {agent_id: encode(agent_id, rows, None) for agent_id, rows in per_agent.items()}  # all, then publish
        results = [await publish(agent_id, payload, key) for agent_id, payload in payloads.items()]
        return {"status": "accepted", "records": len(body.records), "published": results}

    @app.post("/relay/query", tags=["query"])
    async def relay_query(body: QueryRequest, who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Read-only SQL over the central copies; `other_agent.table` reaches another agent."""
        assert service.query_engine is not None
        in_scope(who, body.agent_id)
        return await service.query_engine.query(
            body.agent_id,
            body.query,
            body.params,
            min_seq=body.min_seq,
            epoch=body.epoch,
            timeout_ms=body.timeout_ms,
            max_rows=body.max_rows,
        )

    @app.get("/relay/info", tags=["info"])
    async def relay_info(request: Request) -> dict[str, Any]:
        """How agents reach NATS, and versions."""
        return {
            "nats_url": service.advertised_nats_url(request.url.hostname),
            "stream": STREAM_NAME,
            "subjects": {"changes": "agents.<agent_id>.changes", "query": "agents.<agent_id>.query"},
            "versions": {
                "replicator": VERSION,
                "record": RECORD_VERSION,
                "nats_server": await service.server_version(),
            },
        }

    def _agents() -> list[dict[str, Any]]:
        assert service.store is not None and service.dead_letters is not None and service.consumer is not None
        dead = service.dead_letters.counts()
        out = []
        for a in service.store.describe():
            a["dead_letters"] = dead.get(a["agent_id"], 0)
            a["blocked"] = service.consumer.blocked.get(a["agent_id"])
            out.append(a)
        return out

    @app.get("/relay/agents", tags=["info"])
    async def relay_agents(_who: Principal | None = Depends(principal)) -> dict[str, Any]:
        """Every agent the HTPC knows: epoch, watermark, lag, last seen, tables, dead letters."""
        return {"agents": _agents()}

    @app.get("/relay/agents/{agent_id}", tags=["info"])
    async def relay_agent(agent_id: str, _who: Principal | None = Depends(principal)) -> dict[str, Any]:
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}")
        for a in _agents():
            if a["agent_id"] == agent_id:
                return a
        raise UnknownAgent(f"no data from agent {agent_id!r} yet")

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

    @app.get("/health", tags=["info"])
    async def health() -> dict[str, Any]:
        consumer = service.consumer
        nats_ok = service.nc is not None and service.nc.is_connected
        running = consumer is not None and consumer.running
        agents = _agents() if service.store is not None else []
        return {
            "status": "ok" if nats_ok and running else "degraded",
            "nats": {
                "connected": nats_ok,
                "url": service.nats_url,
                "embedded": service.embedded is not None,
                "embedded_restarts": service.embedded.restarts if service.embedded else 0,
            },
            "consumer": {
                "running": running,
                "durable": s.durable,
                "last_fetch_at": consumer.stats.last_fetch_at if consumer else None,
                "last_error": consumer.last_error if consumer else None,
            },
            "auth": service.auth is not None,
            "stream_replicas": service.stream_replicas,
            "agents": len(agents),
            "dead_letters": service.dead_letters.total() if service.dead_letters else 0,
            "blocked_agents": {a["agent_id"]: a["blocked"] for a in agents if a["blocked"]},
            "max_lag_changes": max((a["lag_changes"] for a in agents), default=0),
        }

    @app.get("/ready", tags=["info"])
    async def ready() -> JSONResponse:
        """Readiness (for load balancers and Kubernetes): 200 when NATS and the consumer run, else 503."""
        nats_ok = service.nc is not None and service.nc.is_connected
        running = service.consumer is not None and service.consumer.running
        status = 200 if nats_ok and running else 503
        return JSONResponse(
            {"ready": status == 200, "nats_connected": nats_ok, "consumer_running": running}, status_code=status
        )

    @app.get("/metrics", tags=["info"], response_class=PlainTextResponse)
    async def metrics(who: Principal | None = Depends(principal)) -> Response:
        operator_only(who)
        return PlainTextResponse(render_metrics(service), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, limit=s.max_body_bytes)
    return app
