"""Who may do what: per-agent NATS credentials and relay API tokens.

NATS: every agent gets its own nkey (an ed25519 key pair). nkeys rather than
user/password because the server config then holds only public keys: nothing
in it is a secret, and a leaked config cannot be replayed. An agent may
publish only to `agents.<id>.changes`, subscribe only to `agents.<id>.query`
and to its own inbox prefix `_INBOX_<id>` (so it cannot read other agents'
replies), and answer requests it received (`allow_responses`). The
replicator's own key may use only the JetStream API subjects of
`AGENT_CHANGES`, the agents' subjects, and its own inbox.

HTTP: bearer tokens, 32 random bytes each, stored as SHA-256 digests (they are
high-entropy, so a fast hash is enough). A request's token is hashed and its
digest looked up in an index of the stored digests (one dict lookup, whatever
the number of agents), then confirmed with `hmac.compare_digest`. The lookup's
timing depends only on the digest of what the caller sent, never on a stored
token it does not know: finding a stored digest from it would need a SHA-256
preimage. The index holds nothing but what auth.json holds, and it is rebuilt
after every change (`reload`, `save`, every method that changes `data`), so a
revoked token stops working at the same moment as before.

Everything lives in `<data_dir>/auth/`: `auth.json` (public keys, token
digests, sharing rules; mode 0600), `replicator.nk` (the replicator's seed)
and `agents/<id>.nk` (seeds to hand to agents).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.authentication import BaseUser

from agent_client import (
    CHANGES_SUBJECTS,
    RELAY_SUBJECTS,
    REPLICATOR_INBOX,
    STREAM_NAME,
    agent_inbox_prefix,
    changes_subject,
    query_subject,
    validate_agent_id,
)

from .errors import ReplicatorError


class AuthError(ReplicatorError):
    code = "auth_error"
    status = 400


@dataclass(frozen=True)
class Principal(BaseUser):
    """Whoever presented a valid token: an agent (scoped to its id) or an operator (everything)."""

    kind: str  # "agent" | "operator"
    name: str

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.name

    @property
    def identity(self) -> str:
        return f"{self.kind}:{self.name}"


def _new_user_seed() -> tuple[str, str]:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def _new_token() -> str:
    """32 random bytes, URL-safe; never starting with '-', so `--token VALUE` parses on any command line."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


class AuthStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "auth.json"
        self.nats_conf_path = root / "nats-authorization.conf"
        self.data: dict[str, Any] = {"replicator": None, "agents": {}, "operators": {}}
        self.mtime = 0.0
        self._index: dict[str, tuple[str, Principal, dict[str, Any]]] | None = None  # see _build_index; None: stale
        self.reload()

    def reload(self) -> bool:
        """Re-read auth.json if it changed (another `replicator auth` process). Returns True if it did."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return False
        if mtime == self.mtime:
            return False
        self.data = json.loads(self.path.read_text())
        self._index = None
        self.mtime = mtime
        return True

    @property
    def initialized(self) -> bool:
        return bool(self.data.get("replicator"))

    def save(self) -> None:
        self._index = None
        _write_secret(self.path, json.dumps(self.data, indent=2, sort_keys=True))
        _write_secret(self.nats_conf_path, self.nats_authorization_conf())
        self.mtime = self.path.stat().st_mtime

    def init(self) -> str:
        """Create the replicator's key (idempotent). Returns the path of its seed file."""
        seed_file = self.replicator_seed_file()
        if not self.initialized:
            seed, public = _new_user_seed()
            _write_secret(seed_file, seed + "\n")
            self.data["replicator"] = {"nkey": public}
            self.save()
        return str(seed_file)

    def replicator_seed_file(self) -> Path:
        return self.root / "replicator.nk"

    def agent_seed_file(self, agent_id: str) -> Path:
        """Where `add_agent` leaves the agent's nkey seed (to hand to the agent)."""
        return self.root / "agents" / f"{agent_id}.nk"

    def add_agent(self, agent_id: str, *, on_demand_readers: list[str] | None = None) -> tuple[str, str]:
        """New credentials for an agent (replacing old ones): (nkey seed, API token)."""
        validate_agent_id(agent_id)
        for reader in on_demand_readers or []:
            validate_agent_id(reader)
        if not self.initialized:
            self.init()
        seed, public = _new_user_seed()
        token = _new_token()
        self._index = None
        self.data["agents"][agent_id] = {
            "nkey": public,
            "token_sha256": token_digest(token),
            "on_demand_readers": sorted(set(on_demand_readers or [])),
        }
        _write_secret(self.agent_seed_file(agent_id), seed + "\n")
        self.save()
        return seed, token

    def set_on_demand_readers(self, agent_id: str, readers: list[str]) -> None:
        entry = self.data["agents"].get(agent_id)
        if entry is None:
            raise AuthError(f"no credentials for agent {agent_id!r}")
        entry["on_demand_readers"] = sorted({validate_agent_id(r) for r in readers})
        self.save()

    def add_operator(self, name: str) -> str:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise AuthError(f"invalid operator name {name!r}")
        token = _new_token()
        self._index = None
        self.data["operators"][name] = {"token_sha256": token_digest(token)}
        self.save()
        return token

    def revoke(self, name: str) -> bool:
        self._index = None
        removed = self.data["agents"].pop(name, None) or self.data["operators"].pop(name, None)
        if removed:
            self.save()
        return removed is not None

    def authenticate(self, token: str | None) -> Principal | None:
        """The principal holding `token`, or None: one hash and one lookup (see the module docstring).

        A hit is confirmed against `data` itself (the entry is still the one stored, with this digest), so a
        token removed from `data` by any means fails at once even if the index were not rebuilt yet.
        """
        if not token:
            return None
        digest = token_digest(token)
        index = self._index if self._index is not None else self._build_index()
        hit = index.get(digest)
        if hit is None:
            return None
        kind, who, entry = hit
        stored = entry.get("token_sha256")
        if self.data[kind].get(who.name) is not entry or not isinstance(stored, str):
            return None
        return who if hmac.compare_digest(digest, stored) else None

    def _build_index(self) -> dict[str, tuple[str, Principal, dict[str, Any]]]:
        """Every stored digest -> (where, principal, its entry); an operator wins over an agent with the same
        digest, as the full scan did (operators last)."""
        index: dict[str, tuple[str, Principal, dict[str, Any]]] = {}
        for kind in ("agents", "operators"):
            for name, entry in self.data[kind].items():
                digest = entry.get("token_sha256")
                if isinstance(digest, str):
                    index[digest] = (kind, Principal(kind.removesuffix("s"), name), entry)
        self._index = index
        return index

    def may_read_on_demand(self, reader: str, owner: str) -> bool:
        entry = self.data["agents"].get(owner) or {}
        return reader == owner or reader in entry.get("on_demand_readers", [])

    def nats_authorization_conf(self) -> str:
        """The nats-server `authorization` block for every known key."""
        users: list[str] = []
        rep = self.data.get("replicator")
        if rep:
            js = f"$JS.API.{{}}.{STREAM_NAME}"
            allow_pub = [
                "$JS.API.INFO",
                js.format("STREAM.INFO"),
                js.format("STREAM.CREATE"),
                js.format("STREAM.UPDATE"),
                js.format("STREAM.MSG.GET"),  # records remembered ahead of their turn are read back by sequence
                js.format("CONSUMER.INFO") + ".>",
                js.format("CONSUMER.CREATE") + ".>",
                js.format("CONSUMER.DURABLE.CREATE") + ".>",
                js.format("CONSUMER.DELETE") + ".>",
                js.format("CONSUMER.MSG.NEXT") + ".>",
                f"$JS.ACK.{STREAM_NAME}.>",
                CHANGES_SUBJECTS,
                RELAY_SUBJECTS,
                query_subject("*"),
            ]
            users.append(_user(rep["nkey"], allow_pub, [f"{REPLICATOR_INBOX}.>"], responses=False))
        for agent_id, entry in sorted(self.data["agents"].items()):
            users.append(
                _user(
                    entry["nkey"],
                    [changes_subject(agent_id), "$JS.API.INFO", f"$JS.API.STREAM.INFO.{STREAM_NAME}"],
                    [query_subject(agent_id), f"{agent_inbox_prefix(agent_id)}.>"],
                    responses=True,
                )
            )
        body = ",\n".join(users)
        return f"# generated by `replicator auth`; do not edit\nauthorization {{\n  users = [\n{body}\n  ]\n}}\n"


def _user(nkey: str, publish: list[str], subscribe: list[str], *, responses: bool) -> str:
    pub = ", ".join(json.dumps(s) for s in publish)
    sub = ", ".join(json.dumps(s) for s in subscribe)
    extra = ", allow_responses: true" if responses else ""
    return (
        f'    {{ nkey: "{nkey}", permissions: {{ publish: {{ allow: [{pub}] }}, '
        f"subscribe: {{ allow: [{sub}] }}{extra} }} }}"
    )
