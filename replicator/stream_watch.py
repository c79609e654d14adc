"""What the stream holds, read from JetStream every few seconds: the truth health and lag are measured against.

SKELETON (issue 10): filled in by the health work. `StreamWatch.facts` is an
immutable `StreamFacts`, replaced as a whole by the watch task on the event
loop; readers (status, metrics) only ever read the attribute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nats.js import JetStreamContext


@dataclass(frozen=True)
class PublishedPosition:
    """The newest change record of one agent in the stream (its last message on `agents.<id>.changes`)."""

    epoch: str | None
    last_seq: int  # the record's last change sequence
    stream_seq: int  # where it is in the stream
    at: float | None  # when the agent committed it (the record's committed_at)


@dataclass(frozen=True)
class StreamFacts:
    updated_at: float | None = None  # wall time of the last successful read (None: never read)
    error: str | None = None  # why the last read failed, or None
    first_seq: int = 0
    last_seq: int = 0
    messages: int = 0
    bytes: int = 0
    consumer_pending: int | None = None  # messages not yet delivered to the durable consumer
    consumer_ack_pending: int | None = None  # delivered, not yet acknowledged
    ack_floor: int | None = None  # every stream message up to this one is acknowledged
    published: Mapping[str, PublishedPosition] = field(default_factory=lambda: MappingProxyType({}))


class StreamWatch:
    def __init__(
        self,
        js: Callable[[], JetStreamContext | None],
        durable: str,
        agents: Callable[[], Iterable[str]],
        *,
        interval: float = 5.0,
    ) -> None:
        self._js = js
        self.durable = durable
        self._agents = agents
        self.interval = interval
        self.facts = StreamFacts()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="stream-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
