"""What picking the next server and registering one cost, at several fleet sizes.

Builds an in-memory `BackendManager` (store=None, no health checker, so no disk and no scheduler)
per fleet size and times, with `time.perf_counter`:
  - `get_next_server()` with every server healthy, and with every other one unhealthy;
  - `SequentialRotation.choose()` alone, and `SequentialRotation.rebuild()`, from routing.py;
  - `register_server()`: filling the fleet from empty, and adding one more server to a full fleet.
With --fill load the fleet is instead written to a JSON store and read back with one
`BackendManager.load()` (a register costs O(fleet), so filling 10,000 one by one takes a minute);
the store is detached afterwards, so later registrations stay in memory as with --fill register.
A timed run makes up to --calls calls or stops after --max-seconds, whichever comes first, in
batches; it is repeated --repeat times and the median and minimum microseconds per call are shown.
The garbage collector stays on, as in the gateway.

Run:  .venv/bin/python bench/rotation_bench.py [--sizes 10,1000,10000] [--repeat 5] [--fill register|load]
          [--json-out rotation.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from gateway.fleet.health import HealthResult
from gateway.fleet.server import BackendServer
from gateway.fleet.store import JsonFileStore
from gateway.manager import BackendManager
from gateway.routing.policies import SequentialRotation

HOST = "127.0.0.1"
BATCH = 1000  # calls between two looks at the clock
FILL_BUDGET_S = 300.0  # give up filling a fleet that takes longer than this
MARGINAL_REGISTERS = 50  # servers added (and removed again) to a full fleet per repeat


@dataclass
class Row:
    """One line of the table: a timed operation at one fleet size."""

    operation: str
    fleet: int
    variant: str
    calls: int  # per repeat (the smallest, when runs stopped on time)
    repeats: int
    median_us: float
    min_us: float


def time_calls(call: Callable[[], object], max_calls: int, max_seconds: float) -> tuple[int, float]:
    """Call `call` up to `max_calls` times or until `max_seconds` pass; return calls made and µs per call."""
    calls = 0
    deadline = time.perf_counter() + max_seconds
    started = time.perf_counter()
    while calls < max_calls:
        for _ in range(min(BATCH, max_calls - calls)):
            call()
        calls += min(BATCH, max_calls - calls)
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - started
    return calls, elapsed / calls * 1e6


def repeat_timing(
    operation: str, fleet: int, variant: str, call: Callable[[], object], args: argparse.Namespace
) -> Row:
    """Time `call` --repeat times and summarise."""
    runs = [time_calls(call, args.calls, args.max_seconds) for _ in range(args.repeat)]
    per_call = [us for _, us in runs]
    return Row(
        operation=operation,
        fleet=fleet,
        variant=variant,
        calls=min(calls for calls, _ in runs),
        repeats=len(runs),
        median_us=statistics.median(per_call),
        min_us=min(per_call),
    )


def fill_manager(size: int) -> tuple[BackendManager, float]:
    """Register `size` servers in a fresh manager; return it and the mean µs per register_server."""
    manager = BackendManager(store=None, failure_threshold=1, health_check_interval=10**6, health_checker=None)
    started = time.perf_counter()
    for number in range(size):
        manager.register_server(f"S{number:05d}", HOST, 10000 + number % 50000)
        if number % 256 == 0 and time.perf_counter() - started > FILL_BUDGET_S:
            raise RuntimeError(f"filling a fleet of {size} took over {FILL_BUDGET_S:g}s; lower --sizes")
    return manager, (time.perf_counter() - started) / size * 1e6


def load_manager(size: int) -> tuple[BackendManager, float]:
    """Store a fleet of `size` and load it into a fresh manager at once; return it and the µs per server."""
    entries = [BackendServer(f"S{number:05d}", HOST, 10000 + number % 50000).to_dict() for number in range(size)]
    with tempfile.TemporaryDirectory(prefix="rotation-bench-") as folder:
        store = JsonFileStore(Path(folder) / "backend_servers.json")
        store.save(entries)
        manager = BackendManager(store=store, failure_threshold=1, health_check_interval=10**6, health_checker=None)
        started = time.perf_counter()
        manager.load()
        elapsed = time.perf_counter() - started
        manager.store = None  # later changes stay in memory, as after fill_manager
    return manager, elapsed / size * 1e6


def time_marginal_register(manager: BackendManager, size: int, args: argparse.Namespace) -> Row:
    """µs to register one new server into a fleet of `size`; each is unregistered again, untimed."""
    per_call: list[float] = []
    for repeat in range(args.repeat):
        total = 0.0
        for number in range(MARGINAL_REGISTERS):
            server_id = f"extra-{repeat}-{number}"
            started = time.perf_counter()
            manager.register_server(server_id, HOST, 9000)
            total += time.perf_counter() - started
            manager.unregister_server(server_id)
        per_call.append(total / MARGINAL_REGISTERS * 1e6)
    return Row(
        "register_server",
        size,
        f"one more into {size}",
        MARGINAL_REGISTERS,
        args.repeat,
        statistics.median(per_call),
        min(per_call),
    )


def mark_every_other_unhealthy(manager: BackendManager) -> set[str]:
    """Fail every other server once (failure_threshold=1 marks it unhealthy); return the healthy ids."""
    servers = manager.list_servers()
    manager.apply_health_results([HealthResult(s.server_id, s.url, False, "bench") for s in servers[1::2]])
    return {s.server_id for s in servers[0::2]}


def check_rotation(manager: BackendManager, healthy_ids: set[str]) -> str:
    """One full turn of get_next_server must visit every healthy server once, in registration order."""
    turn = [server.server_id for server in (manager.get_next_server() for _ in healthy_ids) if server is not None]
    order = [server.server_id for server in manager.list_servers() if server.server_id in healthy_ids]
    start = order.index(turn[0]) if turn and turn[0] in order else 0
    expected = order[start:] + order[:start]
    if turn == expected:
        return "OK"
    return f"FAIL: a turn of {len(turn)} picks is not the rotation of the {len(healthy_ids)} healthy servers"


def bench_size(size: int, args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """All the timings at one fleet size, and the sanity verdicts."""
    rows: list[Row] = []
    checks: list[str] = []
    if args.fill == "load":
        manager, fill_us = load_manager(size)
        fill_row = Row("BackendManager.load", size, f"load {size} from a store", size, 1, fill_us, fill_us)
    else:
        manager, fill_us = fill_manager(size)
        fill_row = Row("register_server", size, f"fill 0 -> {size}", size, 1, fill_us, fill_us)
    try:
        rows.append(fill_row)
        rows.append(time_marginal_register(manager, size, args))
        fleet = [(server.server_id, server.is_healthy) for server in manager.list_servers()]

        checks.append(f"fleet {size}, all healthy: {check_rotation(manager, {s for s, _ in fleet})}")
        rows.append(repeat_timing("get_next_server", size, "all healthy", manager.get_next_server, args))
        rotation = SequentialRotation()
        rotation.rebuild(fleet)
        rows.append(repeat_timing("SequentialRotation.choose", size, "all healthy", rotation.choose, args))
        rebuild_calls = max(1, min(args.calls, 2_000_000 // size))
        rebuild_args = argparse.Namespace(**{**vars(args), "calls": rebuild_calls})
        rows.append(
            repeat_timing(
                "SequentialRotation.rebuild", size, "all healthy", lambda: rotation.rebuild(fleet), rebuild_args
            )
        )

        healthy_ids = mark_every_other_unhealthy(manager)
        checks.append(f"fleet {size}, half unhealthy: {check_rotation(manager, healthy_ids)}")
        rows.append(repeat_timing("get_next_server", size, "half unhealthy", manager.get_next_server, args))
        half = [(server_id, server_id in healthy_ids) for server_id, _ in fleet]
        rotation.rebuild(half)
        rows.append(repeat_timing("SequentialRotation.choose", size, "half unhealthy", rotation.choose, args))
    finally:
        manager.shutdown()
    return rows, checks


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'operation':<28} {'fleet':>6}  {'variant':<22} {'calls/rep':>9} {'reps':>4} {'median µs':>10} {'min µs':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.operation:<28} {row.fleet:>6}  {row.variant:<22} {row.calls:>9} {row.repeats:>4} "
            f"{row.median_us:>10.3f} {row.min_us:>10.3f}"
        )


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not sizes or any(not 1 <= size <= 50_000 for size in sizes):
        raise argparse.ArgumentTypeError("sizes must be between 1 and 50000")
    return sizes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=parse_sizes, default=[10, 1000, 10000], help="fleet sizes (10,1000,10000)")
    parser.add_argument("--calls", type=int, default=200_000, help="most calls per timed run (200000)")
    parser.add_argument("--max-seconds", type=float, default=3.0, help="most seconds per timed run (3)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (5)")
    parser.add_argument(
        "--fill", choices=("register", "load"), default="register", help="build each fleet by registering (default)"
    )
    parser.add_argument("--json-out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 10_000_000 or not 0 < args.max_seconds <= 30 or not 1 <= args.repeat <= 20:
        parser.error("need 1 <= --calls <= 10000000, 0 < --max-seconds <= 30, 1 <= --repeat <= 20")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the manager logs every registration at INFO
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    command = shlex.join(sys.orig_argv)
    print(f"command: {command}")
    print(
        f"machine: nproc={cpus}, python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}"
    )
    print(
        f"settings: sizes={args.sizes}, up to {args.calls} calls or {args.max_seconds:g}s per run, "
        f"{args.repeat} runs, fleets built by {args.fill}; store=None, no health checker\n"
    )
    rows: list[Row] = []
    checks: list[str] = []
    for size in args.sizes:
        size_rows, size_checks = bench_size(size, args)
        rows += size_rows
        checks += size_checks
    print_table(rows)
    print("\nrotation checks (one full turn visits each healthy server once, in registration order):")
    for check in checks:
        print(f"  {check}")
    if args.json_out:
        report: dict[str, Any] = {
            "command": command,
            "machine": {"nproc": cpus, "python": platform.python_version(), "platform": platform.platform()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": [asdict(row) for row in rows],
            "checks": checks,
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json_out}")
    return 0 if all(check.endswith("OK") for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
