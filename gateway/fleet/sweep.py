"""The health job: a sweep of the fleet on a schedule, while any server is registered, and checks at once.

A server that registers, moves, or registers again while unhealthy is checked at once, in the
background (`HealthJob.check_soon`), rather than at the next sweep: a new address that is down
leaves the rotation within a check's timeout, and one that came back rejoins as soon as it answers.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

from gateway.cluster.leader import LeaderLease
from gateway.fleet.health import HealthChecker, HealthResult, Target
from gateway.fleet.model_discovery import DiscoveryTarget, ModelDiscoverer
from gateway.fleet.monitor_reader import MonitorReader, MonitorTarget
from gateway.fleet.resources import Reading

if TYPE_CHECKING:
    from gateway.fleet.registry import Registry  # which builds SweepTargets

log = logging.getLogger(__name__)
health_log = logging.getLogger("gateway.health")
performance_log = logging.getLogger("gateway.performance")

HEALTH_JOB_ID = "health_check"
# Threads (greenlets under gunicorn's gevent worker) that run the checks asked for at once. Each
# takes every target waiting when it starts, and they run in parallel in the checker's pool, so a
# burst of registrations costs a few threads, not one each.
MAX_CHECKERS_NOW = 4


class SweepTargets(NamedTuple):
    """What one sweep asks: every server's health, the monitors, the servers that list no models, and those that do."""

    health: list[Target]
    monitors: list[MonitorTarget]
    unlisted: list[DiscoveryTarget]
    listed: list[DiscoveryTarget]  # asked what they have in memory (Ollama's /api/ps), by MODEL_DISCOVERY


class FleetOwner(Protocol):
    """What the health job needs of the fleet's owner (BackendManager)."""

    health_checker: HealthChecker | None
    monitor_reader: MonitorReader | None
    model_discoverer: ModelDiscoverer | None
    health_check_interval: float
    observers: list[Any]

    def apply_health_results(self, results: list[HealthResult], checked: bool = True, fence: str = "") -> None: ...

    def apply_readings(self, readings: list[tuple[str, str, Reading]], fence: str = "") -> None: ...

    def apply_discovered(self, found: list[tuple[str, str, list[str]]]) -> None: ...

    def apply_loaded(self, found: list[tuple[str, str, list[tuple[str, int]] | None]]) -> None: ...


class HealthJob:
    """Schedules the sweep while the registry has servers, runs it, and remembers the last one."""

    def __init__(self, registry: Registry, owner: FleetOwner) -> None:
        self._registry = registry
        self._owner = owner
        self._lock = threading.Lock()  # the job's own: it guards the scheduler, never the fleet
        self._scheduler: BackgroundScheduler | None = None
        self._last_sweep: dict[str, Any] = {}
        self._waiting: dict[Target, None] = {}  # asked to be checked at once, in order; under the job's lock
        self._checking: set[Target] = set()  # being checked at once now
        self._checkers = 0  # threads running _check_waiting
        self._monitors_asked: list[MonitorTarget] | None = None  # read_monitors_soon's latest ask, under the lock
        self._reading_monitors = False  # a thread runs _read_monitors
        self.leader: LeaderLease | None = None  # Redis mode: only the lease's holder sweeps the cluster

    @property
    def running(self) -> bool:
        """True while the job is scheduled."""
        return self._scheduler is not None and self._scheduler.get_job(HEALTH_JOB_ID) is not None

    @property
    def last_sweep(self) -> dict[str, Any]:
        """When the last sweep began and how long it took."""
        return dict(self._last_sweep)

    def run(self) -> None:
        """Check every server once, in parallel, and apply the results. The job's body."""
        owner = self._owner
        if owner.health_checker is None:
            return
        fence = ""
        if self.leader is not None:
            fence = self.leader.token
            if not fence:
                return  # another process leads: it sweeps for the cluster, and this one reads the results
        started = datetime.now(UTC)
        try:
            targets = self._registry.sweep_targets()
            reader, discoverer = owner.monitor_reader, owner.model_discoverer
            reading = reader.submit(targets.monitors) if reader is not None and targets.monitors else []
            discovering = discoverer.submit(targets.unlisted) if discoverer is not None and targets.unlisted else []
            loading = discoverer.submit_loaded(targets.listed) if discoverer is not None and targets.listed else []
            results = owner.health_checker.check_all(targets.health)
            owner.apply_health_results(results, fence=fence)
            if reader is not None and reading:
                owner.apply_readings(reader.collect(reading), fence)
            if discoverer is not None and discovering:
                owner.apply_discovered(discoverer.collect(discovering))
            if discoverer is not None and loading:
                owner.apply_loaded(discoverer.collect_loaded(loading))
        except Exception:  # the job must survive anything, or health checking stops for good
            log.exception("health sweep failed")
            return
        seconds = (datetime.now(UTC) - started).total_seconds()
        for observer in owner.observers:
            observer.health_checked(results, seconds)
        failed = sum(1 for result in results if not result.ok)
        self._last_sweep = {"time": started.isoformat(timespec="seconds"), "duration_s": seconds}
        if self.leader is not None:
            self._registry.share_readings(self._last_sweep, fence)
        health_log.info("health sweep: %d servers, %d failed, %.2fs", len(results), failed, seconds)
        performance_log.info(
            "health sweep", extra={"fields": {"servers": len(results), "failed": failed, "seconds": round(seconds, 3)}}
        )

    @property
    def checking_soon(self) -> bool:
        """True while a check asked for by `check_soon` is waiting or running."""
        with self._lock:
            return bool(self._waiting or self._checking)

    def check_soon(self, targets: list[Target]) -> None:
        """Check these servers now, in the background, and apply the results; returns at once.

        It never waits on the network, so a caller may answer its request first (the check runs in
        a thread: under gunicorn's gevent worker, a greenlet that runs once the request yields).
        A target asked for twice before its check starts is checked once; one asked for while its
        check runs is checked again after it, as that check may have begun before what the caller
        knows (a server that restarted). Call it without the fleet's lock.
        """
        if self._owner.health_checker is None or not targets:
            return
        with self._lock:
            for target in targets:
                self._waiting[target] = None
            start = self._checkers < MAX_CHECKERS_NOW and any(t not in self._checking for t in self._waiting)
            if start:
                self._checkers += 1
        if not start:
            return  # a running checker takes them when its checks end
        try:
            threading.Thread(target=self._check_waiting, name="health-check-now", daemon=True).start()
        except RuntimeError as exc:  # no thread to be had (or the interpreter is exiting): the sweep will do
            with self._lock:
                self._checkers -= 1
            log.warning("could not start a health check at once: %s; the next sweep will check", exc)

    def read_monitors_soon(self) -> list[str]:
        """Read every monitor now, in the background, and keep the readings; the ids asked. Returns at once.

        An ask made while a read runs is read once that one ends (with the fleet as it is then).
        """
        reader = self._owner.monitor_reader
        targets = self._registry.monitor_targets() if reader is not None else []
        if not targets:
            return []
        with self._lock:
            self._monitors_asked = targets
            start, self._reading_monitors = not self._reading_monitors, True
        if start:
            try:
                threading.Thread(target=self._read_monitors, name="monitor-read-now", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had: the next sweep reads them
                with self._lock:
                    self._reading_monitors = False
                log.warning("could not read the monitors at once: %s; the next sweep will", exc)
        return [target.server_id for target in targets]

    def _read_monitors(self) -> None:
        """A reader thread: read the monitors asked for, until no ask is left."""
        while True:
            with self._lock:
                targets, self._monitors_asked = self._monitors_asked, None
                reader = self._owner.monitor_reader
                if not targets or reader is None:
                    self._reading_monitors = False
                    return
            try:
                self._owner.apply_readings(reader.collect(reader.submit(targets)))
            except Exception:  # the thread must end cleanly whatever happens; the sweep reads them again
                log.exception("reading the monitors at once failed")

    def _check_waiting(self) -> None:
        """A checker thread: check the waiting targets, in parallel, until none is left for it.

        A target whose check is running waits for it: the thread running it takes it next.
        """
        while True:
            with self._lock:
                checker = self._owner.health_checker
                batch = [target for target in self._waiting if target not in self._checking]
                if not batch or checker is None:
                    self._checkers -= 1
                    return
                for target in batch:
                    del self._waiting[target]
                self._checking.update(batch)
            try:
                results = checker.check_all(batch)  # none once the checker is closed: the gateway is stopping
                self._owner.apply_health_results(results)
            except Exception:  # a checker thread must end cleanly whatever happens; the sweep checks again
                log.exception("health check at once failed")
            finally:
                with self._lock:
                    self._checking.difference_update(batch)

    def sync(self) -> None:
        """Schedule the job while any server is registered, and remove it otherwise."""
        if self._owner.health_checker is None:
            return
        with self._lock:
            wanted = bool(self._registry.servers)  # read under the job's lock: the last caller's answer wins
            if self._scheduler is None:
                if not wanted:
                    return
                self._scheduler = BackgroundScheduler(daemon=True, timezone=UTC)
                self._scheduler.start()
            job = self._scheduler.get_job(HEALTH_JOB_ID)
            if wanted and job is None:
                interval = self._owner.health_check_interval
                self._scheduler.add_job(
                    self.run,
                    "interval",
                    seconds=interval,
                    id=HEALTH_JOB_ID,
                    max_instances=1,
                    coalesce=True,
                    misfire_grace_time=None,
                )
                log.info("health checks started, every %gs", interval)
            elif not wanted and job is not None:
                job.remove()
                log.info("no servers left; health checks stopped")

    def shutdown(self) -> None:
        """Stop the scheduler, and the threads of the checker, the monitor reader and the discoverer."""
        with self._lock:
            self._waiting.clear()
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
        for worker in (self._owner.health_checker, self._owner.monitor_reader, self._owner.model_discoverer):
            if worker is not None:
                worker.close()
