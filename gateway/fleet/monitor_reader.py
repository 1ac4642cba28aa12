"""Reading each host's resource monitor (/resources), in parallel with the health checks."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import urllib3

from gateway.fleet.resources import Reading, parse_reading

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 1024 * 1024


@dataclass(frozen=True)
class MonitorTarget:
    """One monitor to read: the server it reports for, and the monitor's URL at sweep start."""

    server_id: str
    monitor_url: str


class MonitorReader:
    """Fetches /resources from many monitors at once, each bounded in time and size."""

    def __init__(self, timeout: float = 5.0, concurrency: int = 64) -> None:
        self.timeout = timeout
        self._pool = urllib3.PoolManager(num_pools=max(concurrency, 16), maxsize=1, retries=False)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="monitor-read")

    def submit(self, targets: list[MonitorTarget]) -> list[tuple[MonitorTarget, Future[Reading | None]]]:
        """Start reading every target; collect the results with `collect`."""
        try:
            return [(target, self._executor.submit(self.read, target)) for target in targets]
        except RuntimeError:  # shut down: the gateway is stopping
            return []

    def collect(self, pending: list[tuple[MonitorTarget, Future[Reading | None]]]) -> list[tuple[str, str, Reading]]:
        """The readings that arrived within the deadline, as (server_id, monitor_url, reading)."""
        wait([future for _, future in pending], timeout=2 * self.timeout)
        readings = []
        for target, future in pending:
            reading = future.result() if future.done() and not future.exception() else None
            if reading is not None:
                readings.append((target.server_id, target.monitor_url, reading))
        return readings

    def read(self, target: MonitorTarget) -> Reading | None:
        """One monitor's report, or None (logged) when it cannot be had or makes no sense."""
        try:
            response = self._pool.request(
                "GET",
                target.monitor_url + "/resources",
                timeout=urllib3.Timeout(total=self.timeout),
                redirect=False,
                preload_content=False,
            )
            try:
                body = response.read(MAX_REPORT_BYTES + 1)
            finally:
                response.release_conn()
        except urllib3.exceptions.HTTPError as exc:
            log.info("monitor of %s at %s unreachable: %s", target.server_id, target.monitor_url, exc)
            return None
        if response.status != 200 or len(body) > MAX_REPORT_BYTES:
            log.info("monitor of %s answered HTTP %s", target.server_id, response.status)
            return None
        try:
            return parse_reading(json.loads(body), received=time.monotonic())
        except ValueError as exc:
            log.warning("monitor of %s sent an unusable report: %s", target.server_id, exc)
            return None

    def close(self) -> None:
        """Stop the worker threads and close pooled connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()
