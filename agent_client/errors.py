"""Named errors raised by agent_client.

Every failure an agent can cause or meet has its own class, so callers can
catch exactly what they mean to handle. All derive from `AgentStorageError`.
"""

from __future__ import annotations


class AgentStorageError(Exception):
    """Base class of every error agent_client raises on purpose."""


class InvalidAgentId(AgentStorageError, ValueError):
    """The agent id is not `[a-z0-9][a-z0-9_-]{0,63}` (it must be a NATS token and a file name)."""


class InvalidIdentifier(AgentStorageError, ValueError):
    """A table or column name that cannot be replicated safely."""


class UnknownTable(AgentStorageError, LookupError):
    """The named table does not exist in the agent's database."""


class InvalidVisibility(AgentStorageError, ValueError):
    """Visibility must be one of `always`, `on_demand`, `private`."""


class MissingPrimaryKey(AgentStorageError, ValueError):
    """An `always` table needs a primary key: replicas address rows by it."""


class TableTooWide(AgentStorageError, ValueError):
    """The table has more columns than the change log can carry."""


class InvalidRow(AgentStorageError, ValueError):
    """A row given to write_data/batch_write has bad types or unknown columns."""


class MigrationConflict(AgentStorageError):
    """A migration already applied under this version now has different SQL."""


class MigrationFailed(AgentStorageError):
    """A migration's SQL failed; nothing of that migration was applied."""


class StorageClosed(AgentStorageError, RuntimeError):
    """The storage was closed; open a new AgentStorage."""


class StorageFull(AgentStorageError, OSError):
    """The local disk (or the database's page limit) is full; the write was rolled back."""


class FlushTimeout(AgentStorageError, TimeoutError):
    """flush() gave up before JetStream acknowledged every local change."""


class NetworkQueryError(AgentStorageError):
    """The HTPC refused or could not answer a network query."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HTPCUnavailable(NetworkQueryError):
    """The HTPC could not be reached."""


class RecordDecodeError(AgentStorageError, ValueError):
    """A change record on the wire could not be decoded (bad JSON, unknown version, bad shape)."""


class ConstraintViolation(AgentStorageError, ValueError):
    """The write broke a constraint of the agent's schema (UNIQUE, NOT NULL, CHECK, FOREIGN KEY)."""


class LocalDatabaseError(AgentStorageError):
    """The local SQLite database failed in a way that is not the caller's input (I/O, corruption, lock)."""


class QueryError(AgentStorageError):
    """A read-only query was refused or failed. `code` is the stable error code the relay API returns."""

    code = "invalid_query"


class QueryRejected(QueryError):
    """The query tried something a read-only query may not do (write, ATTACH, PRAGMA, extension, private table)."""

    code = "query_not_allowed"


class QueryTimeout(QueryError, TimeoutError):
    """The query ran past its time bound and was interrupted."""

    code = "query_timeout"


class InvalidResyncRequest(AgentStorageError, ValueError):
    """A resync request the agent cannot serve as asked (its request_id is not 32 lowercase hex)."""


class CredentialsError(AgentStorageError):
    """The agent's NATS or HTPC credentials could not be read."""


class FeedError(AgentStorageError):
    """The HTPC refused a change feed request, or the feed cannot be reached as configured.

    `status` is the HTTP status (None when no request was made, e.g. no `htpc_url`) and `code` the relay API's
    stable error code (`table_not_visible`, `unknown_table`, `unknown_agent`, `invalid_agent_id`, ...).
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class FollowError(AgentStorageError):
    """A follow() or unfollow() the agent cannot do (itself, too many followed agents, no htpc_url, a bad name)."""
