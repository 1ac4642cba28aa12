"""The fleet: who is registered, who is healthy, who is next. The one owner of that state."""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

from apscheduler.schedulers.background import BackgroundScheduler

from gateway.fleet.health import HealthChecker, HealthResult, Target
from gateway.fleet.model_discovery import DiscoveryTarget, ModelDiscoverer
from gateway.fleet.monitor_reader import MonitorReader, MonitorTarget
from gateway.fleet.resources import Reading
from gateway.fleet.server import OPTION_NAMES, BackendServer, now_iso
from gateway.fleet.store import JsonFileStore, off_the_event_loop
from gateway.routing.admission import Lease, LeaseOwner, NoServer, RouteRequest, Waiter
from gateway.routing.catalog import catalog, listed_names, model_key
from gateway.routing.outliers import OutlierDetector
from gateway.routing.selection import Selector

__all__ = ["BackendManager", "Lease", "NoServer", "PersistError", "Pick", "RouteRequest", "backend_manager"]

log = logging.getLogger(__name__)
health_log = logging.getLogger("gateway.health")
performance_log = logging.getLogger("gateway.performance")

HEALTH_JOB_ID = "health_check"


class Pick(NamedTuple):
    """A routing decision: the server, or None and whether servers were there but none fit."""

    server: BackendServer | None
    no_fit: bool


class PersistError(RuntimeError):
    """A change was made in memory but could not be saved."""


class BackendManager(LeaseOwner):
    """Keeps the fleet under a lock, saves every change, routes, and runs the health job."""

    def __init__(
        self,
        store: JsonFileStore | None = None,
        *,
        failure_threshold: int = 3,
        health_check_interval: float = 30.0,
        health_checker: HealthChecker | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._servers: dict[str, BackendServer] = {}  # insertion order is registration order
        self.selector = Selector()
        self._in_flight: dict[str, int] = {}  # leases held per server id; an entry goes at zero
        self._waiters: deque[Waiter] = deque()  # requests queued for a slot, first come first served
        self.queue_timeout = 30.0
        self.queue_max_size = 100
        self.outliers = OutlierDetector(consecutive_failures=0)
        self._version = 0
        self._save_lock = threading.Lock()
        self._saved_version = 0
        self._job_lock = threading.Lock()
        self._scheduler: BackgroundScheduler | None = None
        self._last_sweep: dict[str, Any] = {}
        self._readings: dict[str, Reading] = {}  # the latest report of each server's monitor
        self.observers: list[Any] = []  # told server_removed(id) and health_checked(results, seconds)
        self.configure(store, failure_threshold, health_check_interval, health_checker)

    def configure(
        self,
        store: JsonFileStore | None,
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
    def routing_policy(self) -> str:
        """round_robin, least_connections or least_load."""
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

    # -- reading -------------------------------------------------------------------------

    def get_next_server(self, exclude: frozenset[str] | set[str] = frozenset()) -> BackendServer | None:
        """The next healthy server by the routing policy (skipping `exclude`), or None."""
        return self.pick_server(exclude).server

    def pick_server(self, exclude: Collection[str] = frozenset(), required_bytes: int | None = None) -> Pick:
        """Choose a server without holding a slot on it; say when servers were up but none fit."""
        with self._lock:
            try:
                server_id, _ = self._choose(RouteRequest(required_bytes=required_bytes), exclude)
            except NoServer as exc:
                return Pick(None, exc.code == "no_fit")
            return Pick(self._used(server_id), False)

    def acquire(
        self, route: RouteRequest, exclude: Collection[str] = frozenset(), timeout: float | None = None
    ) -> Lease:
        """A slot on the server chosen for `route`; waits in the queue while all are at their cap.

        Raises NoServer when none can take it, the queue is full, or `timeout` (default
        QUEUE_TIMEOUT) passes first.
        """
        timeout = self.queue_timeout if timeout is None else timeout
        with self._lock:
            try:
                return self._lease(route, exclude)
            except NoServer as exc:
                if exc.code != "at_capacity":
                    raise
                if timeout <= 0 or len(self._waiters) >= self.queue_max_size:
                    reason = "and the queue is full" if timeout > 0 else "and queueing is off"
                    raise NoServer(503, "queue_full", f"{exc.message}, {reason}", retry_after="1") from None
                waiter = Waiter(route, exclude)
                self._waiters.append(waiter)
        waiter.event.wait(timeout)
        with self._lock:
            if waiter.lease is not None:
                return waiter.lease
            if waiter.error is not None:
                raise waiter.error
            self._waiters.remove(waiter)
        message = f"every server that can take this request stayed at its max_concurrent for {timeout:g}s"
        raise NoServer(503, "queue_timeout", message, retry_after="1")

    def hold(self, server_id: str) -> Lease:
        """A slot on a given server, cap or not: a request for a task it owns must go there."""
        with self._lock:
            server = self._servers.get(server_id)
            if server is None:
                return Lease(None, None, None)
            self._in_flight[server_id] = self._in_flight.get(server_id, 0) + 1
            return Lease(self, replace(server), None)

    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot now."""
        return len(self._waiters)

    def release_lease(self, lease: Lease) -> None:
        """Free a lease's slot once, and hand it to the first queued request that can use it."""
        with self._lock:
            if lease.released or lease.server is None:
                return
            lease.released = True
            server_id = lease.server.server_id
            count = self._in_flight.get(server_id, 0) - 1
            if count > 0:
                self._in_flight[server_id] = count
            else:
                self._in_flight.pop(server_id, None)
            self._dispatch_waiters()

    def _choose(self, route: RouteRequest, exclude: Collection[str]) -> tuple[str, str | None]:
        """Under the lock: the Selector's decision over the current state."""
        readings = (
            self._fresh_readings() if route.required_bytes is not None or self.routing_policy == "least_load" else {}
        )
        return self.selector.choose(
            self._servers, route, exclude, self._in_flight, self.outliers.ejected_ids(), readings
        )

    def _lease(self, route: RouteRequest, exclude: Collection[str]) -> Lease:
        """Under the lock: choose and take a slot."""
        server_id, actual_model = self._choose(route, exclude)
        self._in_flight[server_id] = self._in_flight.get(server_id, 0) + 1
        return Lease(self, self._used(server_id), actual_model)

    def _used(self, server_id: str) -> BackendServer:
        """Under the lock: stamp a server as used and return a copy."""
        server = self._servers[server_id]
        server.last_used_time = now_iso()
        return copy.copy(server)  # a shallow copy, as replace() makes, without re-running __init__

    def _dispatch_waiters(self) -> None:
        """Under the lock: give queued requests, oldest first, the slots that are free now."""
        for waiter in list(self._waiters):
            try:
                waiter.lease = self._lease(waiter.route, waiter.exclude)
            except NoServer as exc:
                if exc.code == "at_capacity":
                    continue
                waiter.error = exc
            self._waiters.remove(waiter)
            waiter.event.set()

    def report_result(self, server_id: str, ok: bool, detail: str = "") -> None:
        """Count a proxied request's outcome (a failure is a 5xx or a broken connection) for ejection."""
        if ok:
            self.outliers.record_success(server_id)
            return
        seconds = self.outliers.record_failure(server_id)
        if seconds is not None:
            health_log.warning("server %s ejected for %gs after consecutive failures: %s", server_id, seconds, detail)

    def _summary(self, server_id: str, now: float) -> dict[str, Any] | None:
        """A server's reading as /webhook/servers shows it; under the lock."""
        reading = self._readings.get(server_id)
        return reading.summary(now, self.stale_after) if reading else None

    @property
    def stale_after(self) -> float:
        """A reading older than three sweeps is stale and never used for routing."""
        return 3 * self.health_check_interval

    def _fresh_readings(self) -> dict[str, Reading]:
        """Readings young enough to route by; under the lock."""
        oldest = time.monotonic() - self.stale_after
        return {server_id: r for server_id, r in self._readings.items() if r.received >= oldest}

    def apply_readings(self, readings: list[tuple[str, str, Reading]]) -> None:
        """Keep each (server_id, monitor_url, reading) whose server still has that monitor."""
        with self._lock:
            for server_id, monitor_url, reading in readings:
                server = self._servers.get(server_id)
                if server is not None and server.monitor_url == monitor_url:
                    self._readings[server_id] = reading

    def apply_discovered(self, found: list[tuple[str, str, list[str]]]) -> None:
        """Keep each (server_id, url, models) found by discovery whose server is still at that url."""
        with self._lock:
            changed = []
            for server_id, url, models in found:
                server = self._servers.get(server_id)
                if (
                    server is not None
                    and server.url == url
                    and not _declares(server)
                    and server.discovered_models != models
                ):
                    server.discovered_models = list(models)
                    changed.append(server_id)
            version = self._changed() if changed else None
        if version is not None:
            log.info("models discovered on %s", ", ".join(changed))
            with contextlib.suppress(PersistError):  # logged by _persist; the next save carries it
                self._persist(version)

    def rankings(self) -> list[dict[str, Any]]:
        """Healthy and unhealthy servers by load score, lowest first; those without a fresh reading last."""
        now = time.monotonic()
        with self._lock:
            fresh = self._fresh_readings()
            rows = [
                {
                    "server_id": server.server_id,
                    "is_healthy": server.is_healthy,
                    "score": round(fresh[server.server_id].load_score(self.load_weights), 2)
                    if server.server_id in fresh
                    else None,
                    "resources": self._summary(server.server_id, now),
                }
                for server in self._servers.values()
            ]
        return sorted(rows, key=lambda row: (row["score"] is None, row["score"] or 0.0))

    def get_server(self, server_id: str) -> BackendServer | None:
        """A copy of one server, or None."""
        with self._lock:
            server = self._servers.get(server_id)
            return replace(server) if server else None

    def is_registered(self, server_id: str) -> bool:
        """True while `server_id` is in the fleet (no copy made: every proxied request asks)."""
        return server_id in self._servers

    def list_servers(self) -> list[BackendServer]:
        """Copies of all servers in registration order."""
        with self._lock:
            return [replace(server) for server in self._servers.values()]

    @property
    def health_check_running(self) -> bool:
        """True while the health job is scheduled, which is while any server is registered."""
        return self._scheduler is not None and self._scheduler.get_job(HEALTH_JOB_ID) is not None

    def describe_servers(self) -> list[dict[str, Any]]:
        """Every server with its routing state: in flight, ejection, effective weight, models, resources."""
        with self._lock:
            return self._rows()

    def describe_server(self, server_id: str) -> dict[str, Any] | None:
        """One server as `describe_servers` shows it, or None."""
        with self._lock:
            return next((row for row in self._rows() if row["server_id"] == server_id), None)

    def _rows(self) -> list[dict[str, Any]]:
        """Under the lock: each server's data and routing state."""
        now, clock = time.monotonic(), self.outliers.describe
        rows = []
        for server in self._servers.values():
            ejection = clock(server.server_id)
            rows.append(
                {
                    **server.to_dict(),
                    "in_flight": self._in_flight.get(server.server_id, 0),
                    "ejected": ejection["ejected"],
                    "ejection_seconds_left": ejection["seconds_left"],
                    "effective_weight": round(self.selector.effective_weight(server), 3),
                    "served_models": listed_names(server),
                    "resources": self._summary(server.server_id, now),
                }
            )
        return rows

    def model_catalog(self) -> dict[str, list[str]]:
        """Model name -> ids of the servers that can take work for it now (healthy, not draining)."""
        with self._lock:
            return catalog(s for s in self._servers.values() if s.is_healthy and not s.draining)

    def priority_check(self, model: str) -> dict[str, Any]:
        """Which servers would serve `model`, tier by tier, and in what state each is."""
        key = model_key(model)
        ejected = self.outliers.ejected_ids()
        with self._lock:
            serving = [s for s in self._servers.values() if key in self.selector.served[s.server_id]]
            tiers: dict[int, list[dict[str, Any]]] = {}
            for server in sorted(serving, key=lambda s: s.priority):
                tiers.setdefault(server.priority, []).append(
                    {
                        "server_id": server.server_id,
                        "actual_model": self.selector.served[server.server_id][key],
                        "state": self._state(server, ejected),
                        "weight": server.weight,
                        "in_flight": self._in_flight.get(server.server_id, 0),
                        "max_concurrent": server.max_concurrent,
                    }
                )
        serving_tier = next((p for p, rows in tiers.items() if any(r["state"] == "available" for r in rows)), None)
        return {
            "model": model,
            "known": bool(serving),
            "serving_tier": serving_tier,
            "tiers": [{"priority": p, "servers": rows} for p, rows in tiers.items()],
        }

    def priority_overview(self) -> dict[str, Any]:
        """The servers of each tier, how many can take work now, and the models the tier serves."""
        ejected = self.outliers.ejected_ids()
        with self._lock:
            tiers: dict[int, dict[str, Any]] = {}
            for server in sorted(self._servers.values(), key=lambda s: s.priority):
                tier = tiers.setdefault(server.priority, {"priority": server.priority, "servers": [], "available": 0})
                tier["servers"].append(server.server_id)
                tier["available"] += self._state(server, ejected) == "available"
            for priority, tier in tiers.items():
                tier["models"] = list(catalog(s for s in self._servers.values() if s.priority == priority))
        return {"tiers": list(tiers.values())}

    def _state(self, server: BackendServer, ejected: Collection[str]) -> str:
        """Under the lock: whether a server can take new work now, or why not."""
        if not server.is_healthy:
            return "unhealthy"
        if server.draining:
            return "draining"
        if server.server_id in ejected:
            return "ejected"
        if server.max_concurrent and self._in_flight.get(server.server_id, 0) >= server.max_concurrent:
            return "at_capacity"
        return "available"

    def get_status(self) -> dict[str, Any]:
        """The seed's `/webhook/servers` data: counts, job state and every server."""
        servers = self.describe_servers()
        healthy = sum(1 for server in servers if server["is_healthy"])
        return {
            "total_servers": len(servers),
            "healthy_servers": healthy,
            "unhealthy_servers": len(servers) - healthy,
            "health_check_running": self.health_check_running,
            "servers": servers,
        }

    # -- changing ------------------------------------------------------------------------

    def register_server(
        self,
        server_id: str,
        ip: str,
        port: int,
        monitor_url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> tuple[BackendServer, bool]:
        """Add a server, or update one's address in place; return it and whether it is new.

        A new address resets the server's health (the seed's IP change). The same address
        again is a heartbeat: health is kept, or an agent re-registering every 30 s would
        hide a dead service from the health checks, and nothing needs writing. `options`
        (weight, priority, ...) that are given replace the server's; absent ones are kept, so
        a heartbeat never undoes what an operator set.
        """
        options = _checked_options(options or {})
        address = (ip, port, monitor_url)
        with self._lock:
            existing = self._servers.get(server_id)
            if existing is not None and _address(existing) == address and _has(existing, options):
                heartbeat, version = replace(existing), self._version
            else:
                heartbeat = None
        if heartbeat is not None:
            self._persist(version)  # a no-op unless an earlier save of this state failed
            log.debug("server %s registered again at %s (unchanged)", server_id, heartbeat.url)
            return heartbeat, False
        with self._lock:
            existing = self._servers.get(server_id)
            if existing is not None and _address(existing) == address:
                server = replace(existing, **options)  # new options at the same address: health is kept
            else:
                server = BackendServer(
                    server_id=server_id, ip=ip, port=port, monitor_url=monitor_url, health_changed_time=now_iso()
                )
                if existing is not None:  # a move keeps what the operator and the sweeps set
                    server = replace(server, **existing.options(), draining=existing.draining)
                    server.last_used_time = existing.last_used_time
                    server.discovered_models = existing.discovered_models
                server = replace(server, **options)
                self.selector.came_back(server_id)
            self._servers[server_id] = server  # a known key keeps its place in the order
            if existing is None or existing.monitor_url != monitor_url:
                self._readings.pop(server_id, None)
            version = self._changed()
            registered = replace(server)
        self._persist_or_undo(version, server_id, placed=server, previous=existing)
        if existing is None:
            log.info("registered server %s at %s", server_id, registered.url)
        elif _address(existing) == address:
            log.info("server %s registered with new options: %s", server_id, options)
        elif existing.url != registered.url:
            log.info("server %s moved from %s to %s; health reset", server_id, existing.url, registered.url)
        else:
            log.info("server %s now has monitor %s; health reset", server_id, registered.monitor_url)
        return registered, existing is None

    def unregister_server(self, server_id: str) -> bool:
        """Remove a server; False when it was not registered."""
        with self._lock:
            order = list(self._servers)
            removed = self._servers.pop(server_id, None)
            if removed is None:
                return False
            self._readings.pop(server_id, None)
            version = self._changed()
        self.outliers.forget(server_id)
        self._persist_or_undo(version, server_id, placed=None, previous=removed, order=order)
        for observer in self.observers:
            observer.server_removed(server_id)
        log.info("unregistered server %s", server_id)
        return True

    def update_server(self, server_id: str, changes: dict[str, Any]) -> BackendServer | None:
        """Change a server's routing options; None when it is not registered."""
        return self._modify(server_id, _checked_options(changes))

    def set_draining(self, server_id: str, draining: bool) -> BackendServer | None:
        """Drain a server (no new work; its tasks still reach it) or take it back; None when unknown."""
        return self._modify(server_id, {"draining": draining})

    def _modify(self, server_id: str, changes: dict[str, Any]) -> BackendServer | None:
        with self._lock:
            existing = self._servers.get(server_id)
            if existing is None:
                return None
            if _has(existing, changes):
                return replace(existing)  # nothing changes: nothing to write
            server = replace(existing, **changes)
            self._servers[server_id] = server
            version = self._changed()
            updated = replace(server)
        self._persist_or_undo(version, server_id, placed=server, previous=existing)
        log.info("server %s changed: %s", server_id, changes)
        return updated

    def _persist_or_undo(
        self,
        version: int,
        server_id: str,
        placed: BackendServer | None,
        previous: BackendServer | None,
        order: list[str] | None = None,
    ) -> None:
        """Save a change; if that fails, undo it in memory too, so a retry starts afresh."""
        try:
            self._persist(version)
        except PersistError:
            with self._lock:
                if self._saved_version >= version:
                    return  # another writer's later save already made this change durable
                if self._servers.get(server_id) is placed:  # untouched since: safe to undo
                    self._restore(server_id, previous, order)
                    self._changed()
            raise
        finally:
            self._sync_health_job()

    def _restore(self, server_id: str, previous: BackendServer | None, order: list[str] | None) -> None:
        """Put back `previous` for `server_id` (at its old place), or remove it; under the lock."""
        if previous is None:
            self._servers.pop(server_id, None)
            return
        self._servers[server_id] = previous
        if order is not None:  # servers registered meanwhile keep their places after the old ones
            old = [key for key in order if key in self._servers]
            self._servers = {key: self._servers[key] for key in old + [k for k in self._servers if k not in order]}

    def report_failure(self, server_id: str, url: str, reason: str) -> None:
        """Count a failed connection from the proxy as a failed health check."""
        self.apply_health_results([HealthResult(server_id, url, False, f"proxy: {reason}")], checked=False)

    def apply_health_results(self, results: list[HealthResult], checked: bool = True) -> None:
        """Apply check results; a server re-registered since its check began is left alone."""
        now = now_iso()
        transitions: list[tuple[str, bool | None, str]] = []
        with self._lock:
            for result in results:
                server = self._servers.get(result.server_id)
                if server is None or server.url != result.url:
                    continue
                if checked:
                    server.last_check_time = now
                was_healthy, old_fails = server.is_healthy, server.fail_count
                if result.ok:
                    server.fail_count = 0
                    server.is_healthy = True
                    if checked and self.outliers.restore(server.server_id):
                        self.selector.came_back(server.server_id)
                        transitions.append((server.server_id, None, "back from ejection: the health check passed"))
                else:
                    server.fail_count += 1
                    if server.fail_count >= self.failure_threshold:
                        server.is_healthy = False
                if server.is_healthy != was_healthy:
                    server.health_changed_time = now
                    if server.is_healthy:
                        self.selector.came_back(server.server_id)
                    transitions.append((server.server_id, server.is_healthy, result.detail))
                elif server.is_healthy and server.fail_count != old_fails:
                    transitions.append((server.server_id, None, result.detail))
            # Only a change of health must be durable at once (it changes routing after a
            # restart); a fail count on its way to the threshold goes out with the next save.
            health_changed = any(healthy is not None for _, healthy, _ in transitions)
            version = self._changed() if health_changed else None
        for server_id, healthy, detail in transitions:
            if healthy is True:
                health_log.info("server %s recovered: %s", server_id, detail)
            elif healthy is False:
                health_log.warning(
                    "server %s marked unhealthy after %d failures: %s", server_id, self.failure_threshold, detail
                )
            else:
                health_log.info("server %s health check: %s", server_id, detail)
        if version is not None:
            with contextlib.suppress(PersistError):  # logged by _persist; the next save carries it
                self._persist(version)

    def _changed(self) -> int:
        """Note a change made under the lock: rebuild the routing state, serve the queue, bump the version."""
        self.selector.rebuild(self._servers.values())
        if self._waiters:
            self._dispatch_waiters()
        self._version += 1
        return self._version

    # -- persistence ---------------------------------------------------------------------

    def load(self) -> None:
        """Restore the fleet from the store, with its health state; it takes traffic at once."""
        if self.store is None:
            return
        servers, bad = {}, []
        for entry in self.store.load():
            try:
                server = BackendServer.from_dict(entry)
            except ValueError as exc:
                bad.append(str(exc))
                continue
            servers[server.server_id] = server
        if bad:
            self.store.keep_copy(f"{len(bad)} bad entries, first: {bad[0]}")
        with self._lock:
            self._servers = servers
            self._saved_version = self._changed()
        log.info("loaded %d servers from %s", len(servers), self.store.path)
        self._sync_health_job()

    def _persist(self, version: int) -> None:
        """Save a state at least as new as `version`; writers that queue up share one save."""
        if self.store is None:
            return
        with self._save_lock:
            if self._saved_version >= version:
                return  # a save that began after our change already wrote it
            with self._lock:
                entries = [server.to_dict() for server in self._servers.values()]
                snapshot_version = self._version
            try:
                off_the_event_loop(self.store.save, entries)
            except OSError as exc:
                log.error("could not save %s: %s", self.store.path, exc)
                raise PersistError(f"could not save the server list: {exc.strerror or exc}") from exc
            self._saved_version = snapshot_version

    # -- the health job ------------------------------------------------------------------

    def run_health_sweep(self) -> None:
        """Check every server once, in parallel, and apply the results. The job's body."""
        if self.health_checker is None:
            return
        started = datetime.now(UTC)
        try:
            with self._lock:
                targets = [Target(s.server_id, s.url) for s in self._servers.values()]
                monitors = [MonitorTarget(s.server_id, s.monitor_url) for s in self._servers.values() if s.monitor_url]
                unlisted = [DiscoveryTarget(s.server_id, s.url) for s in self._servers.values() if not _declares(s)]
            reader, discoverer = self.monitor_reader, self.model_discoverer
            reading = reader.submit(monitors) if reader is not None and monitors else []
            discovering = discoverer.submit(unlisted) if discoverer is not None and unlisted else []
            results = self.health_checker.check_all(targets)
            self.apply_health_results(results)
            if reader is not None and reading:
                self.apply_readings(reader.collect(reading))
            if discoverer is not None and discovering:
                self.apply_discovered(discoverer.collect(discovering))
        except Exception:  # the job must survive anything, or health checking stops for good
            log.exception("health sweep failed")
            return
        seconds = (datetime.now(UTC) - started).total_seconds()
        for observer in self.observers:
            observer.health_checked(results, seconds)
        failed = sum(1 for result in results if not result.ok)
        self._last_sweep = {"time": started.isoformat(timespec="seconds"), "duration_s": seconds}
        health_log.info("health sweep: %d servers, %d failed, %.2fs", len(results), failed, seconds)
        performance_log.info(
            "health sweep", extra={"fields": {"servers": len(results), "failed": failed, "seconds": round(seconds, 3)}}
        )

    @property
    def last_sweep(self) -> dict[str, Any]:
        """When the last sweep began and how long it took."""
        return dict(self._last_sweep)

    def _sync_health_job(self) -> None:
        """Schedule the health job while any server is registered, and remove it otherwise."""
        if self.health_checker is None:
            return
        with self._job_lock:
            wanted = bool(self._servers)
            if self._scheduler is None:
                if not wanted:
                    return
                self._scheduler = BackgroundScheduler(daemon=True, timezone=UTC)
                self._scheduler.start()
            job = self._scheduler.get_job(HEALTH_JOB_ID)
            if wanted and job is None:
                self._scheduler.add_job(
                    self.run_health_sweep,
                    "interval",
                    seconds=self.health_check_interval,
                    id=HEALTH_JOB_ID,
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=None,
                )
                log.info("health checks started, every %gs", self.health_check_interval)
            elif not wanted and job is not None:
                job.remove()
                log.info("no servers left; health checks stopped")

    def shutdown(self) -> None:
        """Stop the scheduler and the checker's threads."""
        with self._job_lock:
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
        if self.health_checker is not None:
            self.health_checker.close()
        if self.monitor_reader is not None:
            self.monitor_reader.close()
        if self.model_discoverer is not None:
            self.model_discoverer.close()


def _declares(server: BackendServer) -> bool:
    """True when the server registered its models, so discovery leaves it alone."""
    return bool(server.models or server.model_map)


def _address(server: BackendServer) -> tuple[str, int, str | None]:
    return server.ip, server.port, server.monitor_url


def _has(server: BackendServer, values: dict[str, Any]) -> bool:
    """True when the server already holds every given value."""
    return all(getattr(server, name) == value for name, value in values.items())


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown server options: {', '.join(sorted(unknown))}")
    return dict(options)


# The default instance the seed imports: `from backend_manager import backend_manager`.
# It holds nothing until `create_app()` configures and loads it.
backend_manager = BackendManager()
