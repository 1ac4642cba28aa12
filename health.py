"""Parallel health checks of the fleet: bounded timeouts, no redirects, no shared state."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import urllib3

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One server to check: its id and the base URL it had when the sweep began."""

    server_id: str
    url: str


@dataclass(frozen=True)
class HealthResult:
    """The outcome of checking one target."""

    server_id: str
    url: str
    ok: bool
    detail: str


class HealthChecker:
    """Checks many servers at once; a sweep takes about one timeout, however many hang."""

    def __init__(self, path: str = "/health", timeout: float = 5.0, concurrency: int = 256) -> None:
        self.path = path
        self.timeout = urllib3.Timeout(total=timeout)
        self._pool = urllib3.PoolManager(num_pools=max(concurrency, 16), maxsize=1, retries=False)
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="health-check")

    def check_all(self, targets: list[Target]) -> list[HealthResult]:
        """Check every target in parallel and return one result for each."""
        return list(self._executor.map(self.check, targets))

    def check(self, target: Target) -> HealthResult:
        """GET the target's health path; any 2xx answer within the timeout is healthy."""
        try:
            response = self._pool.request(
                "GET",
                target.url + self.path,
                timeout=self.timeout,
                redirect=False,
                retries=False,
                headers={"User-Agent": "gpu-gateway-health-check"},
            )
        except urllib3.exceptions.NewConnectionError as exc:  # a subclass of the timeout error
            return HealthResult(target.server_id, target.url, False, f"unreachable: {_short_reason(exc)}")
        except urllib3.exceptions.TimeoutError:
            return HealthResult(target.server_id, target.url, False, "timed out")
        except urllib3.exceptions.HTTPError as exc:
            return HealthResult(target.server_id, target.url, False, f"unreachable: {_short_reason(exc)}")
        ok = 200 <= response.status < 300
        return HealthResult(target.server_id, target.url, ok, f"HTTP {response.status}")

    def close(self) -> None:
        """Stop the worker threads and close pooled connections."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.clear()


def _short_reason(exc: Exception) -> str:
    text = str(exc)
    return text.rsplit("] ", 1)[-1] if "] " in text else type(exc).__name__
