"""Settings of `replicator serve`, from flags or `REPLICATOR_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field

from .data_dir import DataDir


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
