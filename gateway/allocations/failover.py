"""Failure recovery: the keys of a server that left, or stayed down too long, move by their own strategy.

The watcher is one of BackendManager's observers. `server_removed` hears of an unregistration
made in this process; `health_checked` follows each sweep, which in Redis mode runs only in the
leader, so only the leader fails keys over for the cluster. It also finds keys left on a server
another process unregistered: one missing from the fleet at two sweeps in a row (not one, as a
server registered a moment ago elsewhere may not be in this process's copy yet). The moves run
in a thread of their own: each may wait on ALLOCATION_MIGRATE_URL, and neither an unregistration's
answer nor the sweep should.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from gateway.allocations.service import AllocationService, down_for
from gateway.cluster.connection import RedisUnavailable

log = logging.getLogger(__name__)


class FailoverWatcher:
    """Hears of departures and sweeps, and moves the keys of the servers gone or down for `after` seconds."""

    def __init__(self, service: AllocationService, after: float, leads: Callable[[], bool] = lambda: True) -> None:
        self.service = service
        self.after = after
        self.leads = leads  # Redis mode: whether this process holds the sweep's leader lease
        self._lock = threading.Lock()
        self._pending: dict[str, str] = {}  # server id -> why its keys move
        self._missing: set[str] = set()  # servers holding keys that were not in the fleet at the last sweep
        self._running = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """True while failovers wait or run."""
        with self._lock:
            return self._running or bool(self._pending)

    # -- what the manager tells --------------------------------------------------------------

    def server_removed(self, server_id: str) -> None:
        """A server was unregistered here: its keys move now (in the leader, in Redis mode)."""
        if self.leads():
            self.soon({server_id: "was unregistered"})

    def health_checked(self, results: list[Any], seconds: float) -> None:
        """A sweep ended (in the leader): move the keys of servers gone, or unhealthy for over `after` seconds."""
        try:
            holders = self.service.store.counts()
        except RedisUnavailable:  # logged by Redis.call; the next sweep looks again
            return
        servers = {server.server_id: server for server in self.service.manager.list_servers()}
        due: dict[str, str] = {}
        missing = set()
        for server_id in holders:
            server = servers.get(server_id)
            if server is None:
                missing.add(server_id)
                if server_id in self._missing:
                    due[server_id] = "is no longer registered"
            elif not server.is_healthy and down_for(server) >= self.after:
                due[server_id] = f"has been unhealthy for over {self.after:g}s"
        self._missing = missing
        self.soon(due)

    # -- the moves, in a thread of their own -------------------------------------------------

    def soon(self, due: dict[str, str]) -> None:
        """Fail these servers' keys over in the background; returns at once."""
        if not due:
            return
        with self._lock:
            if self._stopped:
                return
            self._pending.update(due)
            if self._running:
                return  # the running thread takes them next
            self._running = True
        try:
            self._thread = threading.Thread(target=self._run, name="allocation-failover", daemon=True)
            self._thread.start()
        except RuntimeError as exc:  # no thread to be had: the next sweep tries again
            with self._lock:
                self._running = False
            log.warning("could not start the allocation failover: %s; the next sweep tries again", exc)

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._pending or self._stopped:
                    self._running = False
                    return
                server_id, why = self._pending.popitem()
            try:
                self.service.fail_over(server_id, why)
            except Exception:  # the thread must end cleanly whatever happens; the next sweep tries again
                log.exception("failover of server %s's allocations failed", server_id)

    def stop(self, timeout: float = 5.0) -> None:
        """Take no more failovers, and give the one running up to `timeout` seconds to end its server."""
        with self._lock:
            self._stopped = True
            self._pending.clear()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
