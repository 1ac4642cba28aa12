"""Passive outlier ejection, as Envoy does it: servers that keep failing proxied calls sit out a while."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_NONE_EJECTED: tuple[frozenset[str], float] = (frozenset(), math.inf)


@dataclass
class _Record:
    """What the detector knows of one server."""

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float | None = None
    back_since: float | None = None  # when it last came back from an ejection


class OutlierDetector:
    """Ejects a server after N consecutive proxy failures, for base seconds times its ejection count, capped."""

    def __init__(
        self,
        consecutive_failures: int = 5,
        base_seconds: float = 30.0,
        max_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consecutive_failures = consecutive_failures  # 0 disables ejection
        self.base_seconds = base_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._records: dict[str, _Record] = {}
        # (ejected ids, earliest end of their timers), replaced whole so readers need no lock.
        self._snapshot = _NONE_EJECTED

    def record_success(self, server_id: str) -> None:
        """Reset the server's count of consecutive failures."""
        record = self._records.get(server_id)
        # Most calls succeed with nothing to reset: skip the lock on that hot path.
        if record is None or not record.consecutive_failures:
            return
        with self._lock:
            record.consecutive_failures = 0

    def record_failure(self, server_id: str) -> float | None:
        """Count a failure; return the ejection's length in seconds if this failure ejects the server."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            record = self._records.setdefault(server_id, _Record())
            if record.ejected_until is not None:
                return None  # already out: more failures neither extend nor repeat the ejection
            if record.back_since is not None and now - record.back_since >= self.max_seconds:
                record.ejections = 0  # it has behaved for long enough to start afresh
            record.consecutive_failures += 1
            if not self.consecutive_failures or record.consecutive_failures < self.consecutive_failures:
                return None
            record.ejections += 1
            seconds = min(self.base_seconds * record.ejections, self.max_seconds)
            record.ejected_until = now + seconds
            self._refresh_snapshot()
            return seconds

    def is_ejected(self, server_id: str) -> bool:
        """Say whether the server's ejection timer is running."""
        return server_id in self.ejected_ids()

    def ejected_ids(self) -> frozenset[str]:
        """Return the ids of the servers ejected now."""
        ids, next_end = self._snapshot
        if not ids or self._clock() < next_end:
            return ids
        with self._lock:
            self._expire(self._clock())
            return self._snapshot[0]

    def restore(self, server_id: str) -> bool:
        """End the server's ejection now, as a passing health check does; say if it was ejected."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            record = self._records.get(server_id)
            if record is None or record.ejected_until is None:
                return False
            self._bring_back(record, now)
            self._refresh_snapshot()
            return True

    def forget(self, server_id: str) -> None:
        """Drop all state of a server that left the fleet."""
        with self._lock:
            record = self._records.pop(server_id, None)
            if record is not None and record.ejected_until is not None:
                self._refresh_snapshot()

    def ejection_ends(self, server_id: str) -> tuple[float, int] | None:
        """When the server's ejection ends (a Unix time) and how many it has had; None when not ejected."""
        with self._lock:
            record = self._records.get(server_id)
            if record is None or record.ejected_until is None:
                return None
            return time.time() + (record.ejected_until - self._clock()), record.ejections

    def adopt(self, ejections: dict[str, tuple[float, int]]) -> None:
        """Take the cluster's ejections (Redis mode): each server out until its Unix time, and no others."""
        with self._lock:
            now, wall = self._clock(), time.time()
            for server_id, record in self._records.items():
                if record.ejected_until is not None and server_id not in ejections:
                    self._bring_back(record, now)  # another process's health check brought it back
            for server_id, (ends, count) in ejections.items():
                if ends <= wall:
                    continue
                record = self._records.setdefault(server_id, _Record())
                record.ejected_until = now + (ends - wall)
                record.ejections = max(record.ejections, count)
            self._refresh_snapshot()

    def describe(self, server_id: str) -> dict[str, Any]:
        """Return the server's ejection state for status pages."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            record = self._records.get(server_id, _Record())
            ejected_until = record.ejected_until
            return {
                "ejected": ejected_until is not None,
                "seconds_left": None if ejected_until is None else ejected_until - now,
                "ejections": record.ejections,
                "consecutive_failures": record.consecutive_failures,
            }

    def _expire(self, now: float) -> None:
        """Bring back every server whose timer has run out; call with the lock held."""
        ids, next_end = self._snapshot
        if not ids or now < next_end:
            return
        for server_id in ids:
            record = self._records[server_id]
            if record.ejected_until is not None and record.ejected_until <= now:
                # It came back when its timer ended, however late we notice.
                self._bring_back(record, record.ejected_until)
        self._refresh_snapshot()

    @staticmethod
    def _bring_back(record: _Record, when: float) -> None:
        """End one ejection, keeping its count so the next one is longer."""
        record.ejected_until = None
        record.back_since = when
        record.consecutive_failures = 0

    def _refresh_snapshot(self) -> None:
        """Rebuild the lock-free snapshot of ejected ids; call with the lock held."""
        ends = {server_id: r.ejected_until for server_id, r in self._records.items() if r.ejected_until is not None}
        self._snapshot = (frozenset(ends), min(ends.values())) if ends else _NONE_EJECTED
