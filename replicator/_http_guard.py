"""Connection limits of the relay API's HTTP server: uvicorn's httptools protocol with deadlines and a cap.

* A client has `request_timeout_s` to deliver a request (line, headers and body), counted from the moment
  the connection is ready for one: accepted (TLS: the handshake included), or its previous response sent.
  A request cut in its headers is answered 408; a connection that sent nothing is closed. The clock stops
  while the server works on a request or has paused reading, so a slow handler never costs the client.
* A client that reads none of its response for `request_timeout_s` (the send buffer stays full) is cut.
* A request line and headers (trailers included) over `max_header_bytes` get 431 before any handler runs.
* At most `max_connections` are open. At the cap a new connection closes the one that has waited longest
  for its client (idle, trickling or in its TLS handshake); only when every connection is being served is
  the newcomer refused (503). A flood of idle or slow connections cannot keep a fresh request out.
* The cap and the listener's backlog are sized to fit the open-files limit (raised to its hard value), so
  accepting never fails for want of a file descriptor.

TLS is done here (`loop.start_tls` once the TCP connection is counted), not by the listener, so that a
connection that never finishes its handshake is counted, evictable and bounded by the same deadline.

A response's head and body go out in one send (`_Coalescing`): uvicorn writes them separately, and with
TCP_NODELAY that is two segments, two system calls and two wake-ups of the client for every small answer.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import resource
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from .errors import ReplicatorError, error_body

log = logging.getLogger("replicator.http")

#: Open files kept for everything but HTTP connections (central copies, query pool, NATS, logs): at least
#: this many, or a quarter of the limit, whichever is more.
_RESERVED_FILES = 256
#: asyncio accepts up to `backlog` connections per wake-up and counts them a loop turn or two later: this many
#: batches may be open before the cap closes anything. A batch is a quarter of the cap, so that a connection
#: whose request is on its way is never pushed out by those accepted after it in the same few turns.
_BATCHES_IN_FLIGHT = 3
_BATCH_SHARE = 4
#: Requests one connection may have waiting behind the one being answered (HTTP pipelining). uvicorn parses
#: a whole read at once and queues every request in it, so without a bound one connection queues millions.
_MAX_PIPELINED = 32
#: After an error answer, how long a connection may finish sending before it is closed: closing with unread
#: bytes makes the kernel reset the connection, and the client could lose the answer.
_LINGER_S = 0.5
#: How often the counts of connections cut are logged (one line per interval at most).
_LOG_INTERVAL_S = 10.0


class TlsSetupError(ReplicatorError):
    """The relay API's certificate or key cannot be loaded."""

    code = "tls_setup_failed"


@dataclass(frozen=True)
class HttpLimits:
    """What HTTP connections may take: settings `http_request_timeout_s`, `http_max_header_bytes` and
    `http_max_connections` (lowered to fit the open-files limit), and the listener's accept backlog."""

    request_timeout_s: float
    max_header_bytes: int
    max_connections: int
    backlog: int


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit in force after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_limits(request_timeout_s: float, max_header_bytes: int, max_connections: int, open_files: int) -> HttpLimits:
    """The limits in force: the connection cap and the accept batch (cap + batches in flight) fitted into
    `open_files`, less what the rest of the process needs."""
    room = open_files - max(_RESERVED_FILES, open_files // 4)
    fit = room * _BATCH_SHARE // (_BATCH_SHARE + _BATCHES_IN_FLIGHT)
    cap = max(10, min(max_connections, fit))
    backlog = max(8, min(2048, cap // _BATCH_SHARE))
    if cap < max_connections:
        log.warning("http: at most %d connections (not %d) within %d open files", cap, max_connections, open_files)
    return HttpLimits(request_timeout_s, max_header_bytes, cap, backlog)


def tls_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    """A server context for the relay API (the ssl module's defaults for serving clients)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError(f"cannot load --tls-cert {cert} / --tls-key {key}: {exc}") from None
    return context


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; uvicorn then calls `send_400_response`."""


class _Registry:
    """The open connections of one server, and those waiting for their client, longest-waiting first."""

    def __init__(self, limits: HttpLimits, tls: ssl.SSLContext | None) -> None:
        self.limits = limits
        self.tls = tls
        self.open: set[GuardedHttpProtocol] = set()
        self.lingering = 0  # connections answered with an error, closing softly
        self.waiting: collections.OrderedDict[GuardedHttpProtocol, None] = collections.OrderedDict()
        self.cut: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()
        self._flush: asyncio.TimerHandle | None = None

    def admit(self, conn: GuardedHttpProtocol) -> bool:
        """Count `conn` in, making room by closing the longest-waiting connection; False when none waits."""
        if len(self.open) >= self.limits.max_connections:
            if not self.waiting:
                return False
            next(iter(self.waiting)).evict()
        self.open.add(conn)
        return True

    def forget(self, conn: GuardedHttpProtocol) -> None:
        self.open.discard(conn)
        self.waiting.pop(conn, None)

    def note(self, why: str, loop: asyncio.AbstractEventLoop) -> None:
        """Count a connection cut for `why`; the counts are logged once per interval."""
        self.cut[why] += 1
        self._pending[why] += 1
        if self._flush is None:
            self._flush = loop.call_later(_LOG_INTERVAL_S, self._log)

    def _log(self) -> None:
        self._flush = None
        what = ", ".join(f"{n} {why}" for why, n in sorted(self._pending.items()))
        self._pending.clear()
        log.warning(
            "http: connections cut in the last %.0fs: %s (limits: %gs per request, headers %d B, %d connections)",
            _LOG_INTERVAL_S,
            what,
            self.limits.request_timeout_s,
            self.limits.max_header_bytes,
            self.limits.max_connections,
        )


#: Writes up to this size are held until the end of the loop step (to go out with what follows them).
_COALESCE_BYTES = 64 * 1024


class _Coalescing(asyncio.Transport):
    """A transport that holds one small write until the next one, and sends them together.

    uvicorn writes a response's head, then (in the same step of the same task) its body: the body's write
    sends both, at once. A write with nothing after it goes out at the end of the loop step. Anything
    larger than `_COALESCE_BYTES` goes out at once (after what is held); close, write_eof and abort keep
    their order with the writes (the held bytes first; abort drops them).
    """

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.inner = inner
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        held = self._held
        if held is not None:
            self._held = None
            self.inner.write(held + bytes(data) if len(data) <= _COALESCE_BYTES else held)
            if len(data) > _COALESCE_BYTES:
                self.inner.write(data)
            return
        if len(data) > _COALESCE_BYTES:
            self.inner.write(data)
            return
        self._held = bytes(data)
        self._loop.call_soon(self.flush)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.inner.is_closing():
            self.inner.write(held)

    def write_eof(self) -> None:
        self.flush()
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def close(self) -> None:
        self.flush()
        self.inner.close()

    def abort(self) -> None:
        self._held = None
        self.inner.abort()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size() + (len(self._held) if self._held is not None else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request deadline, a header-size cap, a connection cap and TLS.

    Use `protocol_class(limits, tls)`: each server gets a subclass bound to its own registry.
    """

    registry: _Registry

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = self.registry.limits
        self._socket: asyncio.BaseTransport | None = None  # the TCP transport (under TLS, until it is wrapped)
        self._handshake: asyncio.Task[None] | None = None
        self._early: list[bytes] = []  # decrypted bytes that arrived with the handshake, before start_tls returned
        self._deadline: asyncio.TimerHandle | None = None  # the client's turn to send runs out
        self._write_deadline: asyncio.TimerHandle | None = None  # the client has not read for too long
        self._in_head = False  # between a request's first byte and the end of its headers
        self._in_message = False  # between a request's first byte and its end
        self._head_seen = 0  # url and header bytes the parser handed over since the request began
        self._head_raw = 0  # bytes of whole reads that fell inside the unfinished head
        self._refusal: str | None = None  # why a parser callback stopped the parser
        self._lingering = False  # answered with an error; the rest of the request is discarded
        self._begun_in_read = 0  # requests the parser began during the current read
        self._had_request = False

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._socket is None:  # the TCP connection: count it in first
            self._socket = transport
            if not self.registry.admit(self):
                self.registry.note("refused (every connection busy)", self.loop)
                if self.registry.tls is None:
                    super().connection_made(transport)
                    self._reply(503, "too_many_connections", "every HTTP connection is busy; retry shortly")
                else:
                    transport.abort()
                return
            if self.registry.tls is not None:  # the handshake is the client's turn too (start_tls bounds it)
                self.registry.waiting[self] = None
                self._handshake = self.loop.create_task(self._start_tls(transport))
                return
        super().connection_made(transport)
        self.transport = _Coalescing(transport, self.loop)  # uvicorn's cycles write through it (FlowControl not)
        self._sync()
        early, self._early = self._early, []
        for data in early:
            if not self.transport.is_closing():
                self.data_received(data)

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        assert self.registry.tls is not None
        try:
            wrapped = await self.loop.start_tls(
                transport,
                self,
                self.registry.tls,
                server_side=True,
                ssl_handshake_timeout=self._limits.request_timeout_s,
            )
        except Exception as exc:  # refused, timed out, evicted, reset: whatever a hostile client makes of it
            if self in self.registry.open:
                self.registry.note(f"TLS handshake failed ({type(exc).__name__})", self.loop)
            self.registry.forget(self)
            transport.abort()
            return
        finally:
            self._handshake = None
        if self not in self.registry.open or wrapped is None:  # evicted while the handshake finished
            transport.abort()
            return
        self.registry.waiting.pop(self, None)  # a fresh period for the request
        self.connection_made(wrapped)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering:
            self._lingering = False
            self.registry.lingering -= 1
        self._disarm()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None
        self.registry.forget(self)
        if self.transport is not None:  # uvicorn's part ran (not a TLS connection lost in its handshake)
            super().connection_lost(exc)

    def evict(self) -> None:
        """Close this connection (it waits for its client) to make room for a new one."""
        self.registry.note("evicted at the connection cap", self.loop)
        self._disarm()
        self.registry.forget(self)
        if self.transport is not None:
            self.transport.close()
        elif self._socket is not None:  # still in its TLS handshake: start_tls fails and cleans up
            self._socket.close()

    def eof_received(self) -> None:
        if self._lingering:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if self.transport is None:  # TLS: the request came with the handshake; start_tls has not returned yet
            self._early.append(data)
            return
        head_open, idle = self._in_head, not self._in_message
        self._begun_in_read = 0
        super().data_received(data)  # parser callbacks below run here; a refusal answers and closes
        if self._lingering or self.transport.is_closing():
            return
        if self._in_head and ((head_open and self._begun_in_read == 0) or (idle and self._begun_in_read == 1)):
            # The head is still unfinished and this whole read belongs to it (it began before the read, or
            # the read began with it): the parser holds a partial header it has not handed over yet.
            self._head_raw += len(data)
            if self._head_raw > self._limits.max_header_bytes:
                self._refusal = "headers too large"
                self.send_400_response("")
                return
        self._sync()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_head = self._had_request = True
        self._begun_in_read += 1
        self._head_seen = self._head_raw = 0

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if len(self.pipeline) > _MAX_PIPELINED:
            self._refusal = "too many pipelined requests"
            raise _Refused

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def _count_head(self, size: int) -> None:
        self._head_seen += size
        if max(self._head_seen, self._head_raw) > self._limits.max_header_bytes:
            self._refusal = "headers too large"
            raise _Refused

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            self.registry.note("invalid requests (400)", self.loop)
            super().send_400_response(msg)
            return
        self.registry.note(self._refusal, self.loop)
        if self._refusal == "too many pipelined requests":  # answers are on their way: ours would garble them
            self.transport.abort()
        elif self._in_head:
            limit = self._limits.max_header_bytes
            self._reply(431, "headers_too_large", f"request line and headers over {limit} bytes")
        else:  # oversized trailers: a handler already has the request, so no answer of ours
            self.transport.close()

    # ------------------------------------------------------------------ writing
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_deadline is None:
            self._write_deadline = self.loop.call_later(self._limits.request_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_expired(self) -> None:
        self._write_deadline = None
        if not self.transport.is_closing():
            self.registry.note("not reading the response", self.loop)
        self.transport.abort()  # its buffer would never drain

    # ------------------------------------------------------------------ the client's deadline
    def _serving(self) -> bool:
        """A request arrived whole and its response is not finished: the server's turn, not the client's."""
        cycle = self.cycle
        return cycle is not None and not cycle.more_body and not cycle.response_complete

    def _sync(self) -> None:
        if self._lingering:
            return
        if self.transport.is_closing() or self._serving():
            self._disarm()
        elif self._deadline is None:
            self._deadline = self.loop.call_later(self._limits.request_timeout_s, self._expired)
            self.registry.waiting[self] = None

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self.registry.waiting.pop(self, None)

    def _expired(self) -> None:
        self._deadline = None
        self.registry.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        if self._serving() or self.flow.read_paused:  # the server holds things up: a fresh period
            self._sync()
            return
        if self._in_head:
            self.registry.note("request not received in time", self.loop)
            timeout = self._limits.request_timeout_s
            self._reply(408, "request_timeout", f"request line and headers not received within {timeout:g}s")
            return
        if self._in_message:
            self.registry.note("request not received in time", self.loop)
        elif not self._had_request:
            self.registry.note("no request sent", self.loop)
        self.transport.close()  # (an idle keep-alive connection is simply closed)

    def _reply(self, status: int, code: str, message: str) -> None:
        """Answer with a JSON error (the API's `{"error", "message"}`) and close softly."""
        body = json.dumps(error_body(code, message), separators=(",", ":")).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.registry.lingering >= self._limits.backlog:  # many at once: no time to be nice
            self.transport.close()
            return
        # Half-close, discard what the client still sends, close on its EOF or after _LINGER_S.
        self._disarm()
        self._lingering = True
        self.registry.lingering += 1
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(_LINGER_S, self.transport.close)


class _OnePerRequestWarnings(logging.Filter):
    """Drops uvicorn's warning for each invalid request: a client could fill the log with them; the registry
    counts them in its periodic line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "Invalid HTTP request received."


def protocol_class(limits: HttpLimits, tls: ssl.SSLContext | None = None) -> type[GuardedHttpProtocol]:
    """A protocol class for uvicorn's `http=` option, with its own registry of connections."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OnePerRequestWarnings) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(_OnePerRequestWarnings())

    class _Bound(GuardedHttpProtocol):
        pass

    _Bound.registry = _Registry(limits, tls)
    return _Bound
