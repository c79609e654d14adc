"""Consistent snapshots of the central store, taken while serving; restore and rebuild start from one.

SKELETON (issue 10): filled in by the snapshot/backup work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from .data_dir import DataDir


class Snapshots:
    def __init__(
        self,
        data: DataDir,
        ack_floor: Callable[[], Awaitable[int | None]],
        *,
        interval_s: float,
        keep: int,
    ) -> None:
        self.data = data
        self._ack_floor = ack_floor
        self.interval_s = interval_s
        self.keep = keep
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="snapshots")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def take(self, dest: Path | None = None) -> Path:
        raise NotImplementedError

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
