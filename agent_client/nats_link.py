"""One NATS connection per agent that finds its server and never gives up.

The NATS URL comes from the constructor or is learned from the HTPC's
`/relay/info`. With neither reachable the agent keeps working locally; this
link retries with capped exponential backoff, and once connected nats-py's
own reconnect logic takes over (forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

import httpx
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from .backoff import Backoff

log = logging.getLogger("agent_client.nats")


def reconnecting_options(url: str, name: str) -> dict[str, Any]:
    """The nats.connect options both ends use: every server of a comma-separated list, reconnect forever,
    and notice a dead link within ~15 s (ping every 5 s, three missed)."""
    return {
        "servers": [u.strip() for u in url.split(",") if u.strip()],
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": 5,
        "max_outstanding_pings": 3,
    }


class NatsLink:
    def __init__(
        self,
        *,
        nats_url: str | None,
        htpc_url: str | None,
        name: str,
        connect_options: dict[str, Any] | None = None,
        http_verify: bool | ssl.SSLContext = True,
    ) -> None:
        self.nats_url = nats_url
        self.htpc_url = htpc_url.rstrip("/") if htpc_url else None
        self.name = name
        self.connect_options = connect_options or {}
        self.http_verify = http_verify
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.last_error: str | None = None
        self._connected = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._on_connect: list[Any] = []
        self._listeners: list[Callable[[], None]] = []
        #: bumped on every disconnect: a publish made before it may have been lost with the old socket
        self.generation = 0

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def connected_url(self) -> str | None:
        """The URL of the server the client is connected to right now (None while disconnected)."""
        nc = self.nc
        url = nc.connected_url if nc is not None else None
        return url.geturl() if url is not None else None

    @property
    def servers(self) -> list[str]:
        """Every server URL the client knows (given or discovered from the cluster); empty before connecting."""
        return [u.geturl() for u in self.nc.servers] if self.nc is not None else []

    def on_first_connect(self, callback: Any) -> None:
        """Register `async callback(nc)` run once the connection is first made (subscriptions persist)."""
        self._on_connect.append(callback)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the loop whenever the link connects, disconnects or reconnects.

        The publisher sleeps until something happens (it does not poll): a (re)connection is one such thing.
        """
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in self._listeners:
            try:
                callback()
            except Exception as exc:  # a listener's bug must not break the link
                log.warning("link listener failed: %r", exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._connect_loop(), name=f"nats-link-{self.name}")

    async def wait_connected(self, timeout: float | None = None) -> tuple[NATS, JetStreamContext]:
        await asyncio.wait_for(self._connected.wait(), timeout)
        assert self.nc is not None and self.js is not None
        return self.nc, self.js

    async def _discover(self) -> str | None:
        if self.nats_url:
            return self.nats_url
        if not self.htpc_url:
            self.last_error = "no nats_url given and no htpc_url to learn it from"
            return None
        try:
            async with httpx.AsyncClient(timeout=3.0, verify=self.http_verify) as client:
                resp = await client.get(f"{self.htpc_url}/relay/info")
                resp.raise_for_status()
                url = resp.json().get("nats_url")
        except (httpx.HTTPError, ValueError) as exc:
            self.last_error = f"cannot learn the NATS URL from {self.htpc_url}/relay/info: {exc!r}"
            return None
        if not isinstance(url, str) or not url:
            self.last_error = f"{self.htpc_url}/relay/info gave no nats_url"
            return None
        return url

    async def _connect_loop(self) -> None:
        backoff = Backoff()
        while not self._closing:
            url = await self._discover()
            if url is not None:
                try:
                    nc = await nats.connect(
                        **reconnecting_options(url, self.name),
                        # No client-side buffer while reconnecting: publishes fail fast and the change
                        # log is the only buffer. nats-py would otherwise replay records published during
                        # an outage on reconnect, ahead of an earlier record lost with the old socket.
                        pending_size=0,
                        error_cb=self._on_error,
                        disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                        **self.connect_options,
                    )
                except Exception as exc:  # nats raises several unrelated types for "not reachable"
                    self.last_error = f"cannot connect to NATS at {url}: {exc!r}"
                    log.debug("%s", self.last_error)
                else:
                    self.nc, self.js = nc, nc.jetstream()
                    self.last_error = None
                    for callback in self._on_connect:
                        try:
                            await callback(nc)
                        except Exception as exc:
                            log.warning("on-connect hook failed: %r", exc)
                    self._connected.set()
                    self._changed()
                    log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else url)
                    return
            await asyncio.sleep(backoff.next())

    async def _on_error(self, exc: Exception) -> None:
        self.last_error = f"NATS: {exc!r}"
        log.debug("nats error: %r", exc)

    async def _on_disconnected(self) -> None:
        self.generation += 1
        log.debug("nats disconnected")
        self._changed()

    async def _on_reconnected(self) -> None:
        self.last_error = None
        log.debug("nats reconnected")
        self._changed()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 2.0)
            with contextlib.suppress(Exception):
                await self.nc.close()
        self._connected.clear()
