"""Writes from HTTP-only agents: validate the rows, encode a relay record, publish it to JetStream.

A relay write is answered once JetStream has stored it (the stream sequence
goes back to the caller); the consumer applies it like any change record.
Everything that can be refused is refused here, before publishing, so bad
input is a 4xx and never a dead letter: names (SQLite compares names without
case, so an existing table or column must be named as it is), the column count (SQLite's 2000-column limit, counting the
columns the table already has), a row without its table's primary key, and the encoded record's size (the stream's
`max_record_bytes`). Rows are checked against the central schema (the store's latest view), against the
rows before them in the same request, and against tables that writes already published will create (kept
`PENDING_TABLE_TTL_S`, until the view shows them): the first row of a table decides its primary key.

Which agent a write belongs to when it names none is `attribute`'s rule (README: batch attribution).

Its message ids are keyed with the HTPC's secret (agent_client.relay_msg_id):
the same Idempotency-Key of the same agent is deduplicated by JetStream, and
no agent can compute the id of a write it has not made, so it cannot make
a later write look like a duplicate by publishing that id first.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_client import (
    AGENT_ID_PATTERN,
    RECORD_VERSION,
    RelayRecord,
    RelayRow,
    encode_record,
    is_valid_agent_id,
    relay_msg_id,
    relay_subject,
)

from .auth import Principal
from .errors import (
    BadRequest,
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    PayloadTooLarge,
    RecordRejected,
    TableOwnedByAgent,
)
from .relay_row import InvalidRelayName, TooManyColumns, check_relay_columns, relay_row
from .store_view import StoreView, TableView

log = logging.getLogger("replicator.relay")

PUBLISH_TIMEOUT_S = 5.0
#: JetStream's error code for "message size exceeds maximum allowed" (the stream's max_msg_size).
_JS_MESSAGE_TOO_LARGE = 10054
#: What the message's headers (its Nats-Msg-Id) take of the stream's max_msg_size, which counts them too.
HEADER_ALLOWANCE_BYTES = 256
#: The agent of a relay write that names none, when no `--default-agent-id` is configured.
BUILT_IN_DEFAULT_AGENT = "relay-default"
#: How long a table a published write will create is remembered before the central view shows it.
PENDING_TABLE_TTL_S = 300.0
#: At most this many such tables are remembered (the oldest forgotten first).
PENDING_TABLES_MAX = 10_000


class RecordTooLarge(PayloadTooLarge):
    """The encoded relay record is larger than one message of the stream may be (`max_record_bytes`)."""

    code = "record_too_large"


class MissingPrimaryKey(BadRequest):
    """A relay row lacks a column of its table's primary key (the central store would dead-letter it)."""

    code = "missing_primary_key"


@dataclass(frozen=True)
class Attribution:
    """The agent of relay rows that name none, and what said so."""

    agent_id: str
    by: str  # "X-Agent-Id header", "token", "--default-agent-id" or "built-in default"


def attribute(header: str | None, who: Principal | None, configured: str | None) -> Attribution:
    """The agent of relay rows without an `agent_id`: the `X-Agent-Id` header, else the agent token's agent,
    else `--default-agent-id`, else BUILT_IN_DEFAULT_AGENT. Never None: a write is never dropped for want of
    an agent (the guide's `batch_write` names none and never reads the answer)."""
    if header is not None:
        if not is_valid_agent_id(header):
            raise InvalidAgent(f"invalid X-Agent-Id {header!r}: must match {AGENT_ID_PATTERN}")
        return Attribution(header, "X-Agent-Id header")
    if who is not None and not who.is_operator:
        return Attribution(who.name, "token")
    if configured is not None:
        return Attribution(configured, "--default-agent-id")
    return Attribution(BUILT_IN_DEFAULT_AGENT, "built-in default")


#: Tables as a request's rows leave them, by lower-cased name (one agent's): see RelayWriter.check.
Planned = dict[str, TableView]


class RelayWriter:
    """The relay's JetStream producer.

    `view()` is the central store's latest snapshot (None before the store is open), `link()` the
    NATS connection and its JetStream context (None while not started). `max_record_bytes` bounds one
    message of the stream, headers included (None: no bound here; the stream's own bound still gives a
    413). `secret()` gives the HTPC's message id secret (`DataDir.relay_id_secret`), asked once, at the
    first publish; without it the writer keys ids with a random secret of its own, so an Idempotency-Key
    is honoured only while this process lives.
    """

    def __init__(
        self,
        view: Callable[[], StoreView | None],
        link: Callable[[], tuple[NATS | None, JetStreamContext | None]],
        *,
        max_record_bytes: int | None = None,
        secret: Callable[[], bytes] | None = None,
    ) -> None:
        self._view = view
        self._link = link
        self.max_record_bytes = max_record_bytes
        self._secret_source = secret
        self._secret: bytes | None = None
        self._pending: dict[tuple[str, str], tuple[float, TableView]] = {}  # (agent, lower name) -> (expiry, table)
        self.published = 0

    def check(self, agent_id: str, table: str, data: Mapping[str, Any], planned: Planned | None = None) -> None:
        """Refuse a row the central store would dead-letter, or one aimed at a table the agent replicates.

        `planned` (one agent's) carries the tables as the request's earlier rows leave them; this row's
        effect is added to it. Without it, the row is checked alone.
        """
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}: must match {AGENT_ID_PATTERN}")
        try:
            relay_row(table, data)
        except InvalidRelayName as exc:
            raise InvalidName(str(exc)) from None
        except TooManyColumns:
            raise
        except RecordRejected as exc:
            raise InvalidValue(str(exc)) from None
        key = table.lower()
        existing = planned[key] if planned is not None and key in planned else self._known(agent_id, table)
        if existing is None:
            columns = tuple(data)
            after = TableView(
                table, "relay", "always", columns, ("",) * len(columns), ("id",) if "id" in data else (), None
            )
        else:
            after = _checked_against(agent_id, table, data, existing)
        if planned is not None:
            planned[key] = after

    def expect(self, agent_id: str, planned: Planned) -> None:
        """Remember the tables a just-published record will create, until the central view shows them."""
        view = self._view()
        now = time.monotonic()
        self._pending = {k: v for k, v in self._pending.items() if v[0] > now}
        for key, table in planned.items():
            if table.source == "relay" and (view is None or _table(view, agent_id, table.name) is None):
                self._pending.pop((agent_id, key), None)
                self._pending[(agent_id, key)] = (now + PENDING_TABLE_TTL_S, table)
        while len(self._pending) > PENDING_TABLES_MAX:
            del self._pending[next(iter(self._pending))]

    def _known(self, agent_id: str, table: str) -> TableView | None:
        """The agent's table as the central view has it, else as a published write will create it."""
        view = self._view()
        found = _table(view, agent_id, table) if view is not None else None
        if found is not None:
            self._pending.pop((agent_id, table.lower()), None)
            return found
        pending = self._pending.get((agent_id, table.lower()))
        if pending is None:
            return None
        if pending[0] <= time.monotonic():
            del self._pending[(agent_id, table.lower())]
            return None
        return pending[1]

    def encode(self, agent_id: str, rows: list[RelayRow], timestamp: float | None = None) -> bytes:
        """The relay record of `rows`; refused (RecordTooLarge, 413) if it would exceed `max_record_bytes`."""
        record = RelayRecord(v=RECORD_VERSION, kind="relay", agent_id=agent_id, timestamp=timestamp, rows=rows)
        try:
            payload = encode_record(record)
        except TypeError as exc:  # orjson: nesting too deep once wrapped in the record, or unencodable text
            raise InvalidValue(f"the row cannot be encoded as a change record: {exc}") from None
        limit = None if self.max_record_bytes is None else self.max_record_bytes - HEADER_ALLOWANCE_BYTES
        if limit is not None and len(payload) > limit:
            raise RecordTooLarge(
                f"the encoded record for {agent_id} is {len(payload)} bytes; one record may be at most {limit} "
                f"bytes (--max-record-bytes {self.max_record_bytes}, less {HEADER_ALLOWANCE_BYTES} for its headers)"
            )
        return payload

    def msg_id(self, agent_id: str, key: str) -> str:
        """The `Nats-Msg-Id` of agent `agent_id`'s write with Idempotency-Key `key`."""
        if self._secret is None:
            self._secret = self._secret_source() if self._secret_source is not None else secrets.token_bytes(32)
        return relay_msg_id(agent_id, key, secret=self._secret)

    async def publish(self, agent_id: str, payload: bytes, key: str) -> dict[str, Any]:
        """Publish one encoded record (deduplicated by JetStream on `key`); returns where it was stored."""
        nc, js = self._link()
        if js is None or nc is None or not nc.is_connected:
            raise NatsUnavailable("the HTPC is not connected to NATS; retry later")
        headers = {"Nats-Msg-Id": self.msg_id(agent_id, key)}
        try:
            ack = await js.publish(relay_subject(agent_id), payload, timeout=PUBLISH_TIMEOUT_S, headers=headers)
        except nats.errors.MaxPayloadError as exc:  # retrying cannot help: not a 503
            raise PayloadTooLarge(f"the encoded record ({len(payload)} bytes) exceeds the NATS max_payload") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == _JS_MESSAGE_TOO_LARGE:  # the stream's max_msg_size: retrying cannot help either
                raise RecordTooLarge(f"JetStream refused the record ({len(payload)} bytes): {exc.description}") from exc
            raise NatsUnavailable(f"JetStream did not store the write: {exc!r}") from exc
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise NatsUnavailable(f"JetStream did not store the write: {exc!r}") from exc
        self.published += 1
        return {"agent_id": agent_id, "stream": ack.stream, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)}


def _checked_against(agent_id: str, table: str, data: Mapping[str, Any], existing: TableView) -> TableView:
    """`existing` once the row is written (new columns added); refuses what the central store would refuse."""
    if existing.source == "agent":
        raise TableOwnedByAgent(
            f"{agent_id}.{table} is {existing.visibility} on the agent's own database; "
            "write it there (the relay would race its replication)"
        )
    if existing.name != table:
        raise InvalidName(f"table {table!r} of {agent_id} is named {existing.name!r}: use that name")
    try:
        missing = check_relay_columns(table, existing.columns, data)
    except InvalidRelayName as exc:
        raise InvalidName(str(exc)) from None
    lacking = [c for c in existing.pk if c not in data]
    if lacking:
        raise MissingPrimaryKey(
            f"row for {agent_id}.{table} lacks its primary key {list(existing.pk)} (missing {lacking}): "
            f"the table's first row had {existing.pk[0]!r}, so every row must"
        )
    if not missing:
        return existing
    return replace(existing, columns=existing.columns + tuple(missing), types=existing.types + ("",) * len(missing))


def _table(view: StoreView, agent_id: str, table: str) -> TableView | None:
    """The agent's central table named `table` as SQLite resolves names (any case)."""
    found = view.table(agent_id, table)
    if found is not None:
        return found
    agent = view.agent(agent_id)
    if agent is None:
        return None
    folded = table.lower()
    return next((t for name, t in agent.tables.items() if name.lower() == folded), None)
