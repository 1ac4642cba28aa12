"""One wrk run against one target, with the CPU its server spent on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_report.lua"
RESULT_MARK = "BENCH_RESULT "
SETTLE_S = 0.3  # after wrk exits, let the server finish what it had in hand before reading its CPU


class LoadFailed(RuntimeError):
    """wrk failed or printed no result line."""


@dataclass
class LoadResult:
    """What one wrk run measured; cpu_us_per_request is the server tree's CPU over requests served."""

    target: str
    method: str
    connections: int
    threads: int
    duration_s: float
    requests: int
    requests_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float
    non_2xx: int  # wrk's "status" errors: answers with a status of 400 or more
    socket_errors: int  # connect + read + write + timeout
    errors_detail: dict[str, int]
    cpu_s: float
    cpu_us_per_request: float

    @property
    def errors(self) -> int:
        """Every failed request: non-2xx answers and socket errors."""
        return self.non_2xx + self.socket_errors

    def as_row(self) -> dict[str, Any]:
        """The figures as a dict for results.json, the error total included."""
        return {**asdict(self), "errors": self.errors}


def wrk_binary() -> str:
    """The wrk on PATH."""
    found = shutil.which("wrk")
    if found is None:
        raise LoadFailed("wrk is not installed")
    return found


def wrk_version() -> str:
    """The first line of `wrk -v`, e.g. "wrk debian/4.1.0-3+b2 [epoll]"."""
    done = subprocess.run([wrk_binary(), "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


def run_wrk(
    target: str,
    url: str,
    *,
    method: str = "GET",
    connections: int = 64,
    threads: int = 1,
    duration_s: float = 6.0,
    server_cpu: Callable[[], float] | None = None,
    timeout_s: float = 5.0,
    body_bytes: int = 1024,
) -> LoadResult:
    """Load `url` with wrk for `duration_s` (whole seconds); `server_cpu` reads the server's CPU before and after."""
    threads = min(threads, connections)
    seconds = max(1, round(duration_s))  # wrk takes whole seconds only
    argv = [wrk_binary(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", f"--timeout={max(1, round(timeout_s))}s"]
    argv += ["--latency", "-s", str(WRK_SCRIPT), url]
    env = dict(os.environ, BENCH_METHOD=method, BENCH_BODY_BYTES=str(body_bytes))
    cpu_before = server_cpu() if server_cpu else 0.0
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired as exc:  # run() has killed wrk by its PID already
        raise LoadFailed(f"wrk did not finish: {exc}") from exc
    time.sleep(SETTLE_S)
    cpu_s = (server_cpu() - cpu_before) if server_cpu else 0.0
    line = next((line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)), None)
    if done.returncode != 0 or line is None:
        raise LoadFailed(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    raw = json.loads(line.removeprefix(RESULT_MARK))
    requests = int(raw["requests"])
    elapsed = raw["duration_us"] / 1e6
    detail = {key: int(raw[key]) for key in ("connect_errors", "read_errors", "write_errors", "timeouts")}
    return LoadResult(
        target=target,
        method=method,
        connections=connections,
        threads=threads,
        duration_s=round(elapsed, 3),
        requests=requests,
        requests_per_s=round(requests / elapsed, 1) if elapsed else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        p999_ms=raw["p999_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        mean_ms=round(raw["mean_us"] / 1000, 4),
        non_2xx=int(raw["status_errors"]),
        socket_errors=sum(detail.values()),
        errors_detail=detail,
        cpu_s=round(cpu_s, 3),
        cpu_us_per_request=round(cpu_s / requests * 1e6, 2) if requests else 0.0,
    )
