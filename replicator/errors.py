"""Named errors of the HTPC service. Each API-facing one carries a stable `code` and HTTP status."""

from __future__ import annotations

from typing import Any


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The relay API's JSON error shape: `{"error": code, "message": text, ...}`."""
    return {"error": code, "message": message, **extra}


class ReplicatorError(Exception):
    """Base class; `code` is the stable machine-readable error code the relay API returns."""

    code = "replicator_error"
    status = 500
    retry_after: int | None = None  # seconds, sent as the Retry-After header when set

    def body(self) -> dict[str, Any]:
        return error_body(self.code, str(self))

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class BadRequest(ReplicatorError):
    code = "invalid_request"
    status = 400


class InvalidAgent(BadRequest):
    code = "invalid_agent_id"


class InvalidName(BadRequest):
    code = "invalid_identifier"


class InvalidValue(BadRequest):
    code = "invalid_value"


class PayloadTooLarge(ReplicatorError):
    code = "payload_too_large"
    status = 413


class TooManyQueries(ReplicatorError):
    """The caller already runs as many queries as one principal may (`query_max_concurrent`)."""

    code = "too_many_queries"
    status = 429

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnknownAgent(ReplicatorError):
    code = "unknown_agent"
    status = 404


class NatsUnavailable(ReplicatorError):
    code = "nats_unavailable"
    status = 503


class AgentOffline(ReplicatorError):
    """An on_demand query's agent did not answer over NATS."""

    code = "agent_offline"
    status = 503


class NotYetReplicated(ReplicatorError):
    """Read-your-writes: the agent's changes up to min_seq were not applied within the timeout."""

    code = "not_yet_replicated"
    status = 504


class RecordRejected(ReplicatorError):
    """A record cannot be applied (schema mismatch, bad value, constraint); it goes to the dead-letter store."""

    code = "record_rejected"
    status = 422


class EmbeddedNatsFailed(ReplicatorError):
    """The embedded nats-server could not be started."""

    code = "embedded_nats_failed"


class Unauthorized(ReplicatorError):
    """No bearer token, or one nobody issued."""

    code = "unauthorized"
    status = 401


class Forbidden(ReplicatorError):
    """A valid token used outside its scope (another agent's id, an operator-only endpoint)."""

    code = "forbidden"
    status = 403


class TableOwnedByAgent(ReplicatorError):
    """A relay write aimed at a table the agent replicates (or keeps on_demand) from its own database."""

    code = "table_owned_by_agent"
    status = 409


class StreamMisconfigured(ReplicatorError):
    """AGENT_CHANGES exists with settings the replicator cannot work with or fix."""

    code = "stream_misconfigured"


class StreamNotFound(ReplicatorError):
    """There is no AGENT_CHANGES stream on the NATS server or cluster (`replicator stream create` makes it)."""

    code = "stream_not_found"
    status = 404


class DeadLetterNotFound(ReplicatorError):
    """No dead letter with that id (never stored, retried, discarded or pruned)."""

    code = "dead_letter_not_found"
    status = 404


class DeadLetterNotRetryable(ReplicatorError):
    """A dead letter that cannot be applied again as it is (its payload was cut and it left the stream)."""

    code = "dead_letter_not_retryable"
    status = 409


class SnapshotFailed(ReplicatorError):
    """A snapshot, backup or restore could not be made (disk, a missing or inconsistent file)."""

    code = "snapshot_failed"


class InvalidOffset(BadRequest):
    """A change feed offset that is not `<16 hex digits>_<number>`."""

    code = "invalid_offset"


class UnknownTable(ReplicatorError):
    """A table the HTPC never applied for that agent (private tables are never known centrally)."""

    code = "unknown_table"
    status = 404


class TableNotVisible(ReplicatorError):
    """An on_demand table: its rows stay with the agent, so there is no central feed of it."""

    code = "table_not_visible"
    status = 403


class TooManySubscribers(ReplicatorError):
    """As many live change feed subscribers as `--feed-max-subscribers` are open already."""

    code = "too_many_subscribers"
    status = 503

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FeedUnavailable(ReplicatorError):
    """The change feed could not be read (the central file is being replaced, a disk error)."""

    code = "feed_unavailable"
    status = 503
    retry_after = 1
