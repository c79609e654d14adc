"""`replicator serve`: the service and its relay API under uvicorn, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal

import uvicorn

from .relay_api import create_app
from .service import ReplicatorService
from .settings import Settings


class _Server(uvicorn.Server):
    # We handle SIGTERM/SIGINT ourselves so that the service drains after uvicorn stops.
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()


async def serve(settings: Settings) -> None:
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
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        )
        server = _Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        scheme = "https" if settings.tls_cert else "http"
        print(
            f"replicator: serving {scheme}://{settings.host}:{settings.port} "
            f"(NATS {service.nats_url}{', embedded' if service.embedded else ''}; data {settings.data_dir}; "
            f"auth {'on' if service.auth else 'off'})",
            flush=True,
        )
        await server.serve()
    finally:
        await service.stop()
    print("replicator: stopped", flush=True)
