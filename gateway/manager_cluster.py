"""Redis mode's side of BackendManager: following the cluster's fleet, the sweep's leader, shared ejections."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gateway.cluster.connection import Redis, RedisUnavailable
from gateway.cluster.leader import LeaderLease
from gateway.fleet.follow import FleetFollower
from gateway.fleet.local_copy import LocalCopy
from gateway.fleet.redis_store import RedisFleetStore, Snapshot
from gateway.fleet.registry import StaleCopy
from gateway.fleet.store import JsonFileStore

log = logging.getLogger("gateway.manager")  # as the rest of the manager logs

if TYPE_CHECKING:
    from gateway.fleet.registry import Registry
    from gateway.fleet.sweep import HealthJob
    from gateway.routing.outliers import OutlierDetector


class ClusterLink:
    """Keeps this process's copy of the fleet up with the cluster's, and shares what the cluster must see."""

    def __init__(self, registry: Registry, outliers: OutlierDetector, health_job: HealthJob) -> None:
        self.registry = registry
        self.outliers = outliers
        self.health_job = health_job
        self.follower: FleetFollower | None = None  # Redis mode: keeps this copy up with the cluster's
        self.local_copy: LocalCopy | None = None  # the host's copy on disk, which the follower keeps
        self._copy_taken = 0  # the version of the host's copy last taken while Redis was down

    def share(self, redis: Redis, health_check_interval: float, local_copy: LocalCopy | None = None) -> None:
        """Follow the cluster's fleet in Redis, and take part in the leader election for the sweep; after `load`."""
        store = self.registry.store
        assert isinstance(store, RedisFleetStore), "share() needs the Redis store configured"
        # Renewed every quarter interval, a dead leader's lease runs out and is taken within one interval.
        self.health_job.leader = LeaderLease(redis, ttl=0.75 * health_check_interval)
        self.health_job.leader.start()
        self.local_copy = local_copy
        keep = local_copy.keep if local_copy is not None else None
        self.follower = FleetFollower(store, self.adopt, keep=keep, down=self._down)
        self.follower.seen = self.registry.shared_version
        self.follower.start()

    def state(self) -> dict[str, Any]:
        """Where the fleet is kept, and in Redis mode whether Redis answers and which process sweeps."""
        store, leader = self.registry.store, self.health_job.leader
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

    def adopt(self, snapshot: Snapshot) -> None:
        """The follower's hook: take a newer fleet from Redis, and keep the sweep scheduled to match it."""
        if self.registry.adopt(snapshot):
            self.outliers.adopt(snapshot.ejections)
            self.health_job.sync()

    def take_copy(self, local_copy: LocalCopy) -> Snapshot | None:
        """Redis is down: take the host's copy if it is newer than the fleet this process has; what was taken."""
        snapshot = local_copy.read_if_changed()  # the follower asks at every retry while Redis is down
        if snapshot is None or snapshot.version <= max(self.registry.shared_version, self._copy_taken):
            return None
        self._copy_taken = snapshot.version
        self.registry.adopt_copy(snapshot)
        return snapshot

    def _down(self) -> None:
        """The follower found Redis down: a sibling process may have read a change this one missed.

        A change published just before Redis went may have reached a sibling, which wrote it to
        the copy before routing on it, and not this process, whose next read found Redis gone.
        """
        taken = self.take_copy(self.local_copy) if self.local_copy is not None else None
        if taken is not None:
            self.health_job.sync()
            log.warning("Redis is down: routing on the host's copy of the fleet (version %d)", taken.version)

    def share_ejection(self, server_id: str) -> None:
        """Redis mode: put a server's ejection, or its end, where every process sees it (never under the lock)."""
        store = self.registry.store
        if isinstance(store, RedisFleetStore):
            ends = self.outliers.ejection_ends(server_id)
            with contextlib.suppress(RedisUnavailable):  # this process keeps it out regardless
                store.put_ejection(server_id, *(ends or (None, 0)))

    def retried(self, change: Callable[..., Any], *args: Any) -> Any:
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

    def stop(self) -> None:
        """Stop following the cluster, and give up the leader lease."""
        if self.follower is not None:
            self.follower.stop()
        if self.health_job.leader is not None:
            self.health_job.leader.stop()
