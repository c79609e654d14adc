"""`replicator serve`: the service and its relay API under uvicorn, until SIGTERM/SIGINT.

The HTTP port is bound before anything else starts (and the bound sockets are
handed to uvicorn), so a port in use is said plainly and nothing was started.
`run_serve` runs it on uvloop where uvloop is installed (uvicorn[standard]
brings it): the consumer's NATS traffic and the relay API cost a fifth less
CPU on it than on the standard event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvicorn

from ._http_guard import http_limits, protocol_class, raise_open_files_limit, tls_context
from .errors import ReplicatorError
from .relay_api import create_app
from .service import ReplicatorService
from .settings import Settings

#: Connections the kernel may queue for accept(): deep, so that under a flood a new client waits its turn
#: instead of having its SYN dropped (a retry a second later); asyncio still accepts `backlog` at a time.
_LISTEN_QUEUE = 2048


class PortInUse(ReplicatorError):
    """The HTTP port is taken by another process."""

    code = "port_in_use"


class CannotListen(ReplicatorError):
    """The HTTP address cannot be listened on (not this machine's, a privileged port, ...)."""

    code = "cannot_listen"


def bind_http(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of `host` at `port` (as uvicorn would bind them), not yet listening.

    Raises PortInUse or CannotListen with a sentence an operator can act on.
    """
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}; check --host") from None
    bound: list[socket.socket] = []
    try:
        for family, kind, proto, address in dict.fromkeys((i[0], i[1], i[2], i[4]) for i in infos):
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise PortInUse(
                        f"port {port} on {host} is in use by another process; pick another with --port"
                    ) from None
                raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port") from None
            # not inheritable: a child (the embedded nats-server) must never hold the HTTP port
    except BaseException:
        for sock in bound:
            sock.close()
        raise
    return bound


class _Server(uvicorn.Server):
    # We handle SIGTERM/SIGINT ourselves so that the service drains after uvicorn stops.
    #: Called first when uvicorn starts shutting down: it then waits for every open response (live change feed
    #: streams never end by themselves), and the app is told nothing else.
    on_shutdown: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.on_shutdown is not None:
            self.on_shutdown()
        await super().shutdown(sockets)

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
    sockets = bind_http(settings.host, settings.port)
    port = sockets[0].getsockname()[1]
    service = ReplicatorService(settings)
    try:
        await service.start()
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    try:
        config = uvicorn.Config(
            create_app(service),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            log_config=None,  # uvicorn's records go through setup_logging's logfmt handler
            lifespan="off",
            # httptools, pinned: the request deadline, header cap, connection cap and TLS live in this subclass
            http=protocol_class(limits, tls),
            ws="none",  # no WebSocket routes; an upgrade would leave the connection's limits behind
            backlog=limits.backlog,
        )
        server = _Server(config)
        server.on_shutdown = service.end_streams
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        scheme = "https" if tls else "http"
        print(
            f"replicator: serving {scheme}://{settings.host}:{port} "
            f"(NATS {service.nats_url}{', embedded' if service.embedded else ''}; data {settings.data_dir}; "
            f"auth {'on' if service.auth else 'off'}; HTTP: {limits.max_connections} connections, "
            f"{limits.request_timeout_s:g} s per request, headers {limits.max_header_bytes} B)",
            flush=True,
        )
        await server.serve(sockets=sockets)
    finally:
        await service.stop()
        for sock in sockets:
            sock.close()
    print("replicator: stopped", flush=True)


def run_serve(settings: Settings) -> None:
    """`replicator serve` until SIGTERM/SIGINT, on uvloop when it is installed (else asyncio's own loop).

    With the relay API over HTTPS (`--tls-cert`) it runs on asyncio's own loop: the connection guard's bounded
    TLS handshake (`loop.start_tls` on an accepted connection, _http_guard.py) does not complete on uvloop.
    """
    if settings.tls_cert is not None:
        asyncio.run(serve(settings))
        return
    _run_fast(serve(settings))


def _run_fast(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # not on every platform: the standard loop does the same work, more slowly
        asyncio.run(main)
        return
    uvloop.run(main)
