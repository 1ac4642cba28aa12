"""Parallel health checks of the fleet: a hard deadline per check, no redirects, no shared state."""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a health answer is small; never hold a whole large body in memory
WATCH_INTERVAL_S = 0.05  # how often overdue checks are aborted: the most a check can overrun its deadline
USER_AGENT = "gpu-gateway-health-check"

# The gateway's own trouble (out of descriptors, buffers, memory or local ports): such an error
# says nothing about the server, so it must not count against it.
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


class NotChecked(Exception):
    """The gateway itself could not make a check (or was closing); it says nothing about the server."""


@dataclass(eq=False)
class _Call:
    """One check: when it started, its socket once connected, and how it ended."""

    started: float
    sock: socket.socket | None = None
    ended: str | None = None  # None while in flight; then "done", or aborted at the "deadline" or for "closing"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class HealthChecker:
    """Checks many servers at once; a sweep takes about one timeout, however many hang."""

    def __init__(self, path: str = "/health", timeout: float = 5.0, concurrency: int = 256) -> None:
        self.path = path
        self.timeout = timeout
        self._executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="health-check")
        self._lock = threading.Lock()
        self._calls: set[_Call] = set()

    def check_all(self, targets: list[Target]) -> list[HealthResult]:
        """Check every target in parallel and return one result, in order, per target that could be checked.

        Results for checks the gateway itself could not make (it ran out of file descriptors,
        memory or local ports, or it was closing) are left out, so they count neither way.
        """
        outcomes = self._run(targets)
        results = [outcome for outcome in outcomes if isinstance(outcome, HealthResult)]
        skipped = [outcome for outcome in outcomes if isinstance(outcome, NotChecked)]
        if skipped:
            log.warning(
                "health sweep: %d of %d servers could not be checked, through no fault of theirs: %s",
                len(skipped),
                len(targets),
                skipped[0],
            )
        return results

    def check(self, target: Target) -> HealthResult:
        """Check one target under the same hard deadline; raise NotChecked if the gateway could not."""
        outcomes = self._run([target])
        if not outcomes:
            raise NotChecked("the health checker is closed")
        outcome = outcomes[0]
        if isinstance(outcome, NotChecked):
            raise outcome
        return outcome

    def close(self) -> None:
        """Stop the worker threads and abort the checks in flight."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            calls = list(self._calls)
        for call in calls:
            _abort(call, "closing")

    # -- running the checks ----------------------------------------------------------------

    def _run(self, targets: list[Target]) -> list[HealthResult | NotChecked]:
        """Run the checks in the pool, aborting each one that passes its deadline; [] if closed."""
        futures: list[Future[HealthResult | NotChecked]] = []
        try:
            for target in targets:
                futures.append(self._executor.submit(self._attempt, target))
        except RuntimeError as exc:  # closed, or the interpreter is exiting: a graceful stop, not an error
            log.debug("health checks skipped: %s", exc)
            for future in futures:
                future.cancel()
            self._watch(futures)  # those already running still get their deadline
            return []
        self._watch(futures)
        return [NotChecked("closing") if future.cancelled() else future.result() for future in futures]

    def _watch(self, futures: list[Future[HealthResult | NotChecked]]) -> None:
        """Wait for the futures, aborting overdue checks, which only a wall clock can catch."""
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=WATCH_INTERVAL_S)
            deadline = time.monotonic() - self.timeout
            with self._lock:
                overdue = [call for call in self._calls if call.started <= deadline]
            for call in overdue:
                _abort(call, "deadline")

    def _attempt(self, target: Target) -> HealthResult | NotChecked:
        """Make one check in a pool thread; its deadline starts now, not when it was queued."""
        call = _Call(started=time.monotonic())
        with self._lock:
            self._calls.add(call)
        try:
            return self._exchange(target, call)
        finally:
            with self._lock:
                self._calls.discard(call)

    def _exchange(self, target: Target, call: _Call) -> HealthResult | NotChecked:
        """GET the target's health path over a fresh connection; any 2xx status is healthy."""

        def result(ok: bool, detail: str) -> HealthResult:
            return HealthResult(target.server_id, target.url, ok, detail)

        try:
            host, port, request_path = _parse_url(target.url + self.path)
        except ValueError as exc:
            return result(False, f"bad url: {exc}")
        conn = http.client.HTTPConnection(host, port, timeout=self.timeout)  # a backstop; the watcher is the deadline
        status: int | None = None
        failure: str | NotChecked | None = None
        try:
            conn.connect()
            _attach(call, conn.sock)
            conn.request("GET", request_path, headers={"User-Agent": USER_AGENT, "Connection": "close"})
            response = conn.getresponse()
            status = response.status
            try:
                response.read(MAX_BODY_BYTES)  # at most this much; the status decides, not the body
            finally:
                response.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:  # ValueError: a host idna cannot encode
            failure = _failure(exc)
        finally:
            with call.lock:  # from here on _abort leaves the socket alone, as close() releases it
                ended = call.ended = call.ended or "done"
            conn.close()
        if ended == "closing":
            return NotChecked("closing")
        if ended == "deadline":
            return result(False, "timed out")
        if isinstance(failure, NotChecked):
            return failure
        if status is None:  # no status line in time: the failure says why
            return result(False, failure or "no response")
        if failure == "timed out":  # the body too must come within the deadline
            return result(False, failure)
        return result(200 <= status < 300, f"HTTP {status}")  # a body that broke off later: the status decides


def _parse_url(url: str) -> tuple[str, int, str]:
    """Host, port and request target of a plain-HTTP URL; IPv6 literals come without brackets."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not a plain http URL with a host: {url!r}")
    request_path = parts.path or "/"
    if parts.query:
        request_path += "?" + parts.query
    return parts.hostname, parts.port or 80, request_path  # .port raises ValueError if out of range


def _attach(call: _Call, sock: socket.socket | None) -> None:
    """Let the watcher reach the socket; one aborted while connecting stops here."""
    with call.lock:
        call.sock = sock
        ended = call.ended
    if ended is not None:
        raise TimeoutError("aborted while connecting")


def _abort(call: _Call, reason: str) -> None:
    """Wake a check blocked on its socket, whatever it is waiting for, and note why."""
    with call.lock:
        if call.ended is not None:
            return  # finished or aborted already
        call.ended = reason
        if call.sock is not None:
            with contextlib.suppress(OSError):  # the peer may have closed it already; nothing is blocked then
                call.sock.shutdown(socket.SHUT_RDWR)  # unblocks send/recv in the checking thread


def _failure(exc: Exception) -> str | NotChecked:
    """The detail for a failed exchange, or NotChecked when the failure is the gateway's own."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS:
        return NotChecked(f"{exc.strerror or exc} ({errno.errorcode.get(exc.errno, exc.errno)})")
    if isinstance(exc, http.client.HTTPException):  # RemoteDisconnected, BadStatusLine, LineTooLong, ...
        return f"bad response: {_short_reason(exc)}"
    return f"unreachable: {_short_reason(exc)}"


def _short_reason(exc: Exception) -> str:
    """A short reason for a log line or a result: the OS's words, else the exception's."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return text[:120] if text else type(exc).__name__
