"""The fleet: who is registered, who is healthy, who is next. The one owner of that state.

BackendManager holds one lock over the fleet's state and composes the parts that share it: the
Registry (servers, their monitors' readings, and their saves), the Selector, Admission (slots in
flight and the wait queue), the HealthJob (the scheduled sweep) and Reports (read-side views). It
makes the changes routing must know of, and fleet/records.py holds the rules for a server's record.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any, NamedTuple

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.cluster.leader import LeaderLease
from gateway.cluster.slots import SharedSlots
from gateway.fleet import records
from gateway.fleet.follow import FleetFollower
from gateway.fleet.health import HealthChecker, HealthResult, Target
from gateway.fleet.model_discovery import ModelDiscoverer
from gateway.fleet.monitor_reader import MonitorReader
from gateway.fleet.records import Registrant, Registration, Transition
from gateway.fleet.redis_store import RedisFleetStore, Snapshot
from gateway.fleet.registry import Change, PersistError, Registry, StaleCopy
from gateway.fleet.resources import Reading
from gateway.fleet.server import BackendServer, now_iso
from gateway.fleet.store import JsonFileStore
from gateway.fleet.sweep import HealthJob
from gateway.routing.admission import Admission, Lease, NoServer, RouteRequest
from gateway.routing.outliers import OutlierDetector
from gateway.routing.reports import FleetView, Reports
from gateway.routing.selection import Selector

__all__ = ["BackendManager", "Lease", "NoServer", "PersistError", "Pick", "RouteRequest", "backend_manager"]

log = logging.getLogger(__name__)
health_log = logging.getLogger("gateway.health")


class Pick(NamedTuple):
    """A routing decision: the server, or None and whether servers were there but none fit."""

    server: BackendServer | None
    no_fit: bool


class BackendManager:
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
        self.outliers = OutlierDetector(consecutive_failures=0)
        self.health_job = HealthJob(self.registry, self)
        self.reports = Reports(self._lock, self._view)
        self.queue_timeout = 30.0
        self.queue_max_size = 100
        self.observers: list[Any] = []  # told server_removed(id) and health_checked(results, seconds)
        self.change_listeners: list[Callable[[], None]] = []  # called under the lock after each change: no I/O
        # Check a server at once when `register` adds it, moves it, or hears from it while it is
        # unhealthy (tests that do not look at health switch it off, as they set the sweep an hour apart).
        self.check_on_register = True
        self.follower: FleetFollower | None = None  # Redis mode: keeps this copy up with the cluster's
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

    @property
    def stale_after(self) -> float:
        """A reading older than three sweeps is stale and never used for routing."""
        return 3 * self.health_check_interval

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
        fresh = (
            route.required_bytes is not None
            or self.routing_policy == "least_load"
            or (route.model is not None and self.selector.placement.has_needs)
        )
        readings = self.registry.readings.fresh(self.stale_after) if fresh else {}
        servers = self.registry.servers
        server_id, actual_model = self.selector.choose(
            servers, route, exclude, self.admission.in_flight, self.outliers.ejected_ids(), readings
        )
        server = servers[server_id]
        server.last_used_time = now_iso()
        return copy.copy(server), actual_model  # a shallow copy, as replace() makes, without re-running __init__

    def report_result(self, server_id: str, ok: bool, detail: str = "") -> None:
        """Count a proxied request's outcome (a failure is a 5xx or a broken connection) for ejection."""
        if ok:
            self.outliers.record_success(server_id)
            return
        seconds = self.outliers.record_failure(server_id)
        if seconds is not None:
            health_log.warning("server %s ejected for %gs after consecutive failures: %s", server_id, seconds, detail)
            self._share_ejection(server_id)

    def _share_ejection(self, server_id: str) -> None:
        """Redis mode: put a server's ejection, or its end, where every process sees it (never under the lock)."""
        if isinstance(self.store, RedisFleetStore):
            ends = self.outliers.ejection_ends(server_id)
            with contextlib.suppress(RedisUnavailable):  # this process keeps it out regardless
                self.store.put_ejection(server_id, *(ends or (None, 0)))

    # -- reading -------------------------------------------------------------------------

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

    def _view(self) -> FleetView:
        """Under the lock: the parts a report reads, as they are now."""
        servers, in_flight = self.registry.servers, self.admission.in_flight
        return FleetView(servers, in_flight, self.selector, self.outliers, self.registry.readings, self.stale_after)

    # -- changing ------------------------------------------------------------------------

    def register_server(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[BackendServer, bool]:
        """Add a server, or update one's address in place; return it and whether it is new (see `register`).

        The seed's call, as the seed made it: the server waits for the sweep to be checked.
        """
        registration = self.register(server_id, ip, port, monitor_url, options, check=False)
        return registration.server, registration.created

    def register(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None = None,
        options: dict[str, Any] | None = None,
        registrant: Registrant | None = None,
        check: bool = True,
    ) -> Registration:
        """Add a server, or update one's address in place, if `registrant` may (see `_register`)."""
        return self._retried(self._register, server_id, ip, port, monitor_url, options, registrant, check)

    def _register(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None,
        options: dict[str, Any] | None,
        registrant: Registrant | None,
        check: bool,
    ) -> Registration:
        """Add a server, or update one's address in place, if `registrant` may; FleetFull or TokenRefused if not.

        A new address resets the server's health (the seed's IP change). The same address
        again is a heartbeat: health is kept, or an agent re-registering every 30 s would
        hide a dead service from the health checks, and nothing needs writing. With `check`, a
        server that has not passed a check at its address (new, moved) or is unhealthy is
        checked at once, in the background: the call returns first. `options`
        (weight, priority, ...) that are given replace the server's; absent ones are kept, so
        a heartbeat never undoes what an operator set.
        """
        options, registrant = records.checked_options(options or {}), registrant or Registrant()
        place = (ip, port, monitor_url)
        with self._lock:
            existing = self.registry.servers.get(server_id)
            records.admit(existing, registrant, len(self.registry.servers))
            claim = records.claimed(existing, options, registrant)
            if existing is not None and records.address(existing) == place and records.holds(existing, claim.changes):
                server, change = existing, None
                version = self.registry.version
            else:
                server = records.registered(existing, server_id, ip, port, monitor_url, claim.changes)
                change = Change(self._place(server_id, server, existing), server_id, server, existing)
            copied = replace(server)
        if claim.kept_by_operator:
            log.debug("server %s registered; kept %s as the operator set them", server_id, claim.kept_by_operator)
        if change is None:
            self.registry.persist(version)  # a no-op unless an earlier save of this state failed
            log.debug("server %s registered again at %s (unchanged)", server_id, copied.url)
            if check:
                self._check_soon(copied)
            return Registration(copied, False, claim.kept_by_operator, None)
        self._save(change)
        records.log_registration(existing, copied, claim)
        if check:
            self._check_soon(copied)
        return Registration(copied, existing is None, claim.kept_by_operator, claim.server_token)

    def _check_soon(self, server: BackendServer) -> None:
        """Check a registered server now, in the background, unless it has passed a check at its address.

        A new or moved server is checked before the next sweep, so an address that is down leaves
        the rotation within a check's timeout (until then it takes traffic: see records.count_check);
        an unhealthy one that registers again (it restarted) is back as soon as it answers.
        """
        if self.check_on_register and not records.has_passed(server):
            self.health_job.check_soon([Target(server.server_id, server.url)])

    def _place(self, server_id: str, server: BackendServer, existing: BackendServer | None) -> int:
        """Under the lock: put a registration's record in the fleet, in place of `existing`; the new version."""
        if existing is None or records.address(existing) != records.address(server):
            self.selector.came_back(server_id)
        self.registry.servers[server_id] = server  # a known key keeps its place in the order
        if existing is None or existing.monitor_url != server.monitor_url:
            self.registry.readings.forget(server_id)
        return self.registry.changed(server_id)

    def unregister_server(self, server_id: str, registrant: Registrant | None = None) -> bool:
        """Remove a server; False when it was not registered, TokenRefused when `registrant` may not."""
        return self._retried(self._unregister, server_id, registrant)

    def _unregister(self, server_id: str, registrant: Registrant | None) -> bool:
        check = None if registrant is None else functools.partial(records.check_token, registrant=registrant)
        change = self.registry.remove(server_id, check)
        if change is None:
            return False
        self.outliers.forget(server_id)
        self._save(change)
        for observer in self.observers:
            observer.server_removed(server_id)
        log.info("unregistered server %s", server_id)
        return True

    def update_server(self, server_id: str, changes: dict[str, Any]) -> BackendServer | None:
        """The operator changes a server's routing options (registrations keep them); None when it is unknown."""
        return self._modify(server_id, records.checked_options(changes), by_operator=True)

    def reset_server_token(self, server_id: str) -> BackendServer | None:
        """Unbind a server from its token, so that its next registration binds a new one; None when unknown."""
        return self._modify(server_id, {"token_hash": None}, what="server token reset")

    def set_draining(self, server_id: str, draining: bool) -> BackendServer | None:
        """Drain a server (no new work; its tasks still reach it) or take it back; None when unknown."""
        return self._modify(server_id, {"draining": draining})

    def _modify(
        self, server_id: str, changes: dict[str, Any], by_operator: bool = False, what: str | None = None
    ) -> BackendServer | None:
        return self._retried(self._modify_once, server_id, changes, by_operator, what)

    def _modify_once(
        self, server_id: str, changes: dict[str, Any], by_operator: bool, what: str | None
    ) -> BackendServer | None:
        modified = self.registry.modify(server_id, changes, by_operator)
        if modified is None:
            return None
        server, change = modified
        if change is not None:
            self._save(change)
            log.info("server %s changed: %s", server_id, what or changes)
        return server

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
            self._share_ejection(server_id)

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

    def _changed(self) -> None:
        """Under the lock, after every change: rebuild the routing state and serve the queue."""
        self.selector.rebuild(self.registry.servers.values())
        if self.admission.waiters:
            self.admission.dispatch_waiters()
        for listener in self.change_listeners:  # the job dispatcher: a server came, or came back
            listener()

    def _save(self, change: Change) -> None:
        """Save a change or undo it (Registry.persist_or_undo); either way, the health job follows the fleet."""
        try:
            self.registry.persist_or_undo(change)
        finally:
            self.health_job.sync()

    def load(self) -> None:
        """Restore the fleet from the store, with its health state; it takes traffic at once."""
        if self.store is None:
            return
        try:
            self.registry.load()
        except RedisUnavailable:
            log.error("starting with no servers: Redis did not answer; the fleet loads as soon as it does")
        self.health_job.sync()

    # -- Redis mode ----------------------------------------------------------------------

    def share(self, redis: Redis) -> None:
        """Follow the cluster's fleet in Redis, and take part in the leader election for the sweep; after `load`."""
        store = self.store
        assert isinstance(store, RedisFleetStore), "share() needs the Redis store configured"
        # Renewed every quarter interval, a dead leader's lease runs out and is taken within one interval.
        self.health_job.leader = LeaderLease(redis, ttl=0.75 * self.health_check_interval)
        self.health_job.leader.start()
        self.follower = FleetFollower(store, self._adopt)
        self.follower.seen = self.registry.shared_version
        self.follower.start()

    def cluster_state(self) -> dict[str, Any]:
        """Where the fleet is kept, and in Redis mode whether Redis answers and which process sweeps."""
        store, leader = self.store, self.health_job.leader
        if not isinstance(store, RedisFleetStore) or leader is None:
            return {"store": "embedded", "path": str(store.path) if isinstance(store, JsonFileStore) else None}
        return {
            "store": "redis",
            "redis": store.redis.where,
            "redis_up": store.redis.up,
            "fleet_version": self.registry.shared_version,
            "sweep_leader": leader.holder(),
            "leads_here": leader.is_leader,
        }

    def _adopt(self, snapshot: Snapshot) -> None:
        """The follower's hook: take a newer fleet from Redis, and keep the sweep scheduled to match it."""
        if self.registry.adopt(snapshot):
            self.outliers.adopt(snapshot.ejections)
            self.health_job.sync()

    def _retried(self, change: Callable[..., Any], *args: Any) -> Any:
        """Make a change; in Redis mode, one made on a record another process had changed is made again.

        The second try starts from the newer record, so an operator's drain and a server's
        heartbeat through two gateways both hold.
        """
        for attempt in range(3):
            try:
                return change(*args)
            except StaleCopy:
                if self.follower is None or attempt == 2:
                    raise
                self.follower.catch_up()
        raise AssertionError("unreachable")

    # -- the health job ------------------------------------------------------------------

    def run_health_sweep(self) -> None:
        """Check every server once, in parallel, and apply the results. The job's body."""
        self.health_job.run()

    @property
    def last_sweep(self) -> dict[str, Any]:
        """When the last sweep began and how long it took (in Redis mode, the leader's, wherever it ran)."""
        here, shared = self.health_job.last_sweep, self.registry.shared_sweep
        return here if here.get("time", "") >= shared.get("time", "") else dict(shared)

    @property
    def health_check_running(self) -> bool:
        """True while the health job is scheduled, which is while any server is registered."""
        return self.health_job.running

    def shutdown(self) -> None:
        """Stop the scheduler, the checker's threads and the shared slots' renewer; give up the leader lease."""
        if self.follower is not None:
            self.follower.stop()
        if self.health_job.leader is not None:
            self.health_job.leader.stop()
        self.health_job.shutdown()
        if self.shared_slots is not None:
            self.shared_slots.close()


# The default instance the seed imports: `from backend_manager import backend_manager`.
# It holds nothing until `create_app()` configures and loads it.
backend_manager = BackendManager()
