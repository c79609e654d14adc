"""agent_client: local-first SQLite storage for Commander OS agents, replicated via NATS JetStream.

This module is the package's contract: what is in `__all__` is public, everything else is internal
and may change. An agent uses `AgentStorage`, `Migration`, `Visibility` and the errors. The replicator
(the HTPC side) uses only the shared protocol below: the wire format, ids and subjects, SQL names, the
stream and consumer configuration, the connection policy and the read-only query runner.
"""

from .agent_id import AGENT_ID_PATTERN, is_valid_agent_id, validate_agent_id
from .agent_storage import AgentStorage, Transaction
from .backoff import Backoff
from .change_record import (
    INT64_MAX,
    INT64_MIN,
    RECORD_VERSION,
    AgentStatusRecord,
    ChangeRecord,
    InvalidText,
    RelayRecord,
    RelayRow,
    SQLiteValue,
    TableLayout,
    decode_record,
    decode_value,
    decode_values,
    encode_record,
    encode_value,
    msg_id,
    relay_msg_id,
    sqlite_text,
    status_msg_id,
)
from .credentials import read_seed
from .errors import (
    AgentStorageError,
    ConstraintViolation,
    CredentialsError,
    FlushTimeout,
    HTPCUnavailable,
    InvalidAgentId,
    InvalidIdentifier,
    InvalidResyncRequest,
    InvalidRow,
    InvalidVisibility,
    LocalDatabaseError,
    MigrationConflict,
    MigrationFailed,
    MissingPrimaryKey,
    NetworkQueryError,
    QueryError,
    QueryRejected,
    QueryTimeout,
    RecordDecodeError,
    StorageClosed,
    StorageFull,
    TableTooWide,
    UnknownTable,
)
from .identifiers import is_valid_identifier, quote_identifier
from .migration import Migration
from .nats_link import reconnecting_options
from .read_only_query import QueryConnection, QueryResult, run_read_only
from .statements import split_statements, upsert_sql
from .stream import DUPLICATE_WINDOW_S, STREAM_NAME, STREAM_SUBJECTS, consumer_config, ensure_stream
from .subjects import (
    CHANGES_SUBJECTS,
    RELAY_SUBJECTS,
    REPLICATOR_INBOX,
    agent_inbox_prefix,
    changes_subject,
    query_subject,
    relay_subject,
    relay_subject_agent,
    subject_agent,
)
from .visibility import Visibility

__version__ = "0.1.0"

__all__ = [
    "AGENT_ID_PATTERN",
    "CHANGES_SUBJECTS",
    "DUPLICATE_WINDOW_S",
    "INT64_MAX",
    "INT64_MIN",
    "RECORD_VERSION",
    "RELAY_SUBJECTS",
    "REPLICATOR_INBOX",
    "STREAM_NAME",
    "STREAM_SUBJECTS",
    "AgentStatusRecord",
    "AgentStorage",
    "AgentStorageError",
    "Backoff",
    "ChangeRecord",
    "ConstraintViolation",
    "CredentialsError",
    "FlushTimeout",
    "HTPCUnavailable",
    "InvalidAgentId",
    "InvalidIdentifier",
    "InvalidResyncRequest",
    "InvalidRow",
    "InvalidText",
    "InvalidVisibility",
    "LocalDatabaseError",
    "Migration",
    "MigrationConflict",
    "MigrationFailed",
    "MissingPrimaryKey",
    "NetworkQueryError",
    "QueryConnection",
    "QueryError",
    "QueryRejected",
    "QueryResult",
    "QueryTimeout",
    "RecordDecodeError",
    "RelayRecord",
    "RelayRow",
    "SQLiteValue",
    "StorageClosed",
    "StorageFull",
    "TableLayout",
    "TableTooWide",
    "Transaction",
    "UnknownTable",
    "Visibility",
    "agent_inbox_prefix",
    "changes_subject",
    "consumer_config",
    "decode_record",
    "decode_value",
    "decode_values",
    "encode_record",
    "encode_value",
    "ensure_stream",
    "is_valid_agent_id",
    "is_valid_identifier",
    "msg_id",
    "query_subject",
    "quote_identifier",
    "read_seed",
    "reconnecting_options",
    "relay_msg_id",
    "relay_subject",
    "relay_subject_agent",
    "run_read_only",
    "split_statements",
    "sqlite_text",
    "status_msg_id",
    "subject_agent",
    "upsert_sql",
    "validate_agent_id",
]
