"""Settings of `replicator serve`, from flags or `REPLICATOR_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from .data_dir import DataDir

KIB = 1024
MIB = 1024 * KIB


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"REPLICATOR_{name}", default)


class Settings(BaseModel):
    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    nats_url: str | None = None  # external server/cluster; None = run an embedded nats-server
    nats_host: str = "127.0.0.1"  # embedded server's listen address
    nats_port: int | None = None  # embedded server's port (default: 4222 if free, else remembered/free)
    nats_advertise: str | None = None  # URL given to agents at /relay/info
    durable: str = Field("replicator", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    stream_replicas: int = Field(1, ge=1, le=5)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    max_batch_records: int = Field(1000, ge=1)
    query_max_rows: int = Field(10_000, ge=1)
    query_timeout_ms: int = Field(2_000, ge=10)
    # Isolation limits: what one agent, token or query may take (README "Security": threat model and limits).
    max_record_bytes: int = Field(8 * MIB, ge=64 * KIB)  # one message in the stream (stream max_msg_size)
    max_agent_bytes: int = Field(1024 * MIB, ge=MIB)  # one agent's central copy (SQLite max_page_count)
    max_held_per_agent: int = Field(100_000, ge=10)  # records of one agent remembered while one is missing
    dead_letter_payload_bytes: int = Field(64 * KIB, ge=0)  # bytes of a dead letter's payload kept
    dead_letters_per_agent: int = Field(1_000, ge=1)  # dead letters kept per agent (oldest pruned)
    query_max_result_bytes: int = Field(16 * MIB, ge=KIB)  # one /relay/query answer, encoded
    query_max_value_bytes: int = Field(1 * MIB, ge=KIB)  # a value a query's functions may produce
    query_max_concurrent: int = Field(2, ge=1)  # queries one principal may run at once
    query_pool_size: int = Field(16, ge=1)  # pooled read-only connections (each holds open files)
    http_request_timeout_s: float = Field(10.0, gt=0)  # a client must send its headers and body within this
    http_max_header_bytes: int = Field(16 * KIB, ge=KIB)  # request line + headers
    http_max_connections: int = Field(900, ge=10)  # open HTTP connections at once
    # live /relay/changes subscribers (SSE streams, long-polls); each is also one of http_max_connections
    feed_max_subscribers: int = Field(600, ge=1)
    # Recovery and bounded disk (README "Operations": runbook, retention, snapshots, backup).
    stream_max_age_s: float = Field(7 * 86_400.0, ge=0)  # AGENT_CHANGES keeps a message this long (0: for ever)
    stream_max_bytes: int = Field(-1, ge=-1)  # AGENT_CHANGES holds at most this many bytes (-1: no bound)
    snapshot_interval_s: float = Field(3_600.0, ge=0)  # seconds between central store snapshots (0: never)
    snapshots_keep: int = Field(3, ge=1)  # snapshots kept (the oldest pruned)
    rebuild_backups_keep: int = Field(2, ge=0)  # rebuild-backup-* directories kept
    stuck_after_s: float = Field(30.0, gt=0)  # behind the stream and not moving this long: degraded
    resync_after_s: float = Field(60.0, gt=0)  # a missing change not arrived after this long: resync the agent
    default_agent_id: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")  # relay writes naming none
    log_level: str = "warning"
    auth: str = Field("auto", pattern="^(auto|on|off)$")  # auto: on unless the API binds loopback only
    nats_seed_file: Path | None = None  # the replicator's nkey seed for an external, secured NATS
    tls_cert: Path | None = None  # relay API over HTTPS
    tls_key: Path | None = None
    nats_tls_cert: Path | None = None  # embedded nats-server TLS
    nats_tls_key: Path | None = None
    nats_tls_ca: Path | None = None  # CA that signed the NATS server certificate (client side)

    @property
    def data(self) -> DataDir:
        """The data directory's layout (every path the HTPC keeps)."""
        return DataDir(self.data_dir)

    @property
    def auth_enabled(self) -> bool:
        if self.auth == "auto":
            return self.host not in ("127.0.0.1", "localhost", "::1")
        return self.auth == "on"
