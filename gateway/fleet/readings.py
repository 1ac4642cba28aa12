"""The latest report of each server's monitor, and which of them are fresh enough to route by."""

from __future__ import annotations

import time
from typing import Any

from gateway.fleet.resources import Reading


class Readings:
    """Each server's latest monitor reading; the fleet's lock (BackendManager's) guards it."""

    def __init__(self) -> None:
        self._latest: dict[str, Reading] = {}

    def keep(self, server_id: str, reading: Reading) -> None:
        """Make `reading` the server's latest."""
        self._latest[server_id] = reading

    def keep_newer(self, server_id: str, reading: Reading) -> None:
        """Make `reading` the server's latest unless the one kept is newer (Redis mode: another process's)."""
        kept = self._latest.get(server_id)
        if kept is None or kept.received < reading.received:
            self._latest[server_id] = reading

    def latest(self) -> dict[str, Reading]:
        """Every server's latest reading (a copy of the map)."""
        return dict(self._latest)

    def server_ids(self) -> set[str]:
        """The servers that have a reading."""
        return set(self._latest)

    def clear(self) -> int:
        """Drop every reading (POST /admin/resource-cache/clear); how many there were."""
        count = len(self._latest)
        self._latest.clear()
        return count

    def forget(self, server_id: str) -> None:
        """Drop the server's reading: the server left, or its monitor changed."""
        self._latest.pop(server_id, None)

    def fresh(self, stale_after: float) -> dict[str, Reading]:
        """The readings younger than `stale_after` seconds."""
        oldest = time.monotonic() - stale_after
        return {server_id: r for server_id, r in self._latest.items() if r.received >= oldest}

    def summary(self, server_id: str, now: float, stale_after: float) -> dict[str, Any] | None:
        """The server's reading as /webhook/servers shows it, or None."""
        reading = self._latest.get(server_id)
        return reading.summary(now, stale_after) if reading else None
