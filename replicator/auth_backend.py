"""Who is calling the relay API: a starlette authentication backend over the `replicator auth` tokens.

`TokenAuthBackend` runs for every request (installed with starlette's
`AuthenticationMiddleware`) and never refuses one by itself: endpoints that
need no principal (`/health`, `/ready`, `/relay/info`, the docs) answer even
with a bad token. It sets `request.user` to

* a `Principal` (agent or operator) for a valid bearer token,
* `Rejected` (with the reason) for a missing, malformed or unknown one,
* starlette's `UnauthenticatedUser` when authentication is off.

Endpoints that need a principal depend on `principal`, which turns `Rejected`
into 401 `unauthorized`; `in_scope` and `operator_only` are the 403 `forbidden`
scope checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from starlette.authentication import AuthCredentials, AuthenticationBackend, UnauthenticatedUser
from starlette.requests import HTTPConnection

from .auth import Principal
from .errors import Forbidden, Unauthorized

MISSING_TOKEN = "missing bearer token: send `Authorization: Bearer <token>` (see `replicator auth`)"
UNKNOWN_TOKEN = "unknown or revoked token"


class TokenStore(Protocol):
    def authenticate(self, token: str | None) -> Principal | None: ...


class Rejected(UnauthenticatedUser):
    """A request whose token did not identify anybody (authentication is on)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class TokenAuthBackend(AuthenticationBackend):
    """Bearer tokens checked against `tokens()`; `tokens()` returning None means authentication is off."""

    def __init__(self, tokens: Callable[[], TokenStore | None]) -> None:
        self._tokens = tokens

    async def authenticate(
        self, conn: HTTPConnection
    ) -> tuple[AuthCredentials, UnauthenticatedUser | Principal] | None:
        store = self._tokens()
        if store is None:
            return None  # authentication off: starlette's UnauthenticatedUser, and every endpoint is open
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return AuthCredentials(), Rejected(MISSING_TOKEN)
        who = store.authenticate(token.strip())
        if who is None:
            return AuthCredentials(), Rejected(UNKNOWN_TOKEN)
        return AuthCredentials(["authenticated", who.kind]), who


async def principal(conn: HTTPConnection) -> Principal | None:
    """FastAPI dependency: the caller, None when authentication is off; 401 without a valid token.

    A coroutine on purpose: FastAPI runs a plain function dependency in its thread pool, a hop (two thread
    switches) per request for what is one attribute read.
    """
    user = conn.user
    if isinstance(user, Rejected):
        raise Unauthorized(user.reason)
    return user if isinstance(user, Principal) else None


def in_scope(who: Principal | None, agent_id: str) -> None:
    """An agent's token acts only as that agent; operators (and everybody, with authentication off) as any."""
    if who is not None and not who.is_operator and who.name != agent_id:
        raise Forbidden(f"the token of agent {who.name!r} cannot act as agent {agent_id!r}")


def operator_only(who: Principal | None) -> None:
    if who is not None and not who.is_operator:
        raise Forbidden("this endpoint needs an operator token")
