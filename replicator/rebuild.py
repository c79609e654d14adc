"""`replicator rebuild`: replay the whole stream into a fresh central store (serve must be stopped).

It uses the service's wiring (`ReplicatorService.start_nats`, `open_store`,
`new_consumer`) with a throwaway consumer, moves the previous central store
aside first, and finally points the service's durable consumer just past
the last record it applied.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time

from nats.js.api import DeliverPolicy

from agent_client import STREAM_NAME, consumer_config

from .service import ReplicatorService
from .settings import Settings

REBUILD_BATCH = 512


class _Progress:
    """A one-line progress report on stderr, at most twice a second."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._last_print = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last_print >= 0.5:
            self._last_print = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            rate = self.done / max(now - self.started, 1e-9)
            print(
                f"\rrebuild: {self.done}/{self.total} messages ({pct:5.1f}%), {rate:,.0f} msg/s",
                end="",
                file=sys.stderr,
                flush=True,
            )


async def rebuild(settings: Settings) -> int:
    service = ReplicatorService(settings)
    try:
        js = await service.start_nats(name="replicator-rebuild")
        total = (await js.stream_info(STREAM_NAME)).state.messages
        data = settings.data
        backup = data.backup(time.strftime("%Y%m%d-%H%M%S"))
        backup.mkdir()
        for path in data.central_files():
            if path.exists():
                shutil.move(str(path), backup / path.name)
        print(f"rebuild: previous central store moved to {backup}", file=sys.stderr)
        store, dead = service.open_store()
        durable = f"rebuild-{int(time.time())}"
        consumer = service.new_consumer(durable, batch=REBUILD_BATCH)
        progress = _Progress(total)
        consumer.on_batch = progress
        await consumer.run(until_idle=True)
        last_seq = consumer.max_stream_seq
        await consumer.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, durable)
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, settings.durable)
        await js.add_consumer(
            STREAM_NAME,
            consumer_config(
                settings.durable, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_seq + 1
            ),
        )
        elapsed = time.monotonic() - progress.started
        print(
            f"\rrebuild: {progress.done}/{total} messages in {elapsed:.1f}s; {len(store.view.agents)} agents; "
            f"{dead.total()} dead letters; consumer {settings.durable!r} resumes at stream seq {last_seq + 1}",
            file=sys.stderr,
        )
        return 0
    finally:
        await service.stop()
