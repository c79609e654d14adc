"""subscribe(): one table of one agent as an async iterator of feed events, over `GET /relay/changes` (SSE).

`FeedSubscription` opens a Server-Sent Events stream (change_feed.py is the wire format) and yields
`FeedSchema`, `Change`, `UpToDate` and `MustRefetch`. It reconnects by itself, with backoff, when the HTPC is
down or the stream drops, and resumes from the last transaction boundary it delivered, so across a reconnect
no change is ever yielded twice nor skipped:

- a live transaction's changes are held until its `last` change arrived and are then yielded together; a
  stream that drops in the middle of one loses only what was never yielded, and the resumed stream sends the
  whole transaction again;
- a snapshot's rows are yielded as they arrive (a table can be larger than memory); a snapshot cut short is
  reported as `MustRefetch` (the reset event: what was yielded since the `FeedSchema` is void) and a new
  snapshot follows;
- `MustRefetch` from the HTPC resets the offset: the iterator starts over from a snapshot on its own.

HTTP 409 is a must-refetch too; any other 4xx raises `FeedError` (status and the relay API's error code: e.g.
403 `table_not_visible`); 5xx and network errors are retried. `aclose()` (or cancelling the task iterating it)
closes the HTTP stream. While idle a subscription holds one socket and no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from .agent_id import validate_agent_id
from .backoff import Backoff
from .change_feed import Change, FeedEvent, FeedOffset, FeedProtocolError, FeedSchema, MustRefetch, UpToDate
from .change_feed import decode_feed_message as _decode
from .errors import FeedError, InvalidIdentifier, StorageClosed
from .identifiers import is_valid_identifier

log = logging.getLogger("agent_client.subscription")

__all__ = ["FEED_READ_TIMEOUT_S", "FeedSubscription", "SSEDecoder", "SSEMessage", "SubscriptionState"]

#: A live stream with nothing read for this long is taken as dead (the HTPC sends a keep-alive every 15 s).
FEED_READ_TIMEOUT_S = 45.0
#: One SSE line longer than this is a broken stream (a row is at most a few 16 MiB values).
MAX_LINE_BYTES = 64 * 1024 * 1024

SubscriptionState = Literal["connecting", "snapshot", "catching_up", "live", "disconnected", "closed"]

_SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class SSEMessage:
    """One dispatched Server-Sent Event."""

    event: str
    data: bytes
    id: str | None


class SSEDecoder:
    """Incremental Server-Sent Events parser (the WHATWG rules this feed needs): lines end with CRLF, LF or CR;
    `:` starts a comment (keep-alive); `event`, `data` (joined with LF), `id`; a blank line dispatches."""

    def __init__(self) -> None:
        self._buf = b""
        self._event = ""
        self._data: list[bytes] = []
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[SSEMessage]:
        buf = self._buf + chunk if self._buf else chunk
        out: list[SSEMessage] = []
        if b"\r" not in buf:
            lines = buf.split(b"\n")
            self._buf = lines.pop()
            for line in lines:
                self._line(line, out)
        else:
            start, n = 0, len(buf)
            while True:
                i_n = buf.find(b"\n", start)
                i_r = buf.find(b"\r", start)
                if i_r != -1 and (i_n == -1 or i_r < i_n):
                    if i_r == n - 1:  # maybe the first half of a CRLF split across chunks
                        break
                    end, start_next = i_r, i_r + 2 if buf[i_r + 1 : i_r + 2] == b"\n" else i_r + 1
                elif i_n != -1:
                    end, start_next = i_n, i_n + 1
                else:
                    break
                self._line(buf[start:end], out)
                start = start_next
            self._buf = buf[start:]
        if len(self._buf) > MAX_LINE_BYTES:
            raise FeedProtocolError(f"an event stream line longer than {MAX_LINE_BYTES} bytes")
        return out

    def _line(self, line: bytes, out: list[SSEMessage]) -> None:
        if not line:
            if self._data:
                out.append(SSEMessage(self._event or "message", b"\n".join(self._data), self._id))
            self._event, self._data = "", []
            return
        if line[:1] == b":":
            return
        name, sep, value = line.partition(b":")
        if sep and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id" and b"\0" not in value:
            self._id = value.decode("utf-8", "replace")


class _Reconnect(Exception):
    """The stream ended or broke: connect again (after a backoff delay unless `at_once`)."""

    def __init__(self, reason: str, *, at_once: bool = False) -> None:
        super().__init__(reason)
        self.at_once = at_once


def _error_body(body: bytes) -> tuple[str | None, str]:
    try:
        obj: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, body[:200].decode("utf-8", "replace")
    if isinstance(obj, dict):
        code = obj.get("error") if isinstance(obj.get("error"), str) else None
        message = obj.get("message") or obj.get("reason") or obj.get("detail") or code or ""
        return code, str(message)
    if isinstance(obj, list) and obj and isinstance(obj[0], dict) and obj[0].get("control") == "must-refetch":
        return "must_refetch", str(obj[0].get("reason") or "")
    return None, body[:200].decode("utf-8", "replace")


class FeedSubscription:
    """An async iterator of one agent table's feed events; see the module doc.

    `offset` is where to start (None: a snapshot first). After each transaction boundary it holds the offset
    to resume from; `state`, `last_error`, `up_to_date_at` and `connects` describe the stream for health
    reports.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        agent_id: str,
        table: str,
        *,
        offset: str | None = None,
        live: bool = True,
        backoff: Backoff | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.agent_id = validate_agent_id(agent_id)
        if not is_valid_identifier(table):
            raise InvalidIdentifier(f"invalid table name {table!r}")
        if offset is not None:
            FeedOffset.parse(offset)
        self.table = table
        self.offset = offset
        self.live = live
        self.state: SubscriptionState = "connecting"
        self.last_error: str | None = None
        self.up_to_date_at: float | None = None
        self.connects = 0
        self._client = client
        self._url = f"{base_url.rstrip('/')}/relay/changes"
        self._backoff = backoff or Backoff(0.2, 5.0)
        self._timeout = httpx.Timeout(connect_timeout, read=FEED_READ_TIMEOUT_S)
        self._closing = False
        self._stop = asyncio.Event()
        self._gen = self._events()

    def __aiter__(self) -> FeedSubscription:
        return self

    async def __anext__(self) -> FeedEvent:
        if self._closing:
            raise StopAsyncIteration
        event = await self._gen.__anext__()
        if self._closing:  # aclose() was called from another task meanwhile
            await self._gen.aclose()
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        """Stop: closes the HTTP stream (also what cancelling the iterating task does).

        Called while another task is iterating, that task's iteration ends at its next event (a reconnect
        delay is cut short); cancel that task to end it at once."""
        self._closing = True
        self._stop.set()
        if getattr(self._gen, "ag_running", False):  # another task is inside the iterator now
            return
        await self._gen.aclose()
        self.state = "closed"

    def _params(self) -> dict[str, str]:
        params = {"agent": self.agent_id, "table": self.table}
        if self.offset is not None:
            params["offset"] = self.offset
        if self.live:
            params["live"] = "true"
        return params

    async def _events(self) -> AsyncGenerator[FeedEvent, None]:
        while True:
            if self._client.is_closed:
                self.state = "closed"
                raise StorageClosed("the HTTP client of this subscription is closed (its AgentStorage was closed)")
            self.state = "connecting"
            stream = self._one_stream()
            try:
                async for event in stream:
                    yield event
                    if isinstance(event, UpToDate) and not self.live:
                        self.state = "closed"
                        return
                raise _Reconnect("the HTPC ended the stream")
            except _Reconnect as exc:
                reason, at_once = str(exc), exc.at_once
            except (httpx.HTTPError, FeedProtocolError, OSError) as exc:
                reason, at_once = f"{type(exc).__name__}: {exc}", False
            finally:
                await stream.aclose()
            self.state = "disconnected"
            if not at_once:
                self.last_error = reason
                delay = self._backoff.next()
                log.debug("feed %s.%s: %s; reconnecting in %.2fs", self.agent_id, self.table, reason, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            if self._closing:
                self.state = "closed"
                return

    async def _one_stream(self) -> AsyncGenerator[FeedEvent, None]:
        """The events of one HTTP stream; raises _Reconnect (or an HTTP error) when it must be opened again.

        A snapshot cut short yields MustRefetch before the error propagates (see the module doc)."""
        snapshot_open = False
        try:
            async with self._client.stream(
                "GET", self._url, params=self._params(), headers=_SSE_HEADERS, timeout=self._timeout
            ) as resp:
                if resp.status_code == 409:  # must-refetch in JSON mode
                    _code, reason = _error_body(await resp.aread())
                    async for event in self._refetch(reason or "the offset cannot be continued"):
                        yield event
                if resp.status_code >= 400:
                    code, message = _error_body(await resp.aread())
                    if resp.status_code < 500:
                        raise FeedError(
                            f"the HTPC refused the feed of {self.agent_id}.{self.table} ({resp.status_code}"
                            f"{' ' + code if code else ''}): {message}",
                            status=resp.status_code,
                            code=code,
                        )
                    raise _Reconnect(f"HTTP {resp.status_code} {code or ''}: {message}".strip())
                ctype = resp.headers.get("content-type", "")
                if not ctype.startswith("text/event-stream"):
                    raise FeedError(
                        f"the HTPC answered {ctype or 'no content type'} instead of an event stream for "
                        f"{self._url} (is it a replicator with /relay/changes?)",
                        status=resp.status_code,
                        code="not_an_event_stream",
                    )
                self.connects += 1
                self.state = "catching_up"
                decoder = SSEDecoder()
                pending: list[Change] = []
                async for chunk in resp.aiter_bytes():
                    for msg in decoder.feed(chunk):
                        event = _decode(msg.data)
                        if isinstance(event, FeedSchema):
                            if event.table != self.table or pending:
                                raise FeedProtocolError(f"unexpected schema message for {event.table!r}")
                            snapshot_open = True
                            self.state = "snapshot"
                            yield event
                        elif isinstance(event, Change):
                            if event.table != self.table:
                                raise FeedProtocolError(f"a change of table {event.table!r} in {self.table}'s feed")
                            if snapshot_open:
                                if event.last:
                                    snapshot_open = False
                                    self.offset = event.offset
                                yield event
                            elif not event.last:
                                pending.append(event)
                            else:
                                batch, pending = pending, []
                                for change in batch:
                                    yield change
                                self.offset = event.offset
                                self._backoff.reset()
                                yield event
                        elif isinstance(event, UpToDate):
                            if pending:
                                raise FeedProtocolError("up-to-date in the middle of a transaction")
                            snapshot_open = False
                            self.offset = event.offset
                            self.state = "live" if self.live else "catching_up"
                            self.up_to_date_at = time.time()
                            self.last_error = None
                            self._backoff.reset()
                            yield event
                        else:
                            snapshot_open = False
                            async for out in self._refetch(event.reason):
                                yield out
                raise _Reconnect("the HTPC ended the stream")
        except BaseException as exc:
            if snapshot_open and not isinstance(exc, GeneratorExit | asyncio.CancelledError | FeedError):
                self.offset = None
                yield MustRefetch(f"the snapshot was interrupted ({type(exc).__name__}); starting over")
            raise

    async def _refetch(self, reason: str) -> AsyncGenerator[FeedEvent, None]:
        had_offset = self.offset is not None
        self.offset = None
        self.state = "connecting"
        yield MustRefetch(reason)
        # at once the first time; a must-refetch to a request without offset would loop: back off then
        raise _Reconnect(f"must-refetch: {reason}", at_once=had_offset)


#: An offset no feed has: the HTPC checks the agent, the table and its visibility, then answers must-refetch.
_PROBE_OFFSET = "0000000000000000_0"


async def probe_feed(client: httpx.AsyncClient, base_url: str, agent_id: str, table: str, *, timeout: float) -> bool:
    """Ask the HTPC whether `agent_id.table`'s feed may be read, without reading any of it.

    Raises FeedError when the HTPC refuses it (4xx other than 409); returns False when the HTPC cannot be
    reached (nothing is known), True when it may be read.
    """
    try:
        resp = await client.get(
            f"{base_url.rstrip('/')}/relay/changes",
            params={"agent": agent_id, "table": table, "offset": _PROBE_OFFSET},
            headers={"Accept": "application/json"},
            timeout=timeout,
        )
    except httpx.HTTPError:
        return False
    if 400 <= resp.status_code < 500 and resp.status_code != 409:
        code, message = _error_body(resp.content)
        raise FeedError(
            f"the HTPC refused the feed of {agent_id}.{table} ({resp.status_code}{' ' + code if code else ''}): "
            f"{message}",
            status=resp.status_code,
            code=code,
        )
    return resp.status_code < 500
