"""BackendManager's read side: copies of servers, the reports' views, fresh readings, the sweep's state."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gateway.routing.reports import FleetView

if TYPE_CHECKING:
    import threading

    from gateway.fleet.registry import Registry
    from gateway.fleet.resources import Reading
    from gateway.fleet.server import BackendServer
    from gateway.fleet.sweep import HealthJob
    from gateway.routing.admission import Admission
    from gateway.routing.outliers import OutlierDetector
    from gateway.routing.reports import Reports
    from gateway.routing.selection import Selector

log = logging.getLogger("gateway.manager")  # the manager's lines keep the manager's name


class FleetReads:
    """BackendManager's side that hands out copies and views of the fleet, never the fleet itself."""

    # Set by BackendManager.__init__ and configure: the one lock over the fleet, and the parts a read looks at.
    _lock: threading.Lock
    registry: Registry
    selector: Selector
    admission: Admission
    outliers: OutlierDetector
    health_job: HealthJob
    reports: Reports
    health_check_interval: float

    @property
    def stale_after(self) -> float:
        """A reading older than three sweeps is stale and never used for routing."""
        return 3 * self.health_check_interval

    def get_server(self, server_id: str) -> BackendServer | None:
        """A copy of one server, or None."""
        with self._lock:
            server = self.registry.servers.get(server_id)
            return replace(server) if server else None

    def is_registered(self, server_id: str) -> bool:
        """True while `server_id` is in the fleet (no copy made: every proxied request asks)."""
        return server_id in self.registry.servers

    def list_servers(self) -> list[BackendServer]:
        """Copies of all servers in registration order."""
        with self._lock:
            return [replace(server) for server in self.registry.servers.values()]

    def describe_servers(self) -> list[dict[str, Any]]:
        """Every server with its routing state: in flight, ejection, effective weight, models, resources."""
        return self.reports.servers()

    def describe_server(self, server_id: str) -> dict[str, Any] | None:
        """One server as `describe_servers` shows it, or None."""
        return self.reports.server(server_id)

    def model_name_on(self, server_id: str, model: str) -> str | None:
        """The server's own name for `model` when routing by model could send it there, else None."""
        with self._lock:
            return self.selector.name_on(self.registry.servers, server_id, model)

    def model_catalog(self) -> dict[str, list[str]]:
        """Model name -> ids of the servers that can take work for it now (healthy, not draining)."""
        return self.reports.model_catalog()

    def priority_check(self, model: str) -> dict[str, Any]:
        """Which servers would serve `model`, tier by tier, and in what state each is."""
        return self.reports.priority_check(model)

    def priority_overview(self) -> dict[str, Any]:
        """The servers of each tier, how many can take work now, and the models the tier serves."""
        return self.reports.priority_overview()

    def rankings(self) -> list[dict[str, Any]]:
        """Healthy and unhealthy servers by load score, lowest first; those without a fresh reading last."""
        return self.reports.rankings()

    def resource_cache(self) -> dict[str, Any]:
        """Each monitored server's reading: its age, fresh or stale, and the routing decisions that read it."""
        return self.reports.resource_cache()

    def clear_resource_cache(self) -> tuple[int, list[str]]:
        """Drop every reading and read every monitor again now, in the background: how many went, the ids asked."""
        with self._lock:
            cleared = self.registry.readings.clear()
            self.selector.placement.hits.clear()
        log.info("resource cache cleared: %d readings dropped", cleared)
        return cleared, self.health_job.read_monitors_soon()

    def fresh_readings(self) -> dict[str, Reading]:
        """Each server's latest monitor reading that is young enough to route by (see `stale_after`)."""
        with self._lock:
            return self.registry.readings.fresh(self.stale_after)

    def get_status(self) -> dict[str, Any]:
        """The seed's `/webhook/servers` data: counts, job state and every server."""
        return self.reports.status(self.health_check_running)

    @property
    def last_sweep(self) -> dict[str, Any]:
        """When the last sweep began and how long it took (in Redis mode, the leader's, wherever it ran)."""
        here, shared = self.health_job.last_sweep, self.registry.shared_sweep
        return here if here.get("time", "") >= shared.get("time", "") else dict(shared)

    @property
    def health_check_running(self) -> bool:
        """True while the health job is scheduled, which is while any server is registered."""
        return self.health_job.running

    def _view(self) -> FleetView:
        """Under the lock: the parts a report reads, as they are now."""
        servers, in_flight = self.registry.servers, self.admission.in_flight
        return FleetView(servers, in_flight, self.selector, self.outliers, self.registry.readings, self.stale_after)
