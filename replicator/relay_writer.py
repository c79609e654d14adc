"""Writes from HTTP-only agents: validate the rows, encode a relay record, publish it to JetStream.

A relay write is answered once JetStream has stored it (the stream sequence
goes back to the caller); the consumer applies it like any change record.
Everything that can be refused is refused here, before publishing, so bad
input is a 4xx and never a dead letter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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

from .errors import (
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    PayloadTooLarge,
    RecordRejected,
    TableOwnedByAgent,
)
from .relay_row import InvalidRelayName, relay_row
from .store_view import StoreView

PUBLISH_TIMEOUT_S = 5.0


class RelayWriter:
    """The relay's JetStream producer.

    `view()` is the central store's latest snapshot (None before the store is open), `link()` the
    NATS connection and its JetStream context (None while not started).
    """

    def __init__(
        self,
        view: Callable[[], StoreView | None],
        link: Callable[[], tuple[NATS | None, JetStreamContext | None]],
    ) -> None:
        self._view = view
        self._link = link
        self.published = 0

    def check(self, agent_id: str, table: str, data: Mapping[str, Any]) -> None:
        """Refuse a row the central store would dead-letter, or one aimed at a table the agent replicates."""
        if not is_valid_agent_id(agent_id):
            raise InvalidAgent(f"invalid agent id {agent_id!r}: must match {AGENT_ID_PATTERN}")
        try:
            relay_row(table, data)
        except InvalidRelayName as exc:
            raise InvalidName(str(exc)) from None
        except RecordRejected as exc:
            raise InvalidValue(str(exc)) from None
        view = self._view()
        owned = view.table(agent_id, table) if view is not None else None
        if owned is not None and owned.source == "agent":
            raise TableOwnedByAgent(
                f"{agent_id}.{table} is {owned.visibility} on the agent's own database; "
                "write it there (the relay would race its replication)"
            )

    @staticmethod
    def encode(agent_id: str, rows: list[RelayRow], timestamp: float | None = None) -> bytes:
        record = RelayRecord(v=RECORD_VERSION, kind="relay", agent_id=agent_id, timestamp=timestamp, rows=rows)
        try:
            return encode_record(record)
        except TypeError as exc:  # orjson: nesting too deep once wrapped in the record, or unencodable text
            raise InvalidValue(f"the row cannot be encoded as a change record: {exc}") from None

    async def publish(self, agent_id: str, payload: bytes, key: str) -> dict[str, Any]:
        """Publish one encoded record (deduplicated by JetStream on `key`); returns where it was stored."""
        nc, js = self._link()
        if js is None or nc is None or not nc.is_connected:
            raise NatsUnavailable("the HTPC is not connected to NATS; retry later")
        try:
            ack = await js.publish(
                relay_subject(agent_id),
                payload,
                timeout=PUBLISH_TIMEOUT_S,
                headers={"Nats-Msg-Id": relay_msg_id(agent_id, key)},
            )
        except nats.errors.MaxPayloadError as exc:  # retrying cannot help: not a 503
            raise PayloadTooLarge(f"the encoded record ({len(payload)} bytes) exceeds the NATS max_payload") from exc
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            raise NatsUnavailable(f"JetStream did not store the write: {exc!r}") from exc
        self.published += 1
        return {"agent_id": agent_id, "stream": ack.stream, "stream_seq": ack.seq, "duplicate": bool(ack.duplicate)}
