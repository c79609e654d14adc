"""replicator: the HTPC service — consumes agents' change records and serves the relay API.

This module is the package's contract: what is in `__all__` is public, every
other module is internal and may change. Run the service with the `replicator`
command (`main`), or embed it: `ReplicatorService(Settings(...))`, `await
service.start()`, then serve `create_app(service)` with any ASGI server.
`ReplicatorService` and `create_app` are imported on first use, so the
command line's small commands do not load NATS and the web stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .cli import main
from .errors import (
    AgentOffline,
    BadRequest,
    EmbeddedNatsFailed,
    Forbidden,
    InvalidAgent,
    InvalidName,
    InvalidValue,
    NatsUnavailable,
    NotYetReplicated,
    PayloadTooLarge,
    RecordRejected,
    ReplicatorError,
    StreamMisconfigured,
    TableOwnedByAgent,
    Unauthorized,
    UnknownAgent,
)
from .settings import Settings

if TYPE_CHECKING:
    from .relay_api import create_app
    from .service import ReplicatorService

_LAZY = {"ReplicatorService": ".service", "create_app": ".relay_api"}

__all__ = [
    "AgentOffline",
    "BadRequest",
    "EmbeddedNatsFailed",
    "Forbidden",
    "InvalidAgent",
    "InvalidName",
    "InvalidValue",
    "NatsUnavailable",
    "NotYetReplicated",
    "PayloadTooLarge",
    "RecordRejected",
    "ReplicatorError",
    "ReplicatorService",
    "Settings",
    "StreamMisconfigured",
    "TableOwnedByAgent",
    "Unauthorized",
    "UnknownAgent",
    "__version__",
    "create_app",
    "main",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
