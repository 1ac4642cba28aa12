"""How long one health sweep of a large fleet takes when some servers hang.

Starts one helper process that listens on a distinct 127.0.0.1 port per fake server: most answer
`GET /health` with 200 at once, a black-holed fraction accept the connection and never answer.
It then registers them in a `BackendManager` (store=None, so nothing touches the disk) and times
`run_health_sweep()` several times, first with the black-holed fraction, then with none. A sweep
should take about one timeout, however many servers hang, as long as they fit in the pool.

Run:  .venv/bin/python bench/sweep_bench.py [--servers 1000] [--blackholed-fraction 0.1]
          [--timeout 5] [--concurrency 256] [--repeat 3] [--json-out sweep.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from gateway.fleet.health import HealthChecker, HealthResult, Target
from gateway.manager import BackendManager

HOST = "127.0.0.1"
HEALTHY_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
HELPER_START_TIMEOUT_S = 60.0
HELPER_STOP_TIMEOUT_S = 10.0


# -- the fake fleet, served from one helper process -----------------------------------------


def serve_fleet(healthy_count: int, blackholed_count: int, lifetime_s: float, conn: Connection) -> None:
    """The helper process: listen, send the ports back, serve until told to stop or the lifetime ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    asyncio.run(_serve_fleet(healthy_count, blackholed_count, lifetime_s, conn))


async def _serve_fleet(healthy_count: int, blackholed_count: int, lifetime_s: float, conn: Connection) -> None:
    fleet = FakeFleet(hold_s=lifetime_s)
    stop = asyncio.Event()
    try:
        healthy_ports = [await fleet.listen(fleet.answer_health) for _ in range(healthy_count)]
        blackholed_ports = [await fleet.listen(fleet.hold) for _ in range(blackholed_count)]
        conn.send((healthy_ports, blackholed_ports))
        asyncio.get_running_loop().add_reader(conn.fileno(), stop.set)  # a message, or EOF if the parent died
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=lifetime_s)
    finally:
        await fleet.close()


class FakeFleet:
    """Many listening sockets on one event loop: some answer /health, some hold connections silently."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s  # a black hole lets go of a connection after this long at most
        self._servers: list[asyncio.Server] = []
        self._readers: set[asyncio.StreamReader] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def listen(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> int:
        """Listen on a fresh 127.0.0.1 port with `handler` and return the port."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._readers.add(reader)
            self._handlers.add(task)
            try:
                await handler(reader, writer)
            finally:
                writer.close()
                self._readers.discard(reader)
                self._handlers.discard(task)

        server = await asyncio.start_server(tracked, HOST, 0, backlog=256)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def answer_health(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read the request head, answer 200 "ok" and close."""
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            writer.write(HEALTHY_RESPONSE)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass

    async def hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Accept, never answer; let go when the client hangs up, the fleet closes, or after `hold_s`."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(), timeout=self.hold_s)

    async def close(self) -> None:
        """Stop listening and end every open connection, letting handlers return rather than cancelling them."""
        for server in self._servers:
            server.close()
        for reader in list(self._readers):
            reader.feed_eof()
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=HELPER_STOP_TIMEOUT_S / 2)
            for task in pending:
                task.cancel()


class FleetProcess:
    """Starts and stops the helper process that plays the fleet."""

    def __init__(self, healthy_count: int, blackholed_count: int, lifetime_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve_fleet,
            args=(healthy_count, blackholed_count, lifetime_s, child_conn),
            name="sweep-bench-fleet",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        if not self._conn.poll(HELPER_START_TIMEOUT_S):
            self.stop()
            raise RuntimeError(f"the fleet helper did not start within {HELPER_START_TIMEOUT_S:g}s")
        self.healthy_ports, self.blackholed_ports = self._conn.recv()

    @property
    def pid(self) -> int | None:
        """The helper's process id."""
        return self._process.pid

    def stop(self) -> None:
        """Ask the helper to stop; terminate it if it does not."""
        with contextlib.suppress(OSError, ValueError):  # the helper may be gone already
            self._conn.send("stop")
        self._process.join(HELPER_STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(HELPER_STOP_TIMEOUT_S)
        self._conn.close()


# -- the sweep ------------------------------------------------------------------------------


class RecordingHealthChecker(HealthChecker):
    """A HealthChecker that keeps the results of its last `check_all`."""

    last_results: list[HealthResult] | None = None

    def check_all(self, targets: list[Target]) -> list[HealthResult]:
        """Check as usual, and remember the results."""
        self.last_results = super().check_all(targets)
        return self.last_results


@dataclass
class SweepResult:
    """One timed sweep and whether it failed exactly the black-holed servers."""

    wall_s: float
    manager_duration_s: float
    checked: int
    healthy: int
    failed: int
    failed_timed_out: int
    sane: bool
    problems: list[str]


def run_scenario(
    fleet: FleetProcess, servers: int, blackholed: int, args: argparse.Namespace
) -> tuple[list[SweepResult], float]:
    """Register `servers` servers, `blackholed` of them spread evenly among them, and sweep `repeat` times."""
    blackholed_positions = {round(i * servers / blackholed) for i in range(blackholed)} if blackholed else set()
    healthy_ports = iter(fleet.healthy_ports)
    blackholed_ports = iter(fleet.blackholed_ports)
    checker = RecordingHealthChecker(timeout=args.timeout, concurrency=args.concurrency)
    manager = BackendManager(store=None, failure_threshold=3, health_check_interval=10**6, health_checker=checker)
    blackholed_ids: set[str] = set()
    sweeps: list[SweepResult] = []
    try:
        started = time.perf_counter()
        for position in range(servers):
            server_id = f"S{position:05d}"
            if position in blackholed_positions:
                manager.register_server(server_id, HOST, next(blackholed_ports))
                blackholed_ids.add(server_id)
            else:
                manager.register_server(server_id, HOST, next(healthy_ports))
        register_s = time.perf_counter() - started
        for number in range(1, args.repeat + 1):
            checker.last_results = None
            started = time.perf_counter()
            manager.run_health_sweep()
            wall_s = time.perf_counter() - started
            sweep = check_sweep(manager, checker.last_results, blackholed_ids, servers, number, wall_s)
            sweeps.append(sweep)
            print_sweep(number, args.repeat, sweep)
    finally:
        manager.shutdown()
    return sweeps, register_s


def check_sweep(
    manager: BackendManager,
    results: list[HealthResult] | None,
    blackholed_ids: set[str],
    servers: int,
    number: int,
    wall_s: float,
) -> SweepResult:
    """Compare one sweep's results and the manager's state with what the fleet should give."""
    problems: list[str] = []
    results = results or []
    if len(results) != servers:
        problems.append(f"{len(results)} results for {servers} servers")
    failed_ids = {result.server_id for result in results if not result.ok}
    timed_out = sum(1 for result in results if not result.ok and result.detail == "timed out")
    if failed_ids != blackholed_ids:
        problems.append(
            f"{len(failed_ids - blackholed_ids)} answering servers failed, "
            f"{len(blackholed_ids - failed_ids)} black-holed ones passed"
        )
    if timed_out != len(failed_ids):
        details = sorted({result.detail for result in results if not result.ok and result.detail != "timed out"})
        problems.append(f"{len(failed_ids) - timed_out} failed without timing out: {details[:3]}")
    wrong_counts = [
        server.server_id
        for server in manager.list_servers()
        if server.fail_count != (number if server.server_id in blackholed_ids else 0) or server.last_check_time is None
    ]
    if wrong_counts:
        problems.append(f"{len(wrong_counts)} servers with an unexpected fail_count, e.g. {wrong_counts[:3]}")
    return SweepResult(
        wall_s=wall_s,
        manager_duration_s=float(manager.last_sweep.get("duration_s", math.nan)),
        checked=len(results),
        healthy=len(results) - len(failed_ids),
        failed=len(failed_ids),
        failed_timed_out=timed_out,
        sane=not problems,
        problems=problems,
    )


def print_sweep(number: int, repeat: int, sweep: SweepResult) -> None:
    """One line per sweep: time, counts, and the sanity verdict."""
    verdict = "OK (failed == the black-holed, all timed out)" if sweep.sane else "FAIL: " + "; ".join(sweep.problems)
    print(
        f"  sweep {number}/{repeat}: {sweep.wall_s:6.2f} s wall ({sweep.manager_duration_s:.2f} s by last_sweep); "
        f"{sweep.checked} checked, {sweep.healthy} healthy, {sweep.failed} failed "
        f"({sweep.failed_timed_out} timed out); check {verdict}",
        flush=True,
    )


# -- the run --------------------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit, and return both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--servers", type=int, default=1000, help="fleet size (default 1000)")
    parser.add_argument("--blackholed-fraction", type=float, default=0.1, help="share that never answers (0.1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="health check timeout, s (default 5)")
    parser.add_argument("--concurrency", type=int, default=256, help="checker threads (default 256)")
    parser.add_argument("--repeat", type=int, default=3, help="sweeps per scenario (default 3)")
    parser.add_argument("--json-out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.servers <= 5000:
        parser.error("--servers must be between 1 and 5000")
    if not 0 <= args.blackholed_fraction <= 1:
        parser.error("--blackholed-fraction must be between 0 and 1")
    if not 0 < args.timeout <= 60 or not 1 <= args.concurrency <= 1024 or not 1 <= args.repeat <= 20:
        parser.error("need 0 < --timeout <= 60, 1 <= --concurrency <= 1024, 1 <= --repeat <= 20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the manager warns once per server it marks unhealthy
    soft, hard = raise_fd_limit()
    blackholed = round(args.servers * args.blackholed_fraction)
    needed_fds = 2 * args.servers + blackholed + 3 * args.concurrency + 64
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"command: {shlex.join(sys.orig_argv)}")
    print(
        f"machine: nproc={cpus}, python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}"
    )
    print(f"RLIMIT_NOFILE: soft={soft} hard={hard} (about {needed_fds} needed)")
    if soft != resource.RLIM_INFINITY and soft < needed_fds:
        print("not enough file descriptors; lower --servers or raise the hard limit", file=sys.stderr)
        return 2
    scenarios = [(f"{blackholed} of {args.servers} black-holed", blackholed), (f"0 of {args.servers} black-holed", 0)]
    lifetime_s = 60 + 2 * args.repeat * (args.timeout + 30)  # the helper outlives a healthy run, then quits
    print(
        f"settings: timeout={args.timeout:g}s, concurrency={args.concurrency}, repeat={args.repeat}, "
        f"failure_threshold=3, store=None"
    )
    report: dict[str, Any] = {
        "command": shlex.join(sys.orig_argv),
        "machine": {"nproc": cpus, "python": platform.python_version(), "platform": platform.platform()},
        "rlimit_nofile": [soft, hard],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "scenarios": [],
    }
    all_sane = True
    fleet = FleetProcess(args.servers, blackholed, lifetime_s)
    try:
        print(
            f"fleet helper: pid {fleet.pid}, {len(fleet.healthy_ports)} answering + "
            f"{len(fleet.blackholed_ports)} black-holed ports on {HOST}"
        )
        for name, count in scenarios:
            pool_rounds = math.ceil(count / args.concurrency)
            print(
                f"\n{name} (expect about {pool_rounds} x timeout = {pool_rounds * args.timeout:g} s "
                f"plus the answering servers' time):"
            )
            sweeps, register_s = run_scenario(fleet, args.servers, count, args)
            median = statistics.median(sweep.wall_s for sweep in sweeps)
            sane = all(sweep.sane for sweep in sweeps)
            all_sane &= sane
            print(
                f"  median {median:.2f} s over {len(sweeps)} sweeps "
                f"({median / args.timeout:.2f} x timeout); registering took {register_s:.2f} s; "
                f"sanity {'OK' if sane else 'FAILED'}"
            )
            report["scenarios"].append(
                {
                    "name": name,
                    "servers": args.servers,
                    "blackholed": count,
                    "median_wall_s": median,
                    "register_s": register_s,
                    "sane": sane,
                    "sweeps": [asdict(sweep) for sweep in sweeps],
                }
            )
    finally:
        fleet.stop()
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0 if all_sane else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; the fleet helper and checker threads were stopped", file=sys.stderr)
        sys.exit(130)
