"""The job queue's metrics: jobs by outcome, waits and run times, lease expiries, and the queue now."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.cluster.connection import RedisUnavailable
from gateway.observability.multiprocess import values_registry

SECONDS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)


class QueueCollector(Collector):
    """The queue's depth and its dead letters, counted in the store at scrape time: never drifts."""

    def __init__(self, counts: Callable[[], Any]) -> None:
        self.counts = counts  # the store's counts(): by_status, queued_by_priority

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self.counts()
        except RedisUnavailable:  # the rest of /metrics still answers; gateway_redis_up says why these are missing
            return
        yield GaugeMetricFamily("gateway_jobs_queued", "Jobs waiting in the queue", value=counts.by_status["queued"])
        yield GaugeMetricFamily("gateway_jobs_running", "Jobs running on a server", value=counts.by_status["running"])
        yield GaugeMetricFamily(
            "gateway_job_dead_letters", "Failed jobs kept for the operator to read and retry",
            value=counts.by_status["failed"],
        )  # fmt: skip


class JobMetrics:
    """What the job service tells: each job's outcome, its wait and run time, and expired leases."""

    def __init__(self, registry: CollectorRegistry, counts: Callable[[], Any]) -> None:
        counted = values_registry(registry)  # none under several workers: the scrape sums their files
        self.jobs = Counter("gateway_jobs", "Jobs by the status they reached", ["status"], registry=counted)
        self.wait = Histogram(
            "gateway_job_wait_seconds", "Time a job waited in the queue before it started",
            buckets=SECONDS, registry=counted,
        )  # fmt: skip
        self.run = Histogram(
            "gateway_job_run_seconds", "Time a job ran, from its start to its answer",
            buckets=SECONDS, registry=counted,
        )  # fmt: skip
        self.lease_expired = Counter(
            "gateway_job_lease_expired", "Leases that ran out without a heartbeat", registry=counted
        )
        registry.register(QueueCollector(counts))  # read at scrape time from the store, never summed

    def submitted(self) -> None:
        self.jobs.labels("queued").inc()

    def started(self, waited: float) -> None:
        self.wait.observe(max(waited, 0.0))

    def finished(self, status: str, ran: float | None) -> None:
        self.jobs.labels(status).inc()
        if ran is not None:
            self.run.observe(max(ran, 0.0))

    def expired(self, count: int) -> None:
        if count:
            self.jobs.labels("expired").inc(count)
