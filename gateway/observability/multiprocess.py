"""/metrics across several gunicorn workers: prometheus_client's multiprocess mode.

With PROMETHEUS_MULTIPROC_DIR set (gateway/gunicorn_conf.py sets it when it runs more than one
worker), every Counter, Histogram and Gauge keeps its values in a file per worker there, and a
scrape sums them (MultiProcessCollector). Those metrics then register on no registry: the
scrape's registry holds the collector that reads the files, so registering them as well would
count the scraping worker twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector, values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The folder of the workers' metric files, or None when this process counts alone."""
    path = os.environ.get(MULTIPROC_ENV) or None
    if path is not None and values.ValueClass is values.MutexValue:
        # prometheus_client picks its value class once, when it is imported: too late to share.
        raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported; set it before")
    return path


def values_registry(registry: CollectorRegistry) -> CollectorRegistry | None:
    """Where a Counter, Histogram or Gauge registers: `registry`, or none in multiprocess mode."""
    return None if multiprocess_dir() else registry


class WorkerCollector(Collector):
    """The answering worker's own process and GC metrics, labelled with its pid, never summed."""

    def __init__(self) -> None:
        # Memory, fds and CPU of one worker summed with another's would describe no process.
        self.own = CollectorRegistry()
        ProcessCollector(registry=self.own)
        GCCollector(registry=self.own)

    def collect(self) -> Iterator[Metric]:
        pid = str(os.getpid())
        for family in self.own.collect():
            family.samples = [s._replace(labels={**s.labels, "pid": pid}) for s in family.samples]
            yield family


class LeftServersFilter(Collector):
    """The summed metrics, without the series of servers that left the fleet.

    prometheus_client cannot remove a series from the workers' files, so a server's counts stay
    there after it leaves; the scrape drops them, as the one-process registry forgets them.
    """

    def __init__(self, inner: Collector, keep: Callable[[str], bool]) -> None:
        self.inner = inner
        self.keep = keep  # server label -> whether it is still in the scraping worker's fleet

    def collect(self) -> Iterator[Metric]:
        kept: dict[str, bool] = {}
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if self._kept(s.labels.get("server"), kept)]
            yield family

    def _kept(self, server: str | None, kept: dict[str, bool]) -> bool:
        if server is None:
            return True
        if server not in kept:  # one lookup per server and scrape, not one per sample
            kept[server] = self.keep(server)
        return kept[server]
