"""Capped exponential backoff with jitter: the one retry pace of every reconnect and retry loop."""

from __future__ import annotations

import random


class Backoff:
    """Delays `initial`, `2*initial`, ... up to `maximum`, each scaled by a random factor in [1-jitter, 1+jitter).

    `next()` gives the next delay; `reset()` starts over after a success.
    """

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, *, jitter: float = 0.5) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._delay = initial

    def next(self) -> float:
        delay = self._delay
        self._delay = min(self._delay * 2, self.maximum)
        if self.jitter:
            delay *= 1.0 - self.jitter + 2 * self.jitter * random.random()
        return delay

    def reset(self) -> None:
        self._delay = self.initial
