"""The JetStream stream both ends share, and the durable consumer that reads it.

An operator-configured stream (replicas 3, other limits) is left exactly as it
is: only a missing stream is created, with single-node defaults. The durable
consumer's configuration is defined here too, once, for `replicator serve`
and `replicator rebuild` alike.
"""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .subjects import CHANGES_SUBJECTS, RELAY_SUBJECTS

STREAM_NAME = "AGENT_CHANGES"
STREAM_SUBJECTS = [CHANGES_SUBJECTS, RELAY_SUBJECTS]
DUPLICATE_WINDOW_S = 120.0
#: A delivery not acked within this is redelivered (held parts of a multi-part transaction are kept alive).
CONSUMER_ACK_WAIT_S = 5.0
#: Deliveries a consumer may have unacked at once.
CONSUMER_MAX_ACK_PENDING = 20_000


def consumer_config(
    durable: str, *, deliver_policy: DeliverPolicy = DeliverPolicy.ALL, opt_start_seq: int | None = None
) -> ConsumerConfig:
    """The replicator's durable pull consumer on every subject of the stream (change records and relay writes)."""
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=deliver_policy,
        opt_start_seq=opt_start_seq,
        ack_wait=CONSUMER_ACK_WAIT_S,
        max_deliver=-1,
        max_ack_pending=CONSUMER_MAX_ACK_PENDING,
    )


#: JetStream's error code for "stream name already in use" (with another configuration).
STREAM_NAME_IN_USE = 10058


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
    except nats.js.errors.BadRequestError as exc:
        # 10058 "stream name already in use": another process created it between our lookup and our create.
        # Any other refusal (e.g. 10005, no suitable peers for the replicas asked) is the caller's to see.
        if exc.err_code != STREAM_NAME_IN_USE:
            raise
        await js.stream_info(STREAM_NAME)
