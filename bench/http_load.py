"""HTTP calls from a few client threads on kept-alive connections: how many, how fast, what failed."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from processes import HOST

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Call:
    """One request to send."""

    method: str
    path: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class LoadRun:
    """What a batch of calls did: how many were answered as expected, how fast, and what failed."""

    clients: int
    attempted: int
    succeeded: int
    seconds: float
    per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    failures: dict[str, int] = field(default_factory=dict)


def send_all(port: int, calls: Iterable[Call], clients: int, deadline_s: float, expect: int = 200) -> LoadRun:
    """Send every call from `clients` threads, each on its own kept-alive connection, until done or the deadline."""
    pending = iter(calls)
    pending_lock = threading.Lock()
    latencies: list[float] = []
    failures: dict[str, int] = {}
    result_lock = threading.Lock()
    stop_at = time.monotonic() + deadline_s

    def next_call() -> Call | None:
        with pending_lock:
            return next(pending, None)

    def record(latency_s: float | None, failure: str | None) -> None:
        with result_lock:
            if failure is None and latency_s is not None:
                latencies.append(latency_s)
            elif failure is not None:
                failures[failure] = failures.get(failure, 0) + 1

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            while time.monotonic() < stop_at and (call := next_call()) is not None:
                latency, failure = call_once(connection, call, expect)
                record(latency, failure)
                if failure is not None:  # start afresh: the connection may be broken
                    connection.close()
                    connection = http.client.HTTPConnection(HOST, port, timeout=30)
        finally:
            connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=client, name=f"client-{n}", daemon=True) for n in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(deadline_s + 35)
    seconds = time.perf_counter() - started
    latencies.sort()
    return LoadRun(
        clients=clients,
        attempted=len(latencies) + sum(failures.values()),
        succeeded=len(latencies),
        seconds=round(seconds, 3),
        per_s=round(len(latencies) / seconds, 1) if seconds else 0.0,
        latency_p50_ms=round(percentile(latencies, 50) * 1000, 2),
        latency_p99_ms=round(percentile(latencies, 99) * 1000, 2),
        failures=failures,
    )


def call_once(connection: http.client.HTTPConnection, call: Call, expect: int) -> tuple[float | None, str | None]:
    """One call; (seconds, None) when it is answered with `expect`, else (None, a short reason)."""
    started = time.perf_counter()
    try:
        connection.request(call.method, call.path, call.body, dict(call.headers))
        response = connection.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        return None, type(exc).__name__
    if response.status != expect:
        return None, f"HTTP {response.status}"
    return time.perf_counter() - started, None


def percentile(values: list[float], percent: float) -> float:
    """The nearest-rank percentile of sorted `values`; nan when empty."""
    if not values:
        return float("nan")
    rank = max(0, min(len(values) - 1, round(percent / 100 * len(values)) - 1))
    return values[rank]
