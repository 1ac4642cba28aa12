"""Streaming through a gateway: time to the first token, and how many open streams one process holds."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateways import BENCH, Gateway, start_gateway
from plan import Plan, say
from processes import HOST, Service, descendants, free_port, open_fds, rss_bytes

END_OF_BODY = b"\r\n0\r\n\r\n"
STREAM_PATH = "/api/stream?first=0.1&chunks=10&delay=0.05"  # the first token after 0.1 s, then 9 more
MIB = 1024 * 1024
OPEN_CONCURRENCY = 200  # connections being opened at once; the open ones stay open


class StreamBroken(Exception):
    """The stream ended, failed or stalled before the expected bytes came."""


async def request_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection and send `GET path`, asking the server to close when the answer ends."""
    reader, writer = await asyncio.open_connection(HOST, port, limit=1024 * 1024)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, seen: bytearray, marker: bytes, timeout_s: float) -> None:
    """Read into `seen` until `marker` is in it; raise StreamBroken on EOF or timeout."""
    deadline = time.monotonic() + timeout_s
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StreamBroken(f"no {marker!r} within {timeout_s:g}s")
        try:
            data = await asyncio.wait_for(reader.read(65536), timeout=left)
        except TimeoutError:
            raise StreamBroken(f"no {marker!r} within {timeout_s:g}s") from None
        if not data:
            status = bytes(seen[: seen.find(b"\r\n")]) if seen else b"nothing"
            raise StreamBroken(f"closed before {marker!r} (status line: {status!r})")
        seen += data


# -- time to the first token ------------------------------------------------------------------


@dataclass
class FirstTokenTimes:
    """Time to the first token and to the whole answer, over sequential requests, in ms."""

    target: str
    samples: int
    first_token_p50_ms: float
    first_token_max_ms: float
    complete_p50_ms: float
    failures: int
    first_token_ms: list[float] = field(default_factory=list)


async def time_first_token(target: str, port: int, path: str, samples: int, timeout_s: float) -> FirstTokenTimes:
    """Request `path` `samples` times, one after the other; time the first event and the end."""
    firsts: list[float] = []
    completes: list[float] = []
    failures = 0
    for _ in range(samples):
        started = time.perf_counter()
        reader, writer = await request_stream(port, path)
        seen = bytearray()
        try:
            await read_until(reader, seen, b"data: tok0", timeout_s)
            firsts.append((time.perf_counter() - started) * 1000)
            await read_until(reader, seen, END_OF_BODY, timeout_s)
            completes.append((time.perf_counter() - started) * 1000)
        except StreamBroken:
            failures += 1
        finally:
            writer.close()
    return FirstTokenTimes(
        target=target,
        samples=samples,
        first_token_p50_ms=round(statistics.median(firsts), 2) if firsts else float("nan"),
        first_token_max_ms=round(max(firsts), 2) if firsts else float("nan"),
        complete_p50_ms=round(statistics.median(completes), 2) if completes else float("nan"),
        failures=failures,
        first_token_ms=[round(ms, 2) for ms in firsts],
    )


# -- holding many streams open ----------------------------------------------------------------


@dataclass
class HoldStep:
    """One step: open `streams` streams at once, hold them, release them, count what went wrong."""

    streams: int
    opened: int = 0
    completed: int = 0
    failed: int = 0
    open_s: float = 0.0
    held_by_backend: int = -1
    measured: dict[str, Any] = field(default_factory=dict)  # the gateway's RSS and fds while holding
    failures: dict[str, int] = field(default_factory=dict)  # failure reason -> count

    @property
    def clean(self) -> bool:
        """Every stream opened, was held, and ended whole."""
        return self.opened == self.streams and self.completed == self.streams and not self.failed


class StreamHolder:
    """Opens N streams through the gateway and keeps them open until the backend releases them."""

    def __init__(self, port: int, path: str, open_timeout_s: float, end_timeout_s: float) -> None:
        self.port = port
        self.path = path
        self.open_timeout_s = open_timeout_s
        self.end_timeout_s = end_timeout_s

    async def run_step(
        self,
        streams: int,
        while_held: Callable[[], Any],
        release: Callable[[], Any],
    ) -> HoldStep:
        """Open `streams` streams; once all are open (or time is up) call `while_held`, then `release`."""
        step = HoldStep(streams)
        all_open = asyncio.Event()
        gate = asyncio.Semaphore(OPEN_CONCURRENCY)
        released = asyncio.Event()

        def opened() -> None:
            step.opened += 1
            if step.opened == streams:
                all_open.set()

        started = time.perf_counter()
        tasks = [asyncio.create_task(self.hold_one(gate, opened, released)) for _ in range(streams)]
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_open.wait(), timeout=self.open_timeout_s)
            step.open_s = round(time.perf_counter() - started, 3)
            await asyncio.sleep(1.0)  # let the gateway settle before its memory is read
            step.measured = await asyncio.to_thread(while_held)
            step.held_by_backend = int(step.measured.get("held_by_backend", -1))
            released.set()
            await asyncio.to_thread(release)
            results = await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), timeout=self.end_timeout_s + 10
            )
        finally:
            for task in tasks:
                task.cancel()
        for result in results:
            if result is None:
                step.completed += 1
            else:
                step.failed += 1
                reason = str(result) if isinstance(result, StreamBroken) else type(result).__name__
                step.failures[reason] = step.failures.get(reason, 0) + 1
        return step

    async def hold_one(self, gate: asyncio.Semaphore, opened: Callable[[], None], released: asyncio.Event) -> None:
        """One client: open the stream, wait for its first event, then for its end after the release."""
        seen = bytearray()
        writer: asyncio.StreamWriter | None = None
        try:
            async with gate:
                reader, writer = await asyncio.wait_for(request_stream(self.port, self.path), self.open_timeout_s)
                await read_until(reader, seen, b"data: held", self.open_timeout_s)
            opened()
            await released.wait()
            await read_until(reader, seen, END_OF_BODY, self.end_timeout_s)
            if b"data: done" not in seen:
                raise StreamBroken("the stream ended without its last event")
        except (OSError, TimeoutError) as exc:
            raise StreamBroken(f"{type(exc).__name__}: {exc}") from None
        finally:
            if writer is not None:
                writer.close()


# -- the suite's streaming part ------------------------------------------------------------------


def bench_streams(folder: Path, plan: Plan) -> dict[str, Any]:
    """Time to the first token through ours vs direct, then open streams held at once, stepping up."""
    with contextlib.ExitStack() as stack:
        backend_port = free_port()
        argv = [sys.executable, str(BENCH / "stream_backend.py"), "--port", str(backend_port), "--max-hold", "120"]
        backend = Service("stream-backend", argv, folder / "stream-backend.log")
        stack.callback(backend.stop)
        backend.wait_for_port(backend_port)
        extra = {"GATEWAY_WORKER_CONNECTIONS": str(plan.stream_worker_connections)}
        gateway = start_gateway(folder / "streams", free_port(), extra, name="ours-streams")
        stack.callback(gateway.stop)
        gateway.register("L1", backend_port)
        connections = plan.stream_worker_connections
        say(f"streams: backend :{backend_port}, ours :{gateway.port}, worker_connections={connections}")
        first_token = [
            asyncio.run(time_first_token(name, port, STREAM_PATH, plan.first_token_samples, timeout_s=10))
            for name, port in (("direct", backend_port), ("ours", gateway.port))
        ]
        for times in first_token:
            say(
                f"  first token {times.target:<6} p50 {times.first_token_p50_ms:.2f} ms, max {times.first_token_max_ms}"
            )
        steps = hold_streams(gateway, backend_port, plan)
    direct, ours = first_token
    return {
        "setup": {
            "backend": "bench/stream_backend.py, asyncio, text/event-stream, chunked",
            "first_token_path": STREAM_PATH,
            "gateway_worker_connections": plan.stream_worker_connections,
        },
        "first_token": [asdict(times) for times in first_token],
        "added_first_token_p50_ms": round(ours.first_token_p50_ms - direct.first_token_p50_ms, 3),
        "hold_steps": steps,
        "max_streams_held": max((s["streams"] for s in steps if s["clean"]), default=0),
    }


def hold_streams(gateway: Gateway, backend_port: int, plan: Plan) -> list[dict[str, Any]]:
    """Step the number of open streams up until one step fails or the time budget is spent."""
    holder = StreamHolder(gateway.port, "/api/hold", open_timeout_s=60, end_timeout_s=60)
    worker = (descendants(gateway.service.pid) or [gateway.service.pid])[0]
    idle_rss = gateway.service.rss_bytes()

    def while_held() -> dict[str, Any]:
        return {
            "gateway_rss_mib": round(gateway.service.rss_bytes() / MIB, 1),
            "worker_rss_mib": round(rss_bytes([worker]) / MIB, 1),
            "worker_fds": open_fds(worker),
            "held_by_backend": _backend_json(backend_port, "GET", "/control/held").get("held", -1),
        }

    def release() -> None:
        _backend_json(backend_port, "POST", "/control/release")

    steps: list[dict[str, Any]] = []
    deadline = time.monotonic() + plan.stream_budget_s
    for count in plan.stream_steps:
        if time.monotonic() > deadline:
            say(f"  streams: time budget of {plan.stream_budget_s:g}s spent; stopping before {count}")
            break
        step = asyncio.run(holder.run_step(count, while_held, release))
        row = {**asdict(step), "clean": step.clean, "idle_rss_mib": round(idle_rss / MIB, 1)}
        row["rss_after_release_mib"] = round(gateway.service.rss_bytes() / MIB, 1)
        held_rss = step.measured.get("gateway_rss_mib", 0.0) * MIB
        row["rss_per_stream_kib"] = round((held_rss - idle_rss) / count / 1024, 1) if held_rss else None
        steps.append(row)
        say(
            f"  streams {count:>5}: opened {step.opened} in {step.open_s:.1f}s, completed {step.completed}, "
            f"failed {step.failed}, gateway RSS {step.measured.get('gateway_rss_mib')} MiB, {step.failures or ''}"
        )
        if not step.clean:
            break
        time.sleep(1.0)  # let the closed connections go before the next step
    return steps


def _backend_json(port: int, method: str, path: str) -> dict[str, Any]:
    connection = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        connection.request(method, path)
        return dict(json.loads(connection.getresponse().read()))
    except (OSError, ValueError):
        return {}
    finally:
        connection.close()
