"""`replicator serve`: the service and its relay API under uvicorn, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import uvicorn

from ._http_guard import http_limits, protocol_class, raise_open_files_limit, tls_context
from .relay_api import create_app
from .service import ReplicatorService
from .settings import Settings

#: Connections the kernel may queue for accept(): deep, so that under a flood a new client waits its turn
#: instead of having its SYN dropped (a retry a second later); asyncio still accepts `backlog` at a time.
_LISTEN_QUEUE = 2048


class _Server(uvicorn.Server):
    # We handle SIGTERM/SIGINT ourselves so that the service drains after uvicorn stops.
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                # asyncio passes one number as both listen() depth and accept batch; deepen the former.
                with socket.socket(fileno=os.dup(sock.fileno())) as listener:
                    listener.listen(max(_LISTEN_QUEUE, self.config.backlog))


async def serve(settings: Settings) -> None:
    limits = http_limits(
        settings.http_request_timeout_s,
        settings.http_max_header_bytes,
        settings.http_max_connections,
        open_files=raise_open_files_limit(),
    )
    tls = tls_context(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
    service = ReplicatorService(settings)
    await service.start()
    try:
        config = uvicorn.Config(
            create_app(service),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            # httptools, pinned: the request deadline, header cap, connection cap and TLS live in this subclass
            http=protocol_class(limits, tls),
            ws="none",  # no WebSocket routes; an upgrade would leave the connection's limits behind
            backlog=limits.backlog,
        )
        server = _Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        scheme = "https" if tls else "http"
        print(
            f"replicator: serving {scheme}://{settings.host}:{settings.port} "
            f"(NATS {service.nats_url}{', embedded' if service.embedded else ''}; data {settings.data_dir}; "
            f"auth {'on' if service.auth else 'off'}; HTTP: {limits.max_connections} connections, "
            f"{limits.request_timeout_s:g} s per request, headers {limits.max_header_bytes} B)",
            flush=True,
        )
        await server.serve()
    finally:
        await service.stop()
    print("replicator: stopped", flush=True)
