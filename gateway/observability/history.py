"""The last 15 minutes of proxied requests, per server and for the fleet, in fixed 10 s buckets, for the dashboard.

Each series is one flat array of BUCKETS slots; a slot holds the request count, the errors
and a latency histogram of the 10 s whose index it last saw, and is zeroed lazily when the
clock comes round to it again. Recording a request is O(1) and allocates nothing: no list,
no tuple, no object per request, so the proxy's hot path does not feel it.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

BUCKET_SECONDS = 10
BUCKETS = 90  # 15 minutes
# The upper bounds of the latency histogram, in seconds: those of gateway_request_duration_seconds.
LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
COUNT, ERRORS, FIRST_BIN = 0, 1, 2  # a slot's fields; the histogram's bins follow, the last one past 300 s
SLOT = FIRST_BIN + len(LATENCY_BOUNDS) + 1
MAX_SERIES = 10_000  # servers come and go; past this many the newest go uncharted rather than unbounded
FLEET = "fleet"


class Series:
    """One server's (or the fleet's) buckets: one flat array of BUCKETS slots, and the bucket index each holds."""

    __slots__ = ("indexes", "slots")

    def __init__(self) -> None:
        self.slots = array("I", bytes(4 * BUCKETS * SLOT))  # 4 bytes a count: 6.5 KiB a server
        self.indexes = array("q", [-1]) * BUCKETS

    def add(self, index: int, latency_bin: int, error: bool) -> None:
        """Count one request in the bucket of `index` (10 s since the clock's zero)."""
        slot = index % BUCKETS
        base = slot * SLOT
        slots = self.slots
        if self.indexes[slot] != index:  # the clock came round: this slot held a bucket 15 minutes old
            self.indexes[slot] = index
            for offset in range(base, base + SLOT):
                slots[offset] = 0
        slots[base] += 1
        if error:
            slots[base + ERRORS] += 1
        slots[base + FIRST_BIN + latency_bin] += 1

    def bucket(self, index: int) -> tuple[int, int, list[int]]:
        """Count, errors and latency bins of the bucket of `index`; zeros once it has been overwritten or never was."""
        slot = index % BUCKETS
        if self.indexes[slot] != index:
            return 0, 0, [0] * (SLOT - FIRST_BIN)
        base = slot * SLOT
        values = self.slots[base : base + SLOT].tolist()
        return values[COUNT], values[ERRORS], values[FIRST_BIN:]


class RequestHistory:
    """Recent requests by server: request rate, error rate and p95 latency for each 10 s of the last 15 minutes.

    Writes are not locked: under gevent nothing preempts them, and with threads a lost
    increment only blurs a chart. Reads copy one bucket at a time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.fleet = Series()
        self._series: dict[str, Series] = {}

    def record(self, server: str, status: int, seconds: float) -> None:
        """Count one request that ended now; a 5xx (the server's, or the gateway's 502/503/504) is an error."""
        index = int(self.clock() // BUCKET_SECONDS)
        latency_bin = bisect_left(LATENCY_BOUNDS, seconds)  # Prometheus's `le`: 0.005 s falls in the first bin
        error = status >= 500
        self.fleet.add(index, latency_bin, error)
        series = self._series.get(server)
        if series is None:
            if len(self._series) >= MAX_SERIES:
                return
            series = self._series[server] = Series()
        series.add(index, latency_bin, error)

    def forget(self, server: str) -> None:
        """Drop a server's buckets (it left); the fleet's keep its requests."""
        self._series.pop(server, None)

    def charts(self, server: str) -> dict[str, list[Any]]:
        """`server`'s (or, for FLEET, the fleet's) last BUCKETS buckets, oldest first, as the dashboard draws them.

        `rps`: requests per second. The current bucket's is over the last 10 s: its requests
        so far and the share of the previous bucket's that falls in that window (the sliding
        window estimate), so that it neither drops to zero as a bucket begins nor jumps.
        `error_rate`: the share of a bucket's requests that were errors; `p95_s`: the 95th
        percentile of their latency in seconds, interpolated within its histogram bin as
        Prometheus's histogram_quantile does. Both are null for a bucket without requests:
        no data, not zero.
        """
        series = self.fleet if server == FLEET else self._series.get(server)
        now = self.clock()
        current = int(now // BUCKET_SECONDS)
        left_of_previous = 1.0 - (now - current * BUCKET_SECONDS) / BUCKET_SECONDS
        rps: list[float] = []
        error_rate: list[float | None] = []
        p95: list[float | None] = []
        previous = 0
        for index in range(current - BUCKETS + 1, current + 1):
            count, errors, bins = series.bucket(index) if series is not None else (0, 0, [])
            in_window = count + previous * left_of_previous if index == current else count
            rps.append(round(in_window / BUCKET_SECONDS, 3))
            previous = count
            error_rate.append(round(errors / count, 4) if count else None)
            p95.append(round(quantile(0.95, bins), 6) if count else None)
        return {"rps": rps, "error_rate": error_rate, "p95_s": p95}


def quantile(q: float, bins: list[int]) -> float:
    """The q-quantile of a histogram with LATENCY_BOUNDS, linear within its bin; past the last bound, that bound."""
    rank, seen = q * sum(bins), 0
    for position, count in enumerate(bins):
        if count and seen + count >= rank:
            if position == len(LATENCY_BOUNDS):
                return float(LATENCY_BOUNDS[-1])
            low = LATENCY_BOUNDS[position - 1] if position else 0.0
            return low + (LATENCY_BOUNDS[position] - low) * (rank - seen) / count
        seen += count
    return float(LATENCY_BOUNDS[-1])
