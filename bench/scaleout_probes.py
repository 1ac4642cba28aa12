"""What bench/scaleout_bench.py measures with: its redis-server, where the CPU went, how soon a change spreads."""

from __future__ import annotations

import contextlib
import http.client
import resource
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateways import Gateway
from processes import CLOCK_TICKS, HOST, Service, ServiceFailed, cpu_seconds, free_port
from wrk_load import LoadResult, run_wrk

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# everysec, not deploy/redis.conf's always: the figures here are about reads and pub/sub, not fsyncs.
REDIS_PERSISTENCE = ("--save", "", "--appendonly", "yes", "--appendfsync", "everysec")
POLL_PATH = "/api/echo"
TIMINGS = ("routed_at_b_ms", "routed_after_reply_ms", "register_reply_ms", "gone_at_b_ms", "unregister_reply_ms")


# -- redis-server ------------------------------------------------------------------------------


def start_redis(folder: Path) -> tuple[Service, str]:
    """A redis-server of the bench's own on a free port, its files in `folder`; the Service and its URL."""
    if not Path(REDIS_SERVER).is_file():
        raise ServiceFailed("redis-server is not installed: apt-get install redis-server, and run again")
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--dir", str(folder), *REDIS_PERSISTENCE]
    argv += ["--daemonize", "no", "--logfile", ""]  # to stdout, which Service keeps in redis.log
    service = Service("redis", argv, folder / "redis.log")
    try:
        service.wait_for_port(port)
        _wait_for_pong(service, port)
    except BaseException:
        service.stop()
        raise
    return service, f"redis://{HOST}:{port}/0"


def _wait_for_pong(service: Service, port: int, timeout_s: float = 10.0) -> None:
    """Redis accepts before it has loaded its files; wait until it answers PING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        service.check_running()
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise ServiceFailed(f"redis-server did not answer PING within {timeout_s:g}s:\n{service.log_tail()}")


# -- where the CPU went ------------------------------------------------------------------------


def machine_busy_s() -> float:
    """CPU seconds every core has spent on anything but idle and iowait since boot (/proc/stat)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS  # user .. steal; guest time is inside user already


def background_cores(seconds: float) -> float:
    """How many cores the machine keeps busy over `seconds` while this bench sits idle: the others' work."""
    busy, started = machine_busy_s(), time.monotonic()
    time.sleep(seconds)
    return round((machine_busy_s() - busy) / (time.monotonic() - started), 3)


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children: read around one wrk run, it is wrk's."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Meters:
    """The CPU readers of one run: the gateway's workers one by one, and everything beside it."""

    gateway: Gateway
    stand_ins: Service
    redis: Service | None

    def read(self) -> dict[str, Any]:
        """Every reading now."""
        tree = self.gateway.service.tree()
        return {
            "at": time.monotonic(),
            "gateway_by_pid": {pid: cpu_seconds([pid]) for pid in tree},
            "stand_ins": self.stand_ins.cpu_seconds(),
            "redis": cpu_seconds([self.redis.pid]) if self.redis else 0.0,
            "wrk": children_cpu_s(),
            "machine": machine_busy_s(),
        }


def accounted_run(meters: Meters, connections: int, seconds: float) -> dict[str, Any]:
    """One wrk GET run at `meters.gateway`, with the cores each process used over it (2.0 = both cores)."""
    before = meters.read()
    result: LoadResult = run_wrk(
        meters.gateway.service.name,
        meters.gateway.url + POLL_PATH,
        connections=connections,
        duration_s=seconds,
        server_cpu=meters.gateway.service.cpu_seconds,
    )
    after = meters.read()
    # One window for every reading, so that the parts add up to the machine's; it holds wrk's start and
    # the 0.3 s settle as well as the load, so each figure is a few % below its rate under load.
    wall = after["at"] - before["at"]
    master = meters.gateway.service.pid
    workers = [
        after["gateway_by_pid"][pid] - before["gateway_by_pid"].get(pid, 0.0)
        for pid in after["gateway_by_pid"]
        if pid != master
    ]
    used = {key: after[key] - before[key] for key in ("stand_ins", "redis", "wrk", "machine")}
    gateway_s = result.cpu_s
    ours = gateway_s + used["stand_ins"] + used["redis"] + used["wrk"]
    cores = {
        "gateway": gateway_s / wall,
        "gateway_workers": sorted((value / wall for value in workers), reverse=True),
        "wrk": used["wrk"] / wall,
        "stand_ins": used["stand_ins"] / wall,
        "redis": used["redis"] / wall,
        "others": max(0.0, used["machine"] - ours) / wall,  # the other helpers' work, and the kernel's
        "machine": used["machine"] / wall,
    }
    return {
        **result.as_row(),
        "wall_s": round(wall, 3),
        "cores": {key: _rounded(value) for key, value in cores.items()},
        "redis_cpu_us_per_request": round(used["redis"] / result.requests * 1e6, 2) if result.requests else None,
    }


def _rounded(value: float | list[float]) -> float | list[float]:
    return [round(item, 3) for item in value] if isinstance(value, list) else round(value, 3)


# -- how soon a registration made at A routes at B ---------------------------------------------


class Poller:
    """A kept-alive connection to one gateway, asking which server it routes a GET to."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection(HOST, port, timeout=5)

    def served_by(self) -> str | None:
        """The X-Backend-Server of one GET; None when it was not a 200 (503: no server)."""
        try:
            self.connection.request("GET", POLL_PATH)
            response = self.connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()  # the next request opens a fresh one
            return None
        return response.headers.get("X-Backend-Server") if response.status == 200 else None

    def close(self) -> None:
        """Close its connection."""
        self.connection.close()


def wait_for(check: Callable[[], bool], deadline_s: float) -> float | None:
    """Ask `check` again and again (bounded by `deadline_s`) until True; the perf_counter then, or None."""
    deadline = time.perf_counter() + deadline_s
    while time.perf_counter() < deadline:
        if check():
            return time.perf_counter()
        time.sleep(0.0005)  # about 1 ms per round with the request itself: the resolution of the figure
    return None


def time_propagation(a: Gateway, b: Gateway, ports: list[int], samples: int, deadline_s: float) -> dict[str, Any]:
    """Register a new server at A, time until B routes to it, then its unregistration; `samples` times."""
    poller = Poller(b.port)
    rows: list[dict[str, Any]] = []
    try:
        if wait_for(lambda: poller.served_by() is None, deadline_s) is None:
            raise ServiceFailed("B routes somewhere before any server was registered")
        for number in range(samples):
            server_id = f"P{number:03d}"
            sent = time.perf_counter()
            a.register(server_id, ports[number % len(ports)])
            answered = time.perf_counter()
            seen = wait_for(_routes_to(poller, server_id), deadline_s)
            gone_sent = time.perf_counter()
            a.unregister(server_id)
            gone_answered = time.perf_counter()
            gone = wait_for(lambda: poller.served_by() is None, deadline_s)
            rows.append(
                {
                    "server_id": server_id,
                    "register_reply_ms": _ms(answered - sent),
                    "routed_at_b_ms": _ms(seen - sent) if seen else None,
                    "routed_after_reply_ms": _ms(seen - answered) if seen else None,
                    "unregister_reply_ms": _ms(gone_answered - gone_sent),
                    "gone_at_b_ms": _ms(gone - gone_sent) if gone else None,
                }
            )
    finally:
        poller.close()
    summaries = {name: value for key in TIMINGS for name, value in _summary(rows, key).items()}
    return {"samples": rows, **summaries}


def _routes_to(poller: Poller, server_id: str) -> Callable[[], bool]:
    return lambda: poller.served_by() == server_id


def _summary(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
    values = sorted(row[key] for row in rows if row[key] is not None)
    missed = len(rows) - len(values)
    if not values:
        return {f"{key}_missed": missed}
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return {
        f"{key}_median": round(statistics.median(values), 2),
        f"{key}_p95": p95,
        f"{key}_max": values[-1],
        f"{key}_missed": missed,
    }


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
