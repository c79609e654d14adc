"""ReplicatorService: the HTPC's parts wired together, started and stopped in order.

Start: embedded nats-server (unless an external URL is given), the NATS
connection, the stream (`start_nats`), the central store and the dead-letter
store (`open_store`), the consumer (which wakes the change feed hub after its
commits), the query engine. `replicator rebuild` uses the same wiring with its
own consumer (`start_nats`, `open_store`, `new_consumer`). The resync
coordinator (resync.py) starts just before the consumer, which reports to it.
Stop: open change feed streams end (`end_streams`, also called as soon as the
HTTP server starts shutting down), the consumer finishes the batch in hand
(commit, then ack), the coordinator stops, then the connection drains, then
the embedded server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from agent_client import (
    REPLICATOR_INBOX,
    Backoff,
    read_seed,
    reconnecting_options,
)

from .auth import AuthStore
from .central_store import CentralStore
from .consumer import Consumer
from .dead_letters import DeadLetterStore
from .embedded_nats import EmbeddedNats
from .errors import NatsUnavailable
from .feed_hub import FeedHub
from .query_engine import QueryEngine
from .relay_writer import RelayWriter
from .resync import ResyncCoordinator
from .settings import Settings
from .snapshots import Snapshots
from .stream_admin import ensure_stream_named, reconcile_stream
from .stream_watch import StreamWatch

log = logging.getLogger("replicator")


async def connect_nats(
    url: str, *, name: str, connect_timeout_s: float = 30.0, options: dict[str, Any] | None = None
) -> NATS:
    """Connect (retrying until `connect_timeout_s`), then let nats-py reconnect forever."""
    deadline = time.monotonic() + connect_timeout_s
    backoff = Backoff(0.2, 2.0)
    last: Exception | None = None

    async def _quiet(exc: Exception) -> None:
        log.debug("nats: %r", exc)

    while time.monotonic() < deadline:
        try:
            # nats-py's first connect retries for ever with max_reconnect_attempts=-1: bound it by the deadline
            return await asyncio.wait_for(
                nats.connect(**reconnecting_options(url, name), error_cb=_quiet, **(options or {})),
                timeout=max(0.1, deadline - time.monotonic()),
            )
        except Exception as exc:  # nats raises several unrelated types for "not reachable"
            last = exc
            await asyncio.sleep(backoff.next())
    raise NatsUnavailable(f"cannot connect to NATS at {url}: {last!r}") from last


class ReplicatorService:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.data = settings.data
        self.embedded: EmbeddedNats | None = None
        self.nats_url: str = settings.nats_url or ""
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.store: CentralStore | None = None
        self.dead_letters: DeadLetterStore | None = None
        self.consumer: Consumer | None = None
        self.query_engine: QueryEngine | None = None
        self.auth: AuthStore | None = None
        self.stream_watch: StreamWatch | None = None
        self.snapshots: Snapshots | None = None
        self.resync: ResyncCoordinator | None = None
        self.feed_hub: FeedHub | None = None
        self.stream_replicas: int | None = None
        self.relay_writer = RelayWriter(
            lambda: self.store.view if self.store is not None else None,
            lambda: (self.nc, self.js),
            max_record_bytes=settings.max_record_bytes,
            secret=self.data.relay_id_secret,
        )
        self._auth_watch: asyncio.Task[None] | None = None

    @property
    def nats_connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def consumer_running(self) -> bool:
        return self.consumer is not None and self.consumer.running

    def _nats_options(self) -> dict[str, Any]:
        s = self.settings
        options: dict[str, Any] = {}
        if self.auth is not None or s.nats_seed_file:
            seed_file = s.nats_seed_file or (self.auth.replicator_seed_file() if self.auth else None)
            options["nkeys_seed_str"] = read_seed(file=seed_file)
            options["inbox_prefix"] = REPLICATOR_INBOX
        if s.nats_tls_ca or s.nats_tls_cert:
            ctx = ssl.create_default_context(cafile=str(s.nats_tls_ca or s.nats_tls_cert))
            options["tls"] = ctx
        return options

    def _open_auth(self) -> None:
        s = self.settings
        self.auth = AuthStore(self.data.auth)
        if not self.auth.initialized:
            seed_file = self.auth.init()
            log.warning(
                "auth is on: created the replicator's NATS key (%s); add agents with "
                "`replicator auth add-agent ID --data-dir %s`",
                seed_file,
                s.data_dir,
            )

    async def start_nats(self, *, name: str) -> JetStreamContext:
        """The NATS side only: the embedded server (without --nats-url), the connection, the stream."""
        s = self.settings
        if not s.nats_url:
            self.embedded = EmbeddedNats(
                self.data.nats,
                host=s.nats_host,
                port=s.nats_port,
                authorization=self.auth.nats_authorization_conf() if self.auth else None,
                tls_cert=s.nats_tls_cert,
                tls_key=s.nats_tls_key,
            )
            await self.embedded.start()
            self.nats_url = self.embedded.url
        self.nc = await connect_nats(self.nats_url, name=name, options=self._nats_options())
        self.js = self.nc.jetstream()
        # a cluster still forming refuses placement for a while: retried, then a named error
        await ensure_stream_named(self.js, s.stream_replicas, settle_s=30.0)
        return self.js

    def open_store(self) -> tuple[CentralStore, DeadLetterStore]:
        """The central store and the dead-letter store of the data directory."""
        s = self.settings
        self.store = CentralStore(self.data, max_agent_bytes=s.max_agent_bytes, max_record_bytes=s.max_record_bytes)
        self.dead_letters = DeadLetterStore(
            self.data.dead_letters_db, payload_bytes=s.dead_letter_payload_bytes, per_agent=s.dead_letters_per_agent
        )
        return self.store, self.dead_letters

    def new_consumer(self, durable: str, **options: Any) -> Consumer:
        """A consumer applying the stream to the open store (`options`: Consumer's keyword arguments)."""
        assert self.js is not None and self.store is not None and self.dead_letters is not None
        options.setdefault("max_held_per_agent", self.settings.max_held_per_agent)
        options.setdefault("resync_after", self.settings.resync_after_s)
        return Consumer(self.js, self.store, self.dead_letters, durable=durable, **options)

    async def start(self) -> None:
        s = self.settings
        self.data.root.mkdir(parents=True, exist_ok=True)
        if s.auth_enabled:
            self._open_auth()
        await self.start_nats(name=f"replicator:{s.durable}")
        self.stream_replicas = await self._reconcile_stream()
        if self.auth is not None:
            self._auth_watch = asyncio.create_task(self._watch_auth(), name="auth-reload")
        store, _dead_letters = self.open_store()
        self.consumer = self.new_consumer(s.durable)
        self.feed_hub = FeedHub(lambda: store.view, store.path_for, max_subscribers=s.feed_max_subscribers)
        self.consumer.on_committed = self.feed_hub.committed  # live subscribers wake on their agent's commits
        # Before the consumer runs: it reports to the coordinator from its first batch on.
        self.resync = ResyncCoordinator(self.data.recovery_db, store, self.consumer, lambda: self.nc)
        self.resync.start()
        self.consumer.start()
        self.query_engine = QueryEngine(
            store,
            self.consumer,
            lambda: self.nc,
            max_rows=s.query_max_rows,
            default_timeout_ms=s.query_timeout_ms,
            max_result_bytes=s.query_max_result_bytes,
            max_value_bytes=s.query_max_value_bytes,
            max_value_read_bytes=s.max_record_bytes,
            max_concurrent=s.query_max_concurrent,
            pool_size=s.query_pool_size,
        )
        if self.auth is not None:
            self.query_engine.may_read_on_demand = self.auth.may_read_on_demand
        self.stream_watch = StreamWatch(
            lambda: self.js, s.durable, store.agent_ids, view=lambda: store.view, stuck_after=s.stuck_after_s
        )
        self.stream_watch.start()
        self.snapshots = Snapshots(
            self.data, self.consumer.ack_floor, interval_s=s.snapshot_interval_s, keep=s.snapshots_keep
        )
        self.snapshots.start()
        log.info("replicator started: data %s, NATS %s", s.data_dir, self.nats_url)

    async def _reconcile_stream(self) -> int:
        """Bring AGENT_CHANGES to what the HTPC needs (`stream_admin.reconcile_stream`, also behind
        `replicator stream create`); returns its replicas."""
        assert self.js is not None
        info, _changes = await reconcile_stream(self.js, self.settings)
        return info.config.num_replicas or self.settings.stream_replicas

    async def _watch_auth(self) -> None:
        """Pick up `replicator auth add-agent/revoke` made while serving: API tokens and NATS keys."""
        assert self.auth is not None
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.auth.reload() and self.embedded is not None:
                    self.embedded.reload(self.auth.nats_authorization_conf())
                    log.info("credentials reloaded")
            except (OSError, ValueError) as exc:
                log.error("cannot reload credentials: %s", exc)

    def advertised_nats_url(self, request_host: str | None = None) -> str:
        if self.settings.nats_advertise:
            return self.settings.nats_advertise
        if self.embedded is not None and self.embedded.host in ("0.0.0.0", "") and request_host:
            return f"nats://{request_host}:{self.embedded.port}"
        return self.nats_url

    async def server_version(self) -> str | None:
        """The connected nats-server's version ("2.10.22"), None while disconnected or unknown."""
        if self.nc is None or not self.nc.is_connected:
            return None
        version = self.nc.connected_server_version
        try:
            text = f"{version.major}.{version.minor}.{version.patch}"
            if version.prerelease:
                text += f"-{version.prerelease}"
            if version.build:
                text += f"+{version.build}"
        except ValueError:  # not a semantic version: nats-py reports it but cannot parse it
            return None
        return None if text == "0.0.0-unknown" else text

    def end_streams(self) -> None:
        """End the open change feed streams now: the HTTP server waits for open responses before it stops."""
        if self.feed_hub is not None:
            self.feed_hub.end_streams()

    async def stop(self) -> None:
        if self._auth_watch is not None:
            self._auth_watch.cancel()
        if self.feed_hub is not None:
            await self.feed_hub.close()
        for task in (self.snapshots, self.stream_watch):
            if task is not None:
                await task.stop()
        if self.consumer is not None:
            await self.consumer.stop()  # the batch in hand still reports to the coordinator
        if self.resync is not None:
            await self.resync.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 5)
        if self.embedded is not None:
            await self.embedded.stop()
        for part, close in (
            ("query engine", self.query_engine.close if self.query_engine is not None else None),
            ("central store", self.store.close if self.store is not None else None),
            ("dead-letter store", self.dead_letters.close if self.dead_letters is not None else None),
        ):
            if close is None:
                continue
            try:
                close()
            except Exception as exc:  # e.g. after a full disk: what is committed is safe; say so and go on
                log.error("closing the %s: %s", part, exc)
        log.info("replicator stopped")
