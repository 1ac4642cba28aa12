"""Parallel health checks of the fleet: a hard deadline per check, no redirects, no shared state."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import socket
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # the status decides; the body is read only to finish the exchange
# Errors of the gateway's own making (out of sockets or memory): they say nothing about a server.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})


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


class GatewayFault(Exception):
    """The gateway itself could not make the check."""


class HealthChecker:
    """Checks many servers at once; a sweep takes about one timeout, however many hang or drip."""

    def __init__(self, path: str = "/health", timeout: float = 5.0, concurrency: int = 256) -> None:
        self.path = path
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="health-check")
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[float, http.client.HTTPConnection]] = {}  # id -> (deadline, conn)
        self._cut: set[int] = set()

    def check_all(self, targets: list[Target]) -> list[HealthResult]:
        """Check every target in parallel; one result per target that could be checked.

        Checks the gateway itself could not make (no file descriptors left, say) are left
        out, so they count neither for nor against a server.
        """
        try:
            futures = [self._executor.submit(self.check, target) for target in targets]
        except RuntimeError:  # the executor is shut down: the gateway is stopping
            log.debug("health checker closed; sweep skipped")
            return []
        pending: set[Future[HealthResult]] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=min(0.25, self.timeout / 4), return_when=FIRST_COMPLETED)
            self._cut_overdue()
        results, local = [], 0
        for future in futures:
            if isinstance(future.exception(), GatewayFault):
                local += 1
            else:
                results.append(future.result())
        if local:
            log.warning("%d health checks could not be made by the gateway itself (out of sockets?)", local)
        return results

    def check(self, target: Target) -> HealthResult:
        """GET the target's health path; any 2xx answer within the deadline is healthy."""
        parts = urlsplit(target.url)
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=self.timeout)
        key = id(connection)
        with self._lock:
            self._in_flight[key] = (time.monotonic() + self.timeout, connection)
        response: http.client.HTTPResponse | None = None
        failure: BaseException | None = None
        try:
            connection.request("GET", self.path, headers={"User-Agent": "gpu-gateway-health-check"})
            response = connection.getresponse()
            response.read(MAX_BODY_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            failure = exc
        finally:
            if response is not None:
                response.close()
            connection.close()
            with self._lock:
                self._in_flight.pop(key, None)
                was_cut = key in self._cut
                self._cut.discard(key)
        # A cut socket can look like a clean end of headers to http.client: the cut decides.
        if was_cut or isinstance(failure, TimeoutError):
            return HealthResult(target.server_id, target.url, False, "timed out")
        if isinstance(failure, OSError) and failure.errno in LOCAL_ERRNOS:
            raise GatewayFault(str(failure)) from failure
        if failure is not None or response is None:
            return HealthResult(target.server_id, target.url, False, f"unreachable: {_short_reason(failure)}")
        ok = 200 <= response.status < 300
        return HealthResult(target.server_id, target.url, ok, f"HTTP {response.status}")

    def _cut_overdue(self) -> None:
        """Shut the sockets of checks past their deadline; a server that drips bytes cannot hold one."""
        now = time.monotonic()
        with self._lock:
            overdue = [(key, conn) for key, (deadline, conn) in self._in_flight.items() if deadline <= now]
            self._cut.update(key for key, _ in overdue)
        for _, connection in overdue:
            _shut(connection)

    def close(self) -> None:
        """Stop the worker threads and cut checks in flight."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            connections = [conn for _, conn in self._in_flight.values()]
        for connection in connections:
            _shut(connection)


def _shut(connection: http.client.HTTPConnection) -> None:
    sock = connection.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by its own thread
            sock.shutdown(socket.SHUT_RDWR)


def _short_reason(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
