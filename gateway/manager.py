"""The fleet: who is registered, who is healthy, who is next. The one owner of that state.

BackendManager holds one lock over the fleet's state and composes the parts that share it: the
Registry (servers, their monitors' readings, and their saves), the Selector, Admission (slots in
flight and the wait queue), the HealthJob (the scheduled sweep), Reports (read-side views) and, in
Redis mode, the ClusterLink. It routes and hands out leases here; its other sides are its bases:
FleetChanges (manager_changes.py: registrations, removals, the operator's options), FleetResults
(manager_results.py: health checks, proxied outcomes and ejections, readings, models found) and
FleetReads (manager_reads.py: copies and views). fleet/records.py holds the rules for a server's record.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any, NamedTuple

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.cluster.slots import SharedSlots
from gateway.fleet.follow import FleetFollower
from gateway.fleet.health import HealthChecker
from gateway.fleet.local_copy import LocalCopy
from gateway.fleet.model_discovery import ModelDiscoverer
from gateway.fleet.monitor_reader import MonitorReader
from gateway.fleet.redis_store import RedisFleetStore
from gateway.fleet.registry import PersistError, Registry
from gateway.fleet.server import BackendServer, now_iso
from gateway.fleet.store import JsonFileStore
from gateway.fleet.sweep import HealthJob
from gateway.manager_changes import FleetChanges
from gateway.manager_cluster import ClusterLink
from gateway.manager_reads import FleetReads
from gateway.manager_results import FleetResults
from gateway.routing.admission import Admission, Lease, NoServer, RouteRequest
from gateway.routing.outliers import OutlierDetector
from gateway.routing.reports import Reports
from gateway.routing.selection import Selector

__all__ = ["BackendManager", "Lease", "NoServer", "PersistError", "Pick", "RouteRequest", "backend_manager"]

log = logging.getLogger(__name__)


class Pick(NamedTuple):
    """A routing decision: the server, or None and whether servers were there but none fit."""

    server: BackendServer | None
    no_fit: bool


class BackendManager(FleetChanges, FleetResults, FleetReads):
    """Keeps the fleet under a lock, saves every change, routes, and runs the health job."""

    def __init__(
        self,
        store: JsonFileStore | RedisFleetStore | None = None,
        *,
        failure_threshold: int = 3,
        health_check_interval: float = 30.0,
        health_checker: HealthChecker | None = None,
    ) -> None:
        self._lock = threading.Lock()  # the one lock over the fleet's state; every part below shares it
        self.registry = Registry(self._lock, on_change=self._changed)
        self.selector = Selector()
        self.admission = Admission(self._lock, self._take)
        self.health_job = HealthJob(self.registry, self)
        self.cluster = ClusterLink(self.registry, OutlierDetector(consecutive_failures=0), self.health_job)
        self.reports = Reports(self._lock, self._view)
        self.queue_timeout = 30.0
        self.queue_max_size = 100
        self.observers: list[Any] = []  # told server_removed(id) and health_checked(results, seconds)
        self.change_listeners: list[Callable[[], None]] = []  # called under the lock after each change: no I/O
        # Check a server at once when `register` adds it, moves it, or hears from it while it is
        # unhealthy (tests that do not look at health switch it off, as they set the sweep an hour apart).
        self.check_on_register = True
        self.configure(store, failure_threshold, health_check_interval, health_checker)

    def configure(
        self,
        store: JsonFileStore | RedisFleetStore | None,
        failure_threshold: int = 3,
        health_check_interval: float = 30.0,
        health_checker: HealthChecker | None = None,
        monitor_reader: MonitorReader | None = None,
        model_discoverer: ModelDiscoverer | None = None,
    ) -> None:
        """Set where state is saved and how health is checked; call before `load`."""
        self.store = store
        self.failure_threshold = failure_threshold
        self.health_check_interval = health_check_interval
        self.health_checker = health_checker
        self.monitor_reader = monitor_reader
        self.model_discoverer = model_discoverer

    @property
    def store(self) -> JsonFileStore | RedisFleetStore | None:
        """Where the server list is saved; None keeps it in memory."""
        return self.registry.store

    @store.setter
    def store(self, store: JsonFileStore | RedisFleetStore | None) -> None:
        self.registry.store = store

    @property
    def outliers(self) -> OutlierDetector:
        """Passive ejection of failing servers; kept by the ClusterLink, which shares ejections in Redis mode."""
        return self.cluster.outliers

    @outliers.setter
    def outliers(self, outliers: OutlierDetector) -> None:
        self.cluster.outliers = outliers

    @property
    def routing_policy(self) -> str:
        """round_robin, least_connections, least_load or prefix."""
        return self.selector.policy

    @routing_policy.setter
    def routing_policy(self, policy: str) -> None:
        self.selector.policy = policy

    @property
    def load_weights(self) -> dict[str, float]:
        """The weights of the load score (least_load)."""
        return self.selector.load_weights

    @load_weights.setter
    def load_weights(self, weights: dict[str, float]) -> None:
        self.selector.load_weights = dict(weights)

    # -- routing -------------------------------------------------------------------------

    def get_next_server(self, exclude: frozenset[str] | set[str] = frozenset()) -> BackendServer | None:
        """The next healthy server by the routing policy (skipping `exclude`), or None."""
        return self.pick_server(exclude).server

    def pick_server(self, exclude: Collection[str] = frozenset(), required_bytes: int | None = None) -> Pick:
        """Choose a server without holding a slot on it; say when servers were up but none fit."""
        with self._lock:
            try:
                server, _ = self._take(RouteRequest(required_bytes=required_bytes), exclude)
            except NoServer as exc:
                return Pick(None, exc.code == "no_fit")
            return Pick(server, False)

    def acquire(
        self, route: RouteRequest, exclude: Collection[str] = frozenset(), timeout: float | None = None
    ) -> Lease:
        """A slot on the server chosen for `route`; waits in the queue while all are at their cap.

        Raises NoServer when none can take it, the queue is full, or `timeout` (default
        QUEUE_TIMEOUT) passes first.
        """
        timeout = self.queue_timeout if timeout is None else timeout
        return self.admission.acquire(route, exclude, timeout, self.queue_max_size)

    def hold(self, server_id: str) -> Lease:
        """A slot on a given server, cap or not: a request for a task it owns must go there."""
        with self._lock:
            server = self.registry.servers.get(server_id)
            lease = Lease(None, None, None) if server is None else self.admission.hold(replace(server))
        self.admission.take_shared(lease)  # outside the lock; counted across processes, never refused
        return lease

    @property
    def shared_slots(self) -> SharedSlots | None:
        """Where max_concurrent is counted across processes (REDIS_URL); None counts in this one."""
        return self.admission.shared_slots

    @shared_slots.setter
    def shared_slots(self, slots: SharedSlots | None) -> None:
        self.admission.shared_slots = self.reports.shared_slots = slots

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot now."""
        return len(self.admission.waiters)

    def release_lease(self, lease: Lease) -> None:
        """Free a lease's slot once, and hand it to the first queued request that can use it."""
        self.admission.release_lease(lease)

    def _take(self, route: RouteRequest, exclude: Collection[str]) -> tuple[BackendServer, str | None]:
        """Under the lock: the Selector's choice for `route`, stamped as used, as a copy; and the model's name."""
        fresh = self.routing_policy == "least_load" or self.selector.placement.places(route)
        readings = self.registry.readings.fresh(self.stale_after) if fresh else {}
        servers = self.registry.servers
        server_id, actual_model = self.selector.choose(
            servers, route, exclude, self.admission.in_flight, self.outliers.ejected_ids(), readings
        )
        server = servers[server_id]
        server.last_used_time = now_iso()
        return copy.copy(server), actual_model  # a shallow copy, as replace() makes, without re-running __init__

    # -- the fleet's state ---------------------------------------------------------------

    def _changed(self) -> None:
        """Under the lock, after every change: rebuild the routing state and serve the queue."""
        self.selector.rebuild(self.registry.servers.values())
        if self.admission.waiters:
            self.admission.dispatch_waiters()
        for listener in self.change_listeners:  # the job dispatcher: a server came, or came back
            listener()

    def load(self, local_copy: LocalCopy | None = None) -> None:
        """Restore the fleet from the store, with its health state; it takes traffic at once.

        In Redis mode, `local_copy` is the host's copy of the fleet, taken while Redis does not answer.
        """
        if self.store is None:
            return
        try:
            self.registry.load()
        except RedisUnavailable:
            if local_copy is None or (snapshot := self.cluster.take_copy(local_copy)) is None:
                log.error("starting with no servers: Redis did not answer; the fleet loads as soon as it does")
            else:
                log.error(
                    "Redis did not answer: routing to the %d servers of %s (fleet version %d) until it does",
                    len(snapshot.records), local_copy.path, snapshot.version,
                )  # fmt: skip
        self.health_job.sync()

    # -- Redis mode ----------------------------------------------------------------------

    def share(self, redis: Redis, local_copy: LocalCopy | None = None) -> None:
        """Follow the cluster's fleet in Redis, and take part in the leader election for the sweep; after `load`.

        `local_copy`, when given, is kept up with each fleet read, for a process that starts while Redis is down.
        """
        self.cluster.share(redis, self.health_check_interval, local_copy)

    def cluster_state(self) -> dict[str, Any]:
        """Where the fleet is kept, and in Redis mode whether Redis answers and which process sweeps."""
        return self.cluster.state()

    @property
    def follower(self) -> FleetFollower | None:
        """Redis mode: what keeps this copy up with the cluster's; None until `share`."""
        return self.cluster.follower

    # -- the health job ------------------------------------------------------------------

    def run_health_sweep(self) -> None:
        """Check every server once, in parallel, and apply the results. The job's body."""
        self.health_job.run()

    def shutdown(self) -> None:
        """Stop the scheduler, the checker's threads and the shared slots' renewer; give up the leader lease."""
        self.cluster.stop()
        self.health_job.shutdown()
        if self.shared_slots is not None:
            self.shared_slots.close()


# The default instance the seed imports: `from backend_manager import backend_manager`.
# It holds nothing until `create_app()` configures and loads it.
backend_manager = BackendManager()
