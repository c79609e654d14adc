"""A fixed-bucket histogram (Prometheus style): observed on one thread, read as an immutable snapshot.

The agent's publisher times each record from its send to its PubAck with one; the replicator times each agent
transaction from its agent commit to its central commit with another (replicator/histogram.py).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

#: Seconds: from a quarter of a millisecond to 5 min, the range of "agent commit -> central commit" and of
#: "publish -> PubAck". The sub-millisecond buckets show whether the median stays under 1 ms. The agent's commit
#: time comes from SQLite's julianday('now'), which moves in whole milliseconds: a delay is read up to 1 ms long
#: (0.5 ms on average), so the buckets under 1 ms count the delays that are short even with that error against
#: them.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


@dataclass(frozen=True)
class HistogramSnapshot:
    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # per bucket (not cumulative); one more than buckets: the +Inf bucket
    total: float
    count: int

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, cumulative count) pairs, ending with +Inf."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*(f"{b:g}" for b in self.buckets), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: {"count", "sum", "le": {bound: cumulative count}} (what health_check() shows)."""
        return {"count": self.count, "sum": self.total, "le": dict(self.cumulative())}


class Histogram:
    """Counts observations per bucket. One thread observes; others read `snapshot()`."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must be distinct and increasing")
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._total = 0.0
        self._count = 0
        self._lock = threading.Lock()  # a snapshot never sees a count without its sum

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose upper bound (`le`) is >= it."""
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._total += value
            self._count += 1

    def snapshot(self) -> HistogramSnapshot:
        with self._lock:
            return HistogramSnapshot(self.buckets, tuple(self._counts), self._total, self._count)
