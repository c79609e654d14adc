"""AgentStorage: what an agent imports. Local-first SQLite, replicated behind its back.

Every method works with NATS and the HTPC down: writes commit locally (and are
captured by triggers into the change log in the same transaction), and the
publisher drains the log whenever JetStream is reachable. Method names follow
the Commander OS storage guide (`write_data`, `batch_write`, `query_local`,
`query_network`, `health_check`, `close`), so a guide-style agent ports by
changing its constructor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from . import catalog, change_log, disk_space, migration, resync, schema_change
from ._sqlite_thread import SQLiteThread
from .agent_id import validate_agent_id
from .credentials import read_seed
from .errors import (
    AgentStorageError,
    FeedError,
    FlushTimeout,
    FollowError,
    HTPCUnavailable,
    InvalidRow,
    NetworkQueryError,
    StorageClosed,
)
from .follower import Followers, attach_followed, follow_dir
from .local_store import IDLE_THREAD_EXIT_S, LocalStore, connect, translate_sqlite_error
from .migration import Migration, apply_migrations, check_migrations
from .nats_link import NatsLink
from .publisher import Publisher
from .query_responder import QueryResponder
from .row_writer import RowId, RowWriter, is_mapping
from .schema_watch import SchemaWatch
from .subjects import agent_inbox_prefix
from .subscription import FEED_READ_TIMEOUT_S, FeedSubscription, probe_feed
from .visibility import Visibility, parse_visibility

log = logging.getLogger("agent_client")

T = TypeVar("T")

#: A batch_write of at most this many rows commits on the caller's event loop (LocalStore's fast path); a larger
#: one goes to the writer thread, so the loop is never held for long (~6 us a row with the capture trigger).
FAST_BATCH_ROWS = 128


class Transaction:
    """A caller-driven local transaction (see AgentStorage.transaction)."""

    def __init__(self, conn: SQLiteThread, rows: RowWriter) -> None:
        self._conn = conn
        self._rows = rows

    async def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[dict[str, Any]]:
        """Run one statement in the transaction; DDL keeps the capture in step (schema_change.execute)."""
        try:
            return await self._conn.call(lambda c: schema_change.execute(c, sql, params))
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from exc

    async def write_data(self, table: str, data: Mapping[str, Any]) -> RowId:
        rows = self._rows
        try:
            return await self._conn.call(lambda c: rows.upsert_one(c, table, data))
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from exc


class AgentStorage:
    """Local SQLite storage for one agent, replicated to the HTPC through NATS JetStream.

    `data_dir / f"{agent_id}.db"` is the database (WAL mode). `nats_url` may be
    omitted when `htpc_url` is given: it is learned from `/relay/info`.
    """

    def __init__(
        self,
        agent_id: str,
        data_dir: Path | str,
        htpc_url: str | None = None,
        nats_url: str | None = None,
        *,
        replicate: bool = True,
        nats_options: dict[str, Any] | None = None,
        nats_seed: str | None = None,
        nats_seed_file: str | Path | None = None,
        htpc_token: str | None = None,
        htpc_verify: bool | str = True,
        max_record_bytes: int = 256 * 1024,
        max_in_flight: int = 32,
        http_timeout: float = 5.0,
    ) -> None:
        """Credentials come from the arguments or the environment: `COMMANDER_NATS_SEED` (an nkey seed),
        `COMMANDER_NATS_SEED_FILE` (a file holding one) and `COMMANDER_HTPC_TOKEN` (the relay API token);
        `nats_options` passes anything else to nats.connect (e.g. `tls=ssl_context`)."""
        self.agent_id = validate_agent_id(agent_id)
        self.data_dir = Path(data_dir)
        self.db_path = self.data_dir / f"{self.agent_id}.db"
        self.htpc_url = htpc_url.rstrip("/") if htpc_url else None
        self.nats_url = nats_url
        self.replicate = replicate
        self.epoch = ""
        self._store = LocalStore(self.db_path)
        self._rows = RowWriter()
        options = dict(nats_options or {})
        seed = read_seed(
            nats_seed or os.environ.get("COMMANDER_NATS_SEED"),
            nats_seed_file or os.environ.get("COMMANDER_NATS_SEED_FILE"),
        )
        if seed:
            options.setdefault("nkeys_seed_str", seed)
        # Replies come to an inbox only this agent may subscribe to (see `replicator auth`).
        options.setdefault("inbox_prefix", agent_inbox_prefix(self.agent_id))
        self._htpc_token = htpc_token or os.environ.get("COMMANDER_HTPC_TOKEN")
        # A CA file path becomes an SSL context (httpx wants a context, not a path).
        self._htpc_verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=htpc_verify) if isinstance(htpc_verify, str) else htpc_verify
        )
        self._link = NatsLink(
            nats_url=nats_url,
            htpc_url=self.htpc_url,
            name=f"agent:{self.agent_id}",
            connect_options=options,
            http_verify=self._htpc_verify,
        )
        self._publisher: Publisher | None = None
        self._responder = QueryResponder(self.agent_id, self.db_path, controls={"resync": self._serve_resync})
        self._schema_watch: SchemaWatch | None = None
        self._max_record_bytes = max_record_bytes
        self._max_in_flight = max_in_flight
        self._http_timeout = http_timeout
        self._http: httpx.AsyncClient | None = None
        self._reader: SQLiteThread | None = None
        self._feed_http: httpx.AsyncClient | None = None
        #: follower copies of other agents' tables (follower.py): `<data_dir>/<agent_id>.follow/`
        self.follow_dir = follow_dir(self.data_dir, self.agent_id)
        self._followers = Followers(self.agent_id, self.follow_dir, self._subscribe_from if self.htpc_url else None)
        self._opened = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> AgentStorage:
        if self._opened:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        await self._store.open()
        agent_id = self.agent_id
        self.epoch = await self._store.run(lambda c: catalog.init_schema(c, agent_id))
        await self._store.run(migration.init_schema)
        await self._store.run(disk_space.convert_if_small)  # a database made before incremental auto-vacuum
        await self._store.write(catalog.resync_schema)
        # query_local & co. read on a thread of their own (a query can be long: it must never hold the loop);
        # the connection and its thread appear at the first read, and the thread ends again while idle.
        self._reader = self._reader_connection()
        self._schema_watch = SchemaWatch(self._store, self._reader)
        await self._schema_watch.start()
        if self.replicate:
            self._publisher = Publisher(
                store=self._store,
                db_path=self.db_path,
                link=self._link,
                agent_id=self.agent_id,
                epoch=self.epoch,
                max_record_bytes=self._max_record_bytes,
                max_in_flight=self._max_in_flight,
            )
            self._store.on_commit = self._publisher.notify
            await self._publisher.start()
            self._link.on_first_connect(self._responder.subscribe)
            self._link.start()
        # declared follows come back: their copies are attached to the reader and fed again
        await self._followers.restore()
        if self._followers.attachments():
            await self._attach_followed()
        self._opened = True
        log.info("agent %s opened %s (epoch %s)", self.agent_id, self.db_path, self.epoch)
        return self

    async def __aenter__(self) -> AgentStorage:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop publishing and close the database. Unpublished changes stay in the log for next time."""
        if self._closed:
            return
        self._closed = True
        await self._followers.close()
        if self._feed_http is not None:
            with contextlib.suppress(Exception):
                await self._feed_http.aclose()
        if self._schema_watch is not None:
            await self._schema_watch.close()
        if self._publisher is not None:
            await self._publisher.close()
        await self._link.close()
        if self._http is not None:
            await self._http.aclose()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
        await self._store.close()

    def _reader_connection(self) -> SQLiteThread:
        """The reader (query_local & co.): like `local_store.reader_connection`, with the follower files
        attached read-only under the followed agents' ids. Nothing exists before the first call."""
        db_path, followers = self.db_path, self._followers

        def connect_reader() -> sqlite3.Connection:
            conn = connect(db_path, check_same_thread=False, setup=False)
            try:
                for name, why in attach_followed(conn, followers.attachments()).items():
                    log.warning("follower copy of %s not readable: %s", name, why)
            except BaseException:
                conn.close()
                raise
            return conn

        return SQLiteThread(
            connect_reader, name=f"sqlite:{db_path.name}", idle_exit_s=IDLE_THREAD_EXIT_S
        ).lazy_connection()

    async def _attach_followed(self) -> dict[str, str]:
        """Bring the reader's attached follower files in line with the follows (after follow/unfollow)."""
        wanted = self._followers.attachments()
        return await self._read(lambda c: attach_followed(c, wanted))

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` on the reader connection (its own thread; never waits for the writer)."""
        assert self._reader is not None
        return await self._reader.call(fn)

    async def _read_small(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """A bounded read (a point lookup): on the loop connection when possible (no thread hop), else `_read`."""
        done, value = self._store.try_read(fn)
        if done:
            return value  # type: ignore[return-value]
        return await self._read(fn)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageClosed(f"storage of agent {self.agent_id} is closed")
        if not self._opened:
            raise StorageClosed("storage is not open: use `async with AgentStorage(...)` or `await storage.open()`")

    # ------------------------------------------------------------------ schema
    async def migrate(self, migrations: Iterable[Migration]) -> list[int]:
        """Apply the migrations not applied yet, in version order. Returns the versions applied now."""
        self._check_open()
        ordered = check_migrations(migrations)
        applied = await self._store.run(lambda c: apply_migrations(c, ordered))
        if applied:  # run() leaves the group open: close it, so the migrations' changes can be published
            await self._store.close_group()
        return applied

    async def set_visibility(self, table: str, visibility: str | Visibility) -> None:
        """Declare a table `always` (replicated), `on_demand` (queried live) or `private` (never leaves)."""
        self._check_open()
        vis = parse_visibility(visibility)
        await self._store.write(lambda c: catalog.apply_visibility(c, table, vis))

    async def visibility(self) -> dict[str, Visibility]:
        """Every user table with its visibility (undeclared tables are private)."""
        self._check_open()

        def read(c: sqlite3.Connection) -> dict[str, Visibility]:
            declared = {name: v for name, (v, _l, _s) in catalog.current_tables(c).items()}
            return {t: declared.get(t, Visibility.PRIVATE) for t in catalog.user_tables(c)}

        return await self._read(read)

    # ------------------------------------------------------------------ writes
    async def write_data(self, table: str, data: Mapping[str, Any]) -> RowId:
        """Upsert one row (only the given columns are updated) and return its primary key.

        A missing single-column key is generated: SQLite assigns an INTEGER
        PRIMARY KEY, any other key gets a uuid4 hex string.
        """
        self._check_open()
        if not is_mapping(data):
            raise InvalidRow(f"data for {table!r} must be a dict of column -> value")
        rows = self._rows
        return await self._store.write(lambda c: rows.upsert_one(c, table, data), single_statement=True, small=True)

    async def batch_write(self, records: Iterable[Mapping[str, Any]]) -> list[RowId]:
        """Write `[{"table": ..., "data": {...}}, ...]` in one local transaction (all or nothing)."""
        self._check_open()
        items: list[tuple[str, Mapping[str, Any]]] = []
        for i, rec in enumerate(records):
            if not is_mapping(rec) or "table" not in rec:
                raise InvalidRow(f"batch record {i} must be {{'table': str, 'data': dict}}")
            data = rec.get("data")
            if not is_mapping(data):
                raise InvalidRow(f"batch record {i} must be {{'table': str, 'data': dict}}")
            items.append((rec["table"], data))
        rows = self._rows
        small = len(items) <= FAST_BATCH_ROWS
        return await self._store.write(lambda c: rows.upsert_many(c, items), small=small)  # type: ignore[no-any-return]

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """`async with storage.transaction() as tx:` runs several statements as one local transaction.

        It holds the single writer; keep it short. Raw SQL is fine: triggers
        capture whatever it changes in replicated tables.
        """
        self._check_open()
        async with self._store.exclusive_transaction() as conn:
            yield Transaction(conn, self._rows)

    async def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[dict[str, Any]]:
        """Run one SQL statement (any: DML or DDL) in a local transaction of its own; rows as dicts.

        DDL keeps the capture in step in the same transaction: `ALTER TABLE t DROP COLUMN x` works on an
        `always` table, a renamed table keeps its visibility, and the HTPC's copy follows (schema_change.py).
        """
        self._check_open()
        return await self._store.write(lambda c: schema_change.execute(c, sql, params))  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ resync
    async def _serve_resync(self, request: dict[str, Any]) -> dict[str, Any]:
        """The HTPC's `{"control": "resync", "request_id": ...}` (resync.py): one local transaction, then the answer."""
        try:
            request_id = resync.validate_request_id(request.get("request_id"))
            served = await self._store.write(lambda c: resync.serve(c, request_id))
        except AgentStorageError as exc:
            code = "invalid_request" if isinstance(exc, ValueError) else "resync_failed"
            return {"error": code, "message": str(exc)}
        if served.new:
            log.warning(
                "agent %s: resync %s served at change %d (%d unacknowledged change(s) superseded)",
                self.agent_id,
                served.request_id,
                served.at_seq,
                served.superseded,
            )
            if self._publisher is not None:
                self._publisher.resynced(served.at_seq)
        return {"resync": "accepted", "request_id": served.request_id, "at_seq": served.at_seq}

    # ------------------------------------------------------------------ reads
    async def query_local(
        self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """Run SQL on the local database (fast, never touches the network); rows as dicts."""
        self._check_open()
        try:
            return await self._read(lambda c: schema_change.rows_as_dicts(c.execute(query, params or ())))
        except sqlite3.Error as exc:
            raise translate_sqlite_error(exc) from exc

    async def last_committed_seq(self) -> int:
        """The sequence number of the newest committed local change."""
        self._check_open()
        return await self._read_small(change_log.last_committed_seq)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until every change committed so far is acknowledged by JetStream."""
        self._check_open()
        if self._publisher is None:
            raise FlushTimeout("replication is disabled for this storage (replicate=False)")
        target = await self.last_committed_seq()
        if not await self._publisher.wait_acked(target, timeout):
            raise FlushTimeout(
                f"{target - self._publisher.acked_seq} change(s) not acknowledged by JetStream after {timeout:g}s"
                + (f" (last error: {self._publisher.last_error})" if self._publisher.last_error else "")
            )

    async def query_network(
        self,
        query: str,
        params: Sequence[Any] | Mapping[str, Any] | None = None,
        *,
        fresh: bool = True,
        timeout_ms: int | None = None,
    ) -> dict[str, Any]:
        """Query the network-wide view on the HTPC (`POST /relay/query`).

        With `fresh` the HTPC answers only once it has applied this agent's
        changes up to the last local commit (read-your-writes).
        """
        self._check_open()
        if not self.htpc_url:
            raise NetworkQueryError("query_network needs htpc_url")
        payload: dict[str, Any] = {"agent_id": self.agent_id, "query": query, "params": params or {}}
        if fresh:
            payload["min_seq"] = await self.last_committed_seq()
            payload["epoch"] = self.epoch
        if timeout_ms is not None:
            payload["timeout_ms"] = timeout_ms
        if self._http is None:
            headers = {"Authorization": f"Bearer {self._htpc_token}"} if self._htpc_token else {}
            self._http = httpx.AsyncClient(timeout=self._http_timeout, headers=headers, verify=self._htpc_verify)
        try:
            resp = await self._http.post(f"{self.htpc_url}/relay/query", json=payload)
        except httpx.HTTPError as exc:
            raise HTPCUnavailable(f"HTPC at {self.htpc_url} unreachable: {exc!r}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code >= 400:
            raise NetworkQueryError(
                f"HTPC refused the query ({resp.status_code}): {body.get('message', resp.text[:200])}",
                status=resp.status_code,
                code=body.get("error"),
            )
        return body  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ change feeds and follower copies
    def _feed_client(self) -> httpx.AsyncClient:
        if self._feed_http is None:
            headers = {"Authorization": f"Bearer {self._htpc_token}"} if self._htpc_token else {}
            self._feed_http = httpx.AsyncClient(
                headers=headers,
                verify=self._htpc_verify,
                timeout=httpx.Timeout(self._http_timeout, read=FEED_READ_TIMEOUT_S),
                # one connection per live stream: no pool bound (a pool limit would queue streams behind others)
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
            )
        return self._feed_http

    def _subscribe_from(self, agent_id: str, table: str, offset: str | None) -> FeedSubscription:
        assert self.htpc_url is not None
        return FeedSubscription(
            self._feed_client(), self.htpc_url, agent_id, table, offset=offset, connect_timeout=self._http_timeout
        )

    def subscribe(self, agent_id: str, table: str, *, offset: str | None = None, live: bool = True) -> FeedSubscription:
        """Another agent's `always` table as a live async iterator of `FeedSchema`, `Change`, `UpToDate` and
        `MustRefetch` events (`GET /relay/changes` over Server-Sent Events; see subscription.py).

        Without `offset` it starts with a snapshot (the schema, every row as an insert, then up-to-date); with
        one (an `UpToDate.offset` or the `offset` of a change with `last`), with the changes after it. It
        reconnects by itself and resumes without losing or repeating a change; `MustRefetch` means "start
        over": a new snapshot follows on its own. `live=False` ends after the first up-to-date. A refusal
        raises `FeedError` (e.g. code `table_not_visible` for an `on_demand` table). `aclose()` stops it.
        """
        self._check_open()
        if not self.htpc_url:
            raise FeedError("subscribe() needs the HTPC's URL: AgentStorage(..., htpc_url=...)", code="no_htpc_url")
        return FeedSubscription(
            self._feed_client(),
            self.htpc_url,
            agent_id,
            table,
            offset=offset,
            live=live,
            connect_timeout=self._http_timeout,
        )

    async def follow(self, agent_id: str, tables: Sequence[str]) -> None:
        """Keep a local, read-only follower copy of another agent's `always` tables, readable in query_local
        as `"<agent_id>".<table>` (joins with this agent's tables work).

        The copy is fed by the change feed in the background, each remote transaction applied atomically with
        its offset; it survives restarts (the follow is declared in the follower file and restored by `open()`),
        answers from its last state while the HTPC is down, and refills itself on must-refetch. It lives in
        `<data_dir>/<agent_id>.follow/`, never in this agent's database, so it is never published. At most 9
        agents can be followed. Raises FollowError (itself, a 10th agent, no htpc_url, a bad name) or FeedError
        when the HTPC refuses a table (e.g. `table_not_visible`); an unreachable HTPC does not stop the follow.
        """
        self._check_open()
        agent_id = validate_agent_id(agent_id)
        if not self.htpc_url:
            raise FollowError("follow() needs the HTPC's URL: AgentStorage(..., htpc_url=...)")
        names = self._followers.check(agent_id, tables)
        for table in names:
            await probe_feed(self._feed_client(), self.htpc_url, agent_id, table, timeout=self._http_timeout)
        await self._followers.follow(agent_id, names)
        failed = await self._attach_followed()
        if agent_id in failed:
            raise FollowError(failed[agent_id])

    async def unfollow(self, agent_id: str, tables: Sequence[str] | None = None) -> None:
        """Stop following `tables` of `agent_id` (all of them by default) and delete their local copy."""
        self._check_open()
        agent_id = validate_agent_id(agent_id)
        if isinstance(tables, str):
            raise FollowError("tables must be a list of table names, not one string")
        if await self._followers.unfollow(agent_id, tables):
            await self._attach_followed()
            await self._followers.forget_file(agent_id)

    @property
    def on_follow_applied(self) -> Callable[[str, str, str], None] | None:
        """A hook called `(agent_id, table, offset)` on the event loop right after a follower copy committed a
        new offset (its data is then visible to query_local). Keep it short: it runs on the loop."""
        return self._followers.on_applied

    @on_follow_applied.setter
    def on_follow_applied(self, hook: Callable[[str, str, str], None] | None) -> None:
        self._followers.on_applied = hook

    async def wait_followed(self, agent_id: str, table: str, offset: str, timeout: float = 10.0) -> bool:
        """Wait until the follower copy of `agent_id.table` is at `offset` (e.g. an `UpToDate.offset` seen by a
        subscriber); False after `timeout` seconds."""
        self._check_open()
        return await self._followers.wait_applied(agent_id, table, offset, timeout)

    # ------------------------------------------------------------------ replication state
    @property
    def acked_seq(self) -> int | None:
        """The newest local change JetStream has acknowledged (None with replicate=False)."""
        return self._publisher.acked_seq if self._publisher is not None else None

    @property
    def records_published(self) -> int:
        """Change records acknowledged by JetStream since this storage was opened."""
        return self._publisher.records_published if self._publisher is not None else 0

    @property
    def nats_connected_url(self) -> str | None:
        """The NATS server the agent is connected to right now (None while disconnected)."""
        return self._link.connected_url

    @property
    def nats_servers(self) -> list[str]:
        """Every NATS server URL the agent's client knows: the ones given and those the cluster announced."""
        return self._link.servers

    # ------------------------------------------------------------------ health
    async def health_check(self, *, integrity: bool = True) -> dict[str, Any]:
        """Storage health: local db (with its size and the change log's), NATS link, backlog, why publishing is
        blocked (if it is), last publish, publish latency, message id collisions, tables by visibility.

        `integrity=False` skips `PRAGMA quick_check` (it reads the whole database: too much for a metrics scrape
        every few seconds); `local_db.ok` is then None."""
        self._check_open()
        local: dict[str, Any] = {"path": str(self.db_path)}
        try:
            mode = await self._read(lambda c: c.execute("PRAGMA main.journal_mode").fetchone()[0])
            ok: str | None = None
            if integrity:
                ok = await self._read(lambda c: c.execute("PRAGMA main.quick_check(1)").fetchone()[0])
            local.update(ok=None if ok is None else ok == "ok", journal_mode=mode)
        except sqlite3.Error as exc:
            local.update(ok=False, error=str(exc))
        tables = await self.visibility()
        by_vis: dict[str, list[str]] = {v.value: [] for v in Visibility}
        for name, vis in sorted(tables.items()):
            by_vis[vis.value].append(name)
        try:
            space = await self._read(disk_space.space)
            log_bytes = await self._read(disk_space.log_bytes)
            local.update(
                file_bytes=space.file_bytes,
                free_bytes=space.free_bytes,
                auto_vacuum=space.auto_vacuum,
                log_bytes=log_bytes,
            )
        except sqlite3.Error as exc:
            log_bytes = None
            local.setdefault("error", str(exc))
        pub = self._publisher
        backlog, age = (await pub.backlog()) if pub else (0, None)
        return {
            "agent_id": self.agent_id,
            "epoch": self.epoch,
            "local_db": local,
            "nats": {
                "connected": self._link.connected,
                "url": self._link.nats_url
                or (
                    str(self._link.nc.connected_url.geturl()) if self._link.nc and self._link.nc.connected_url else None
                ),
                "connected_url": self._link.connected_url,
                "servers": self._link.servers,
                "last_error": (pub.last_error if pub and pub.last_error else None) or self._link.last_error,
            },
            "htpc_connection": self._link.connected,
            "backlog": {"changes": backlog, "oldest_age_s": age},
            # bytes the local change log takes on disk (it grows while NATS is down; pages go back after a drain)
            "log_bytes": log_bytes,
            # why the publisher cannot send (a change too large for the stream, JetStream refusing it, no PubAck
            # for a long time while connected) and since when; None while it can. Also sent to the HTPC.
            "blocked": pub.blocked if pub else None,
            # the publishing loop is alive (False with replicate=False, or if it died: nothing gets sent)
            "publisher_running": pub.running if pub else False,
            "blocked_since": pub.blocked_since if pub else None,
            "status_reports": pub.status_reports if pub else 0,
            "last_status_at": pub.last_status_at if pub else None,
            # a schema change made outside agent_client that could not be followed (None when all is in step)
            "schema_problem": self._schema_watch.last_error if self._schema_watch else None,
            "sync_queue_size": backlog,
            "last_committed_seq": await self.last_committed_seq(),
            "acked_seq": pub.acked_seq if pub else None,
            "records_published": pub.records_published if pub else 0,
            "last_publish_at": pub.last_publish_at if pub else None,
            # seconds from a record's send to its PubAck, per record acknowledged since the storage was opened:
            # {"count", "sum", "le": {upper bound: cumulative count}} (a Prometheus-style histogram)
            "publish_latency_s": pub.publish_latency.snapshot().as_dict() if pub else None,
            # PubAcks that said `duplicate` for a record this agent never published: another message held its
            # id. The record was kept and published again under a fresh id; non-zero means look at the HTPC.
            "msg_id_collisions": pub.msg_id_collisions if pub else 0,
            "last_msg_id_collision": pub.last_msg_id_collision if pub else None,
            "tables": by_vis,
            "unreplicated_tables": by_vis["on_demand"] + by_vis["private"],
            # follower copies of other agents' tables: offset, rows, seconds behind (0 while live), state
            "follows": self._followers.health(),
            "checked_at": time.time(),
        }
