"""The apply-delay histogram (agent commit -> central commit): agent_client's fixed-bucket `Histogram`.

One home for the histogram (agent_client/histogram.py, also timing the agent's publishes); `DELAY_BUCKETS` are
its buckets, from a quarter of a millisecond to 5 min.
"""

from __future__ import annotations

from agent_client import LATENCY_BUCKETS, Histogram, HistogramSnapshot

DELAY_BUCKETS: tuple[float, ...] = LATENCY_BUCKETS

__all__ = ["DELAY_BUCKETS", "Histogram", "HistogramSnapshot"]
