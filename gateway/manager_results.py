"""BackendManager's intake of what is learnt of servers: health checks, proxied outcomes, readings, models."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from gateway.fleet import records
from gateway.fleet.health import HealthResult
from gateway.fleet.records import Transition
from gateway.fleet.server import now_iso

if TYPE_CHECKING:
    import threading

    from gateway.fleet.registry import Registry
    from gateway.fleet.resources import Reading
    from gateway.manager_cluster import ClusterLink
    from gateway.routing.outliers import OutlierDetector
    from gateway.routing.selection import Selector

log = logging.getLogger("gateway.manager")  # the manager's lines keep the manager's name
health_log = logging.getLogger("gateway.health")


class FleetResults:
    """BackendManager's side that applies results: the sweep's and the proxy's, ejections among them."""

    # Set by BackendManager.__init__ and configure: the one lock over the fleet, and the parts a result touches.
    _lock: threading.Lock
    registry: Registry
    selector: Selector
    outliers: OutlierDetector
    cluster: ClusterLink
    failure_threshold: int

    def report_result(self, server_id: str, ok: bool, detail: str = "") -> None:
        """Count a proxied request's outcome (a failure is a 5xx or a broken connection) for ejection."""
        if ok:
            self.outliers.record_success(server_id)
            return
        seconds = self.outliers.record_failure(server_id)
        if seconds is not None:
            health_log.warning("server %s ejected for %gs after consecutive failures: %s", server_id, seconds, detail)
            self.cluster.share_ejection(server_id)

    def report_failure(self, server_id: str, url: str, reason: str) -> None:
        """Count a failed connection from the proxy as a failed health check."""
        self.apply_health_results([HealthResult(server_id, url, False, f"proxy: {reason}")], checked=False)

    def apply_health_results(self, results: list[HealthResult], checked: bool = True, fence: str = "") -> None:
        """Apply check results; a server re-registered since its check began is left alone.

        In Redis mode `fence` is the leader's token, when the sweep is the leader's.
        """
        now = now_iso()
        transitions: list[Transition] = []
        restored = []
        with self._lock:
            for result in results:
                server = self.registry.servers.get(result.server_id)
                if server is None or server.url != result.url:
                    continue
                if checked and result.ok and self.outliers.restore(server.server_id):
                    restored.append(server.server_id)
                    self.selector.came_back(server.server_id)
                    transitions.append(
                        Transition(server.server_id, None, "back from ejection: the health check passed")
                    )
                transition = records.count_check(server, result, self.failure_threshold, now, checked)
                if transition is not None:
                    if transition.healthy:
                        self.selector.came_back(server.server_id)
                    transitions.append(transition)
            # Only a change of health must be durable at once (it changes routing after a
            # restart); a fail count on its way to the threshold goes out with the next save.
            health_changed = [t.server_id for t in transitions if t.healthy is not None]
            version = self.registry.changed(*health_changed) if health_changed else None
        records.log_transitions(transitions, self.failure_threshold)
        if version is not None:
            self.registry.try_persist(version, fence)
        for server_id in restored:
            self.cluster.share_ejection(server_id)

    def apply_readings(self, readings: list[tuple[str, str, Reading]], fence: str = "") -> None:
        """Keep each (server_id, monitor_url, reading) whose server still has that monitor (shared after the sweep)."""
        self.registry.keep_readings(readings)

    def apply_discovered(self, found: list[tuple[str, str, list[str]]]) -> None:
        """Keep each (server_id, url, models) found by discovery whose server is still at that url."""
        changed, version = self.registry.discover(found)
        if changed:
            log.info("models discovered on %s", ", ".join(changed))
            self.registry.try_persist(version)

    def apply_loaded(self, found: list[tuple[str, str, list[tuple[str, int]] | None]]) -> None:
        """Keep what each (server_id, url) has in memory, as its /api/ps said (None: it did not answer)."""
        changed, version = self.registry.keep_loaded(found)
        if changed:
            log.debug("loaded models changed on %s", ", ".join(changed))
            self.registry.try_persist(version)
