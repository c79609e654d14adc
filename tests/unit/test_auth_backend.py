"""The token backend: who is calling, 401 only where a principal is needed, 403 outside a token's scope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware.authentication import AuthenticationMiddleware

from replicator.auth import AuthStore, Principal
from replicator.auth_backend import (
    MISSING_TOKEN,
    UNKNOWN_TOKEN,
    TokenAuthBackend,
    in_scope,
    operator_only,
    principal,
)
from replicator.errors import ReplicatorError


def _app(tokens: AuthStore | None) -> FastAPI:
    app = FastAPI()

    @app.exception_handler(ReplicatorError)
    async def _error(_req: Request, exc: ReplicatorError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/open")
    async def open_endpoint() -> dict[str, Any]:
        return {"ok": True}

    @app.get("/who")
    async def who(caller: Principal | None = Depends(principal)) -> dict[str, Any]:
        return {"kind": caller.kind, "name": caller.name} if caller is not None else {"kind": None}

    @app.get("/as/{agent_id}")
    async def act_as(agent_id: str, caller: Principal | None = Depends(principal)) -> dict[str, Any]:
        in_scope(caller, agent_id)
        return {"ok": True}

    @app.get("/operator")
    async def operator(caller: Principal | None = Depends(principal)) -> dict[str, Any]:
        operator_only(caller)
        return {"ok": True}

    app.add_middleware(AuthenticationMiddleware, backend=TokenAuthBackend(lambda: tokens))
    return app


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> tuple[AuthStore, str, str]:
    store = AuthStore(tmp_path_factory.mktemp("auth") / "auth")
    _seed, agent_token = store.add_agent("agent-a")
    return store, agent_token, store.add_operator("ops")


def _client(tokens: AuthStore | None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=_app(tokens)), base_url="http://t")


@pytest.fixture
async def client(tokens: tuple[AuthStore, str, str]) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(tokens[0]) as c:
        yield c


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, MISSING_TOKEN),
        ("Bearer ", MISSING_TOKEN),
        ("Basic abc", MISSING_TOKEN),
        ("Bearer not-a-token", UNKNOWN_TOKEN),
    ],
)
async def test_no_valid_token_is_401_only_where_a_principal_is_needed(
    client: httpx.AsyncClient, header: str | None, message: str
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    assert (await client.get("/open", headers=headers)).json() == {"ok": True}
    resp = await client.get("/who", headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {"error": "unauthorized", "message": message}


async def test_agent_token(client: httpx.AsyncClient, tokens: tuple[AuthStore, str, str]) -> None:
    headers = _bearer(tokens[1])
    assert (await client.get("/who", headers=headers)).json() == {"kind": "agent", "name": "agent-a"}
    assert (await client.get("/as/agent-a", headers=headers)).json() == {"ok": True}
    other = await client.get("/as/agent-b", headers=headers)
    assert other.status_code == 403 and other.json()["error"] == "forbidden"
    assert "agent-a" in other.json()["message"] and "agent-b" in other.json()["message"]
    ops = await client.get("/operator", headers=headers)
    assert ops.status_code == 403
    assert ops.json() == {"error": "forbidden", "message": "this endpoint needs an operator token"}


async def test_operator_token(client: httpx.AsyncClient, tokens: tuple[AuthStore, str, str]) -> None:
    headers = _bearer(tokens[2])
    assert (await client.get("/who", headers=headers)).json() == {"kind": "operator", "name": "ops"}
    assert (await client.get("/as/agent-b", headers=headers)).json() == {"ok": True}
    assert (await client.get("/operator", headers=headers)).json() == {"ok": True}


async def test_revoked_token_is_401(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    token = store.add_operator("gone")
    async with _client(store) as client:
        assert (await client.get("/who", headers=_bearer(token))).status_code == 200
        store.revoke("gone")
        resp = await client.get("/who", headers=_bearer(token))
    assert resp.status_code == 401 and resp.json()["message"] == UNKNOWN_TOKEN


async def test_authentication_off_lets_everybody_do_everything() -> None:
    async with _client(None) as client:
        assert (await client.get("/who", headers=_bearer("anything"))).json() == {"kind": None}
        assert (await client.get("/as/agent-b")).json() == {"ok": True}
        assert (await client.get("/operator")).json() == {"ok": True}
