"""The health job: a sweep of the fleet on a schedule, while any server is registered."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from apscheduler.schedulers.background import BackgroundScheduler

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


class SweepTargets(NamedTuple):
    """What one sweep asks: every server's health, the monitors, and the servers that list no models."""

    health: list[Target]
    monitors: list[MonitorTarget]
    unlisted: list[DiscoveryTarget]


class FleetOwner(Protocol):
    """What the health job needs of the fleet's owner (BackendManager)."""

    health_checker: HealthChecker | None
    monitor_reader: MonitorReader | None
    model_discoverer: ModelDiscoverer | None
    health_check_interval: float
    observers: list[Any]

    def apply_health_results(self, results: list[HealthResult], checked: bool = True) -> None: ...

    def apply_readings(self, readings: list[tuple[str, str, Reading]]) -> None: ...

    def apply_discovered(self, found: list[tuple[str, str, list[str]]]) -> None: ...


class HealthJob:
    """Schedules the sweep while the registry has servers, runs it, and remembers the last one."""

    def __init__(self, registry: Registry, owner: FleetOwner) -> None:
        self._registry = registry
        self._owner = owner
        self._lock = threading.Lock()  # the job's own: it guards the scheduler, never the fleet
        self._scheduler: BackgroundScheduler | None = None
        self._last_sweep: dict[str, Any] = {}

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
        started = datetime.now(UTC)
        try:
            targets = self._registry.sweep_targets()
            reader, discoverer = owner.monitor_reader, owner.model_discoverer
            reading = reader.submit(targets.monitors) if reader is not None and targets.monitors else []
            discovering = discoverer.submit(targets.unlisted) if discoverer is not None and targets.unlisted else []
            results = owner.health_checker.check_all(targets.health)
            owner.apply_health_results(results)
            if reader is not None and reading:
                owner.apply_readings(reader.collect(reading))
            if discoverer is not None and discovering:
                owner.apply_discovered(discoverer.collect(discovering))
        except Exception:  # the job must survive anything, or health checking stops for good
            log.exception("health sweep failed")
            return
        seconds = (datetime.now(UTC) - started).total_seconds()
        for observer in owner.observers:
            observer.health_checked(results, seconds)
        failed = sum(1 for result in results if not result.ok)
        self._last_sweep = {"time": started.isoformat(timespec="seconds"), "duration_s": seconds}
        health_log.info("health sweep: %d servers, %d failed, %.2fs", len(results), failed, seconds)
        performance_log.info(
            "health sweep", extra={"fields": {"servers": len(results), "failed": failed, "seconds": round(seconds, 3)}}
        )

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
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=False)
                self._scheduler = None
        for worker in (self._owner.health_checker, self._owner.monitor_reader, self._owner.model_discoverer):
            if worker is not None:
                worker.close()
