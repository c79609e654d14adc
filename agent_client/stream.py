"""The JetStream stream both ends share, created on first use if missing.

An operator-configured stream (replicas 3, other limits) is left exactly as it
is: only a missing stream is created, with single-node defaults.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

STREAM_NAME = "AGENT_CHANGES"
STREAM_SUBJECTS = ["agents.*.changes"]
DUPLICATE_WINDOW_S = 120.0


async def ensure_stream(js: JetStreamContext, *, replicas: int = 1, max_age_s: float = 0.0) -> None:
    try:
        await js.stream_info(STREAM_NAME)
        return
    except nats.js.errors.NotFoundError:
        pass
    config = StreamConfig(
        name=STREAM_NAME,
        subjects=STREAM_SUBJECTS,
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        max_age=max_age_s,
        duplicate_window=DUPLICATE_WINDOW_S,
    )
    try:
        await js.add_stream(config)
    except nats.js.errors.BadRequestError:
        # Another process created it between our lookup and our create.
        await js.stream_info(STREAM_NAME)
