"""The allocations' metrics: the keys each server holds now, the moves made, and the refusals."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.cluster.connection import RedisUnavailable
from gateway.observability.multiprocess import values_registry


class AllocationCollector(Collector):
    """The keys allocated to each server, counted in the store at scrape time: never drifts, never summed."""

    def __init__(self, counts: Callable[[], dict[str, int]], servers: Callable[[], Iterable[str]]) -> None:
        self.counts = counts  # the store's counts(): server id -> the keys it holds (in Redis: the cluster's)
        self.servers = servers  # the registered servers' ids, each shown at 0 while it holds none

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.counts()
        except RedisUnavailable:  # the rest of /metrics still answers; gateway_redis_up says why this is missing
            return
        family = GaugeMetricFamily("gateway_allocations", "Keys allocated to each server now", labels=["server"])
        # A server that left and still holds keys (no other had room for them) stays in: they are there.
        for server_id in sorted({*self.servers(), *counts}):
            family.add_metric([server_id], counts.get(server_id, 0))
        yield family


class AllocationMetrics:
    """What the allocation service tells: each move it records, and each allocation or move refused."""

    def __init__(
        self,
        registry: CollectorRegistry,
        counts: Callable[[], dict[str, int]],
        servers: Callable[[], Iterable[str]],
        move_types: Iterable[str] = (),
    ) -> None:
        counted = values_registry(registry)  # none under several workers: the scrape sums their files
        self.moves = Counter(
            "gateway_allocation_moves", "Allocation moves made, by the type the history records", ["type"],
            registry=counted,
        )  # fmt: skip
        self.refusals = Counter(
            "gateway_allocation_refusals", "Placements and moves refused, by type and why: no_room, migrate_refused",
            ["type", "reason"], registry=counted,
        )  # fmt: skip
        for move_type in move_types:  # at 0 from the start, so that a rate sees the first move
            self.moves.labels(move_type)
        registry.register(AllocationCollector(counts, servers))  # read at scrape time from the store

    def moved(self, move_type: str) -> None:
        self.moves.labels(move_type).inc()

    def refused(self, move_type: str, reason: str) -> None:
        self.refusals.labels(move_type, reason).inc()
