"""`replicator stream`: look at and manage the AGENT_CHANGES stream without the `nats` tool.

Three operations, on the NATS server or cluster the replicator uses:

* `info`: the stream's configuration and state (`StreamReport`, a table or JSON);
* `create`: what `replicator serve` does to the stream when it starts, and nothing else: create it if
  missing (agent_client's `ensure_stream`) with --replicas, then `reconcile_stream` (at least that many
  replicas, both subjects, a bound on one message, the HTPC's retention);
* `set-replicas N`: JetStream `update_stream` of the existing stream with N replicas (up or down; the
  data is copied to new replicas), then wait until every replica is current.

`reconcile_stream` is the one place where the replicator brings an existing stream to what it needs;
`replicator serve` calls it at start-up too. JetStream's refusals become the project's named errors:
`StreamNotFound` (no stream), `StreamMisconfigured` (a change JetStream refuses, e.g. more replicas
than the cluster has servers), `NatsUnavailable` (no server answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from agent_client import REPLICATOR_INBOX, STREAM_NAME, STREAM_SUBJECTS, ensure_stream, read_seed

from .auth import AuthStore
from .errors import NatsUnavailable, StreamMisconfigured, StreamNotFound
from .settings import Settings

log = logging.getLogger("replicator")

#: JetStream's most replicas of one stream.
MAX_REPLICAS = 5
#: JetStream API error codes (nats-server's errors.json) answered to a replica count it cannot place.
_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"
_NO_PEERS = 10005  # "no suitable peers for placement" (fewer servers than replicas, or not enough up)
_INSUFFICIENT_RESOURCES = 10023


# ------------------------------------------------------------------------------------------ report
@dataclass(frozen=True)
class Peer:
    """One server holding a replica of the stream, as JetStream reports it."""

    name: str
    leader: bool
    current: bool  # caught up with the leader (the leader itself always is)
    offline: bool
    lag: int  # operations behind the leader
    active_s: float | None  # seconds since the leader last heard from it (None for the leader)


@dataclass(frozen=True)
class StreamReport:
    """AGENT_CHANGES' configuration and state, flattened for a table or JSON."""

    name: str
    subjects: list[str]
    storage: str
    replicas: int
    retention: str
    discard: str
    duplicate_window_s: float
    max_bytes: int  # -1: no bound
    max_msgs: int  # -1: no bound
    max_age_s: float  # 0: for ever
    max_msg_size: int  # -1: no bound
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    consumers: int
    cluster: str | None  # the NATS cluster's name (None: a single server)
    leader: str | None  # the server leading the stream (None: an election is under way)
    peers: list[Peer]

    @classmethod
    def of(cls, info: StreamInfo) -> StreamReport:
        c, s = info.config, info.state
        cluster = info.cluster
        peers: list[Peer] = []
        if cluster is not None and cluster.leader:
            peers.append(Peer(cluster.leader, True, True, False, 0, None))
        for r in (cluster.replicas if cluster is not None else None) or []:
            active = r.active / 1e9 if isinstance(r.active, int | float) else None
            peers.append(Peer(r.name or "?", False, bool(r.current), bool(r.offline), r.lag or 0, active))
        return cls(
            name=c.name or STREAM_NAME,
            subjects=list(c.subjects or []),
            storage=_enum(c.storage),
            replicas=c.num_replicas or 1,
            retention=_enum(c.retention),
            discard=_enum(c.discard),
            duplicate_window_s=float(c.duplicate_window or 0.0),
            max_bytes=_bound(c.max_bytes),
            max_msgs=_bound(c.max_msgs),
            max_age_s=float(c.max_age or 0.0),
            max_msg_size=_bound(c.max_msg_size),
            messages=s.messages,
            bytes=s.bytes,
            first_seq=s.first_seq,
            last_seq=s.last_seq,
            consumers=s.consumer_count,
            cluster=cluster.name if cluster is not None else None,
            leader=cluster.leader if cluster is not None else None,
            peers=peers,
        )

    @property
    def replicas_current(self) -> bool:
        """A leader is elected, the peers are as many as the replicas asked for, and each is caught up."""
        return self.leader is not None and len(self.peers) == self.replicas and all(p.current for p in self.peers)

    def as_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def as_table(self) -> str:
        rows: list[tuple[str, str]] = [
            ("stream", self.name),
            ("subjects", ", ".join(self.subjects)),
            ("storage", self.storage),
            ("replicas", str(self.replicas)),
            ("retention", self.retention),
            ("discard", self.discard),
            ("duplicate window", _duration(self.duplicate_window_s)),
            ("max bytes", "unlimited" if self.max_bytes < 0 else f"{self.max_bytes:,}"),
            ("max messages", "unlimited" if self.max_msgs < 0 else f"{self.max_msgs:,}"),
            ("max age", "unlimited" if self.max_age_s <= 0 else _duration(self.max_age_s)),
            ("max message size", "unlimited" if self.max_msg_size < 0 else f"{self.max_msg_size:,}"),
            ("messages", f"{self.messages:,}"),
            ("bytes", f"{self.bytes:,}"),
            ("first sequence", str(self.first_seq)),
            ("last sequence", str(self.last_seq)),
            ("consumers", str(self.consumers)),
            ("cluster", self.cluster or "(single server)"),
            ("leader", self.leader or "(none: election under way)"),
        ]
        width = max(len(k) for k, _v in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.cluster is not None:
            lines += ["", f"{'server':<16} {'role':<8} {'current':<8} {'offline':<8} {'lag':>6}  active"]
            for p in self.peers:
                active = "-" if p.active_s is None else f"{p.active_s:.1f}s ago"
                lines.append(
                    f"{p.name:<16} {'leader' if p.leader else 'replica':<8} {_yes(p.current):<8} "
                    f"{_yes(p.offline):<8} {p.lag:>6}  {active}"
                )
        return "\n".join(lines)


def _enum(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def _bound(value: int | None) -> int:
    return -1 if value is None or value < 0 else value


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400.0), ("h", 3_600.0), ("m", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


# ------------------------------------------------------------------------------------------ connection
def nats_options(settings: Settings) -> dict[str, Any]:
    """nats.connect options for the replicator's identity: its nkey (--nats-seed-file, else the data
    directory's own key when `replicator auth` made one) and the NATS server's CA (--nats-tls-ca)."""
    options: dict[str, Any] = {}
    seed_file: Path | None = settings.nats_seed_file
    if seed_file is None:
        try:
            auth = AuthStore(settings.data.auth)
            if auth.initialized and auth.replicator_seed_file().is_file():
                seed_file = auth.replicator_seed_file()
        except (OSError, ValueError):  # not ours to read (another user's data dir): connect without a key
            log.debug("no readable replicator key in %s", settings.data.auth)
    if seed_file is not None:
        options["nkeys_seed_str"] = read_seed(file=seed_file)
        options["inbox_prefix"] = REPLICATOR_INBOX
    if settings.nats_tls_ca or settings.nats_tls_cert:
        options["tls"] = ssl.create_default_context(cafile=str(settings.nats_tls_ca or settings.nats_tls_cert))
    return options


def nats_url(settings: Settings) -> str:
    """--nats-url, else the embedded server a `replicator serve` of the same --data-dir runs (its port is
    remembered in DATA_DIR/nats/nats.port)."""
    if settings.nats_url:
        return settings.nats_url
    saved = settings.data.nats / "nats.port"
    try:
        port = int(saved.read_text().strip())
    except (OSError, ValueError):
        raise NatsUnavailable(
            f"no --nats-url given and no embedded NATS server known in {settings.data_dir} "
            "(pass --nats-url or REPLICATOR_NATS_URL: the server or cluster holding AGENT_CHANGES)"
        ) from None
    host = "127.0.0.1" if settings.nats_host in ("0.0.0.0", "") else settings.nats_host
    return f"{'tls' if settings.nats_tls_cert else 'nats'}://{host}:{port}"


@contextlib.asynccontextmanager
async def jetstream(settings: Settings, *, timeout_s: float) -> AsyncIterator[JetStreamContext]:
    """A JetStream context on the replicator's NATS (NatsUnavailable when nothing answers within timeout_s)."""
    from .service import connect_nats

    url = nats_url(settings)
    options = nats_options(settings)
    try:
        # nats-py's first connect retries for ever when told to reconnect for ever (as connect_nats does):
        # the whole attempt is bounded here.
        nc: NATS = await asyncio.wait_for(
            connect_nats(url, name="replicator:stream-admin", connect_timeout_s=timeout_s, options=options),
            timeout=timeout_s,
        )
    except TimeoutError:
        raise NatsUnavailable(
            f"cannot connect to NATS at {url} within {timeout_s:g}s (not reachable, or it refused the credentials)"
        ) from None
    try:
        yield nc.jetstream(timeout=max(2.0, min(timeout_s, 10.0)))
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


# ------------------------------------------------------------------------------------------ operations
async def stream_info(js: JetStreamContext) -> StreamInfo:
    """AGENT_CHANGES' info; StreamNotFound when there is none, NatsUnavailable when JetStream does not answer."""
    try:
        return await js.stream_info(STREAM_NAME)
    except nats.js.errors.NotFoundError:
        raise StreamNotFound(
            f"there is no stream {STREAM_NAME} on this NATS: create it with `replicator stream create`"
        ) from None
    except (
        TimeoutError,
        nats.errors.TimeoutError,
        nats.errors.NoRespondersError,
        nats.js.errors.ServiceUnavailableError,
    ) as exc:
        raise NatsUnavailable(f"JetStream did not answer ({type(exc).__name__}): is JetStream enabled?") from exc


async def reconcile_stream(js: JetStreamContext, settings: Settings) -> tuple[StreamInfo, list[str]]:
    """Bring AGENT_CHANGES to what the HTPC needs, leaving every other setting as the operator made it.

    - at least --stream-replicas (an agent may have created it with 1);
    - both subjects (a stream made by an older version captures change records only, not relay writes);
    - a bound on one message (--max-record-bytes) where the stream has none;
    - the retention of --stream-max-age and --stream-max-bytes (the HTPC owns it: snapshots and resync make
      recovery independent of the stream's full history).

    Returns the stream's info afterwards and the changes made (empty: it was as needed).
    """
    info = await stream_info(js)
    config = info.config
    have = config.num_replicas or 1
    want = settings.stream_replicas
    changes: list[str] = []
    if have < want:
        config.num_replicas = want
        changes.append(f"replicas {have} -> {want}")
    missing = [s for s in STREAM_SUBJECTS if s not in (config.subjects or [])]
    if missing:
        config.subjects = [*(config.subjects or []), *missing]
        changes.append(f"subjects + {', '.join(missing)}")
    if not config.max_msg_size or config.max_msg_size < 0:
        config.max_msg_size = settings.max_record_bytes
        changes.append(f"max message size {settings.max_record_bytes} bytes")
    max_age = settings.stream_max_age_s
    if abs((config.max_age or 0.0) - max_age) > 0.5:
        changes.append(f"max age {config.max_age or 0:g}s -> {max_age:g}s")
        config.max_age = max_age
    if max_age > 0 and (config.duplicate_window or 0.0) > max_age:
        # JetStream refuses a duplicate window longer than the age limit.
        changes.append(f"duplicate window {config.duplicate_window:g}s -> {max_age:g}s")
        config.duplicate_window = max_age
    max_bytes = settings.stream_max_bytes
    if (config.max_bytes if config.max_bytes is not None else -1) != max_bytes:
        changes.append(f"max bytes {config.max_bytes} -> {max_bytes}")
        config.max_bytes = max_bytes
    if changes:
        try:
            info = await js.update_stream(config)
        except nats.js.errors.Error as exc:
            raise StreamMisconfigured(
                f"stream {STREAM_NAME} could not be updated ({'; '.join(changes)}): {_refusal(exc, want)}"
            ) from exc
        log.warning("stream %s updated: %s", STREAM_NAME, "; ".join(changes))
    return info, changes


#: JetStream's "no suitable peers for placement": also what a cluster still forming answers for a while.
NO_SUITABLE_PEERS = 10005


async def ensure_stream_named(js: JetStreamContext, replicas: int, *, settle_s: float) -> None:
    """agent_client's `ensure_stream`, with JetStream's refusals as named errors.

    A placement refusal (10005: not enough servers up for `replicas`, e.g. a cluster whose nodes have not all
    joined yet) is retried for `settle_s` seconds, then reported as StreamMisconfigured; any other refusal
    (e.g. replicas > 1 on a single server) at once; no answer from JetStream is NatsUnavailable.
    """
    deadline = time.monotonic() + settle_s
    delay = 0.2
    while True:
        try:
            await ensure_stream(js, replicas=replicas)
            return
        except nats.js.errors.ServiceUnavailableError as exc:
            raise NatsUnavailable(f"JetStream did not answer (is JetStream enabled on the server?): {exc}") from exc
        except nats.js.errors.APIError as exc:
            if exc.err_code == NO_SUITABLE_PEERS and time.monotonic() + delay < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            raise StreamMisconfigured(
                f"stream {STREAM_NAME} could not be created with {replicas} replica(s): {_refusal(exc, replicas)}"
            ) from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise NatsUnavailable(f"no answer from JetStream creating stream {STREAM_NAME}") from exc


async def create_stream(js: JetStreamContext, settings: Settings) -> tuple[StreamInfo, bool, list[str]]:
    """What `replicator serve` does to the stream at start-up: create AGENT_CHANGES if it is missing
    (with --stream-replicas), then `reconcile_stream`. Returns (info, created, changes)."""
    try:
        await stream_info(js)
        existed = True
    except StreamNotFound:
        existed = False
    await ensure_stream_named(js, settings.stream_replicas, settle_s=10.0)
    info, changes = await reconcile_stream(js, settings)
    return info, not existed, changes


async def set_replicas(js: JetStreamContext, replicas: int) -> tuple[StreamInfo, int]:
    """Give the existing AGENT_CHANGES `replicas` replicas (JetStream copies the data to new ones).

    Returns (info after the update, replicas before). StreamMisconfigured when JetStream refuses (a
    single server, fewer servers up than replicas); the stream is then unchanged.
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be 1..{MAX_REPLICAS}, not {replicas}")
    info = await stream_info(js)
    before = info.config.num_replicas or 1
    if before == replicas:
        return info, before
    config = info.config
    config.num_replicas = replicas
    try:
        info = await js.update_stream(config)
    except nats.js.errors.Error as exc:
        raise StreamMisconfigured(f"stream {STREAM_NAME} keeps {before} replica(s): {_refusal(exc, replicas)}") from exc
    log.warning("stream %s updated: replicas %d -> %d", STREAM_NAME, before, replicas)
    return info, before


async def wait_current(js: JetStreamContext, timeout_s: float) -> StreamReport:
    """The stream's report once a leader is elected and every replica is caught up (or when timeout_s
    has passed: the report as it is then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = StreamReport.of(await stream_info(js))
        if report.replicas_current or time.monotonic() >= deadline:
            return report
        await asyncio.sleep(0.2)


def _refusal(exc: BaseException, replicas: int) -> str:
    """JetStream's refusal in an operator's words (its own description kept)."""
    code = getattr(exc, "err_code", None)
    said = getattr(exc, "description", None) or str(exc) or type(exc).__name__
    if code == _NOT_CLUSTERED:
        return (
            f"{replicas} replicas need a NATS cluster of at least {replicas} JetStream servers, and this "
            f"server is not clustered (JetStream: {said})"
        )
    if code in (_NO_PEERS, _INSUFFICIENT_RESOURCES):
        return f"the cluster has fewer than {replicas} JetStream servers up with room for a replica (JetStream: {said})"
    return f"JetStream refused: {said}"


# ------------------------------------------------------------------------------------------ command line
async def _run(
    command: str, settings: Settings, *, replicas: int | None, as_json: bool, wait_s: float, timeout_s: float
) -> str:
    """The text `replicator stream COMMAND` prints."""
    async with jetstream(settings, timeout_s=timeout_s) as js:
        if command == "info":
            report = StreamReport.of(await stream_info(js))
            return report.as_json() if as_json else report.as_table()
        if command == "create":
            _info, created, changes = await create_stream(js, settings)
            report = await wait_current(js, wait_s)
            if as_json:
                return json.dumps({"created": created, "changes": changes, "stream": asdict(report)}, indent=2)
            if created:
                head = f"created stream {STREAM_NAME} with {report.replicas} replica(s)"
            elif changes:
                head = f"stream {STREAM_NAME} exists; updated: {'; '.join(changes)}"
            else:
                head = f"stream {STREAM_NAME} exists and is as the replicator needs it"
            return "\n".join([head, *_not_current(report), "", report.as_table()])
        assert replicas is not None
        _info, before = await set_replicas(js, replicas)
        report = await wait_current(js, wait_s)
        if as_json:
            return json.dumps(
                {"replicas_before": before, "replicas_current": report.replicas_current, "stream": asdict(report)},
                indent=2,
            )
        head = (
            f"stream {STREAM_NAME} already has {before} replica(s)"
            if before == replicas
            else f"stream {STREAM_NAME}: replicas {before} -> {report.replicas}"
        )
        return "\n".join([head, *_not_current(report), "", report.as_table()])


def _not_current(report: StreamReport) -> list[str]:
    if report.replicas_current:
        return []
    return [
        "not every replica is caught up yet (JetStream is copying the data): "
        "`replicator stream info` shows their progress"
    ]


def stream_command(
    command: str,
    settings: Settings,
    *,
    replicas: int | None = None,
    as_json: bool = False,
    wait_s: float = 60.0,
    timeout_s: float = 10.0,
) -> int:
    """`replicator stream info|create|set-replicas`: print the result, return the exit code (errors raise)."""
    text = asyncio.run(_run(command, settings, replicas=replicas, as_json=as_json, wait_s=wait_s, timeout_s=timeout_s))
    print(text)
    return 0
