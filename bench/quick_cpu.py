"""A quick A/B figure while working on the hot path: CPU µs per proxied request, ours (and naive's).

Starts the nginx stand-ins and our gateway as the suite does (and the naive gateway with
--naive), then runs wrk at 64 connections for GET and POST, a few short rounds each, and
prints the median and every round. About a minute; the figures move by some tens of µs
from run to run, so compare medians of several rounds, and confirm with `make bench`.

Run:  .venv/bin/python bench/quick_cpu.py [--rounds 3] [--seconds 4] [--naive]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from gateways import start_gateway, start_naive_gateway
from machine import ensure_tools, raise_fd_limit
from nginx_services import GET_PATH, POST_PATH, start_stand_ins
from processes import HOST, free_port, interrupt_on_sigterm
from wrk_load import run_wrk


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per method and target (3)")
    parser.add_argument("--seconds", type=int, default=4, help="seconds per wrk run (4)")
    parser.add_argument("--naive", action="store_true", help="also measure the naive gateway")
    args = parser.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 1 <= args.seconds <= 60:
        parser.error("need 1 <= --rounds <= 20 and 1 <= --seconds <= 60")
    interrupt_on_sigterm()
    raise_fd_limit()
    ensure_tools()
    with tempfile.TemporaryDirectory(prefix="gateway-quick-") as temp, contextlib.ExitStack() as stack:
        folder = Path(temp)
        _, ports = start_stand_ins(folder, stack)
        ours = start_gateway(folder / "ours", free_port())
        stack.callback(ours.stop)
        ours.register_stand_ins(ports)
        targets: list[tuple[str, str, Callable[[], float]]] = [("ours", ours.url, ours.service.cpu_seconds)]
        if args.naive:
            naive_port = free_port()
            naive = start_naive_gateway(folder, naive_port, [f"http://{HOST}:{port}" for port in ports])
            stack.callback(naive.stop)
            targets.append(("naive", f"http://{HOST}:{naive_port}", naive.cpu_seconds))
        for name, url, _ in targets:
            run_wrk(name, url + GET_PATH, connections=64, duration_s=2)  # warm-up
        for method, path in (("GET", GET_PATH), ("POST", POST_PATH)):
            for name, url, cpu in targets:
                runs = [
                    run_wrk(name, url + path, method=method, connections=64, duration_s=args.seconds, server_cpu=cpu)
                    for _ in range(args.rounds)
                ]
                cpus = [run.cpu_us_per_request for run in runs]
                rates = [run.requests_per_s for run in runs]
                errors = sum(run.errors for run in runs)
                print(
                    f"{method:4} {name:5} CPU µs/request median {statistics.median(cpus):5.0f} "
                    f"{[round(value) for value in cpus]}  req/s median {statistics.median(rates):5.0f}  "
                    f"errors {errors}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        sys.exit(130)
