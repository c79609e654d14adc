"""replicator: the HTPC service — consumes agents' change records and serves the relay API."""

from .central_store import AgentReplica, CentralStore, Outcome
from .consumer import Consumer, ConsumerStats
from .dead_letters import DeadLetterStore
from .embedded_nats import EmbeddedNats, nats_server_binary
from .errors import (
    AgentOffline,
    BadRequest,
    EmbeddedNatsFailed,
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    NotYetReplicated,
    PayloadTooLarge,
    RecordRejected,
    ReplicatorError,
    UnknownAgent,
)
from .query_engine import QueryEngine, table_references
from .service import ReplicatorService
from .settings import Settings

__all__ = [
    "AgentOffline",
    "AgentReplica",
    "BadRequest",
    "CentralStore",
    "Consumer",
    "ConsumerStats",
    "DeadLetterStore",
    "EmbeddedNats",
    "EmbeddedNatsFailed",
    "InvalidAgent",
    "InvalidName",
    "InvalidValue",
    "NatsUnavailable",
    "NotYetReplicated",
    "Outcome",
    "PayloadTooLarge",
    "QueryEngine",
    "RecordRejected",
    "ReplicatorError",
    "ReplicatorService",
    "Settings",
    "UnknownAgent",
    "nats_server_binary",
    "table_references",
]
