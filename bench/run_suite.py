"""Issue 6's benchmark suite: our gateway beside nginx, a naive gateway and no proxy at all, in one run.

Everything runs on 127.0.0.1 and is started, measured and stopped (by PID) here:
  proxy          wrk at direct / nginx / naive / ours: GET and 1 KiB POST at 64 and 256
                 connections, then one connection; CPU µs per request of each server's process tree
  streams        time to the first token through ours vs direct; open streams one gateway holds
  sweep          health sweep at 100, 1,000, 5,000 servers, 10% black-holed (bench/sweep_bench.py)
  routing        get_next_server and friends at 10, 1,000, 10,000 servers (bench/rotation_bench.py)
  registrations  durable registrations per second over HTTP at 1,000 servers
  jobs           the durable job queue: submissions/s, first dispatch, drain vs synchronous, long-poll
                 lease, memory per queued job (bench/jobs_bench.py)
  scaleout       Redis mode: CPU per request against embedded, 1 and 2 workers, a registration at one
                 gateway routed at another (bench/scaleout_bench.py)
  prefix         ROUTING_POLICY=prefix against round_robin: 20 conversations over 3 fake LLM boxes with a
                 simulated KV cache; hit rate, latency, the table's memory (bench/prefix_bench.py)
It writes bench/results.json, then bench/report.py renders docs/benchmarks.md and bench/results.png.

Run:  make bench   (or make bench BENCH_QUICK=1)
      .venv/bin/python bench/run_suite.py [--quick] [--only proxy,streams,...] [--keep-others]
          [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jobs_bench
import prefix_bench
import report
import rotation_bench
import scaleout_bench
import sweep_bench
from gateway_log import LogWatch
from gateways import BENCH, REPO, start_gateway, start_naive_gateway
from machine import ensure_tools, git_state, load_average, machine_info, raise_fd_limit
from nginx_services import GET_PATH, POST_PATH, STAND_INS, proxy_config, start_nginx, start_stand_ins
from plan import QUICK, Plan, say
from processes import HOST, free_port, interrupt_on_sigterm
from registrations import bench_registrations
from streams import bench_streams
from wrk_load import LoadResult, run_wrk

SECTIONS = ("proxy", "streams", "sweep", "routing", "registrations", "jobs", "scaleout", "prefix")

# -- 1 and 2: proxying -------------------------------------------------------------------------


@dataclass
class Target:
    """A server wrk loads: where, and how to read the CPU of its process tree."""

    name: str
    url: str
    cpu: Callable[[], float]
    log: LogWatch | None = None


def bench_proxy(folder: Path, plan: Plan) -> dict[str, Any]:
    """Throughput, latency, CPU per request and errors for direct, nginx, naive and ours."""
    with contextlib.ExitStack() as stack:
        stand_ins, ports = start_stand_ins(folder, stack)
        proxy_port = free_port()
        nginx_proxy = start_nginx("proxy", proxy_config(folder, proxy_port, ports), folder, [proxy_port])
        stack.callback(nginx_proxy.stop)
        naive_port = free_port()
        naive = start_naive_gateway(folder, naive_port, [f"http://{HOST}:{p}" for p in ports])
        stack.callback(naive.stop)
        ours = start_gateway(folder / "ours", free_port())
        stack.callback(ours.stop)
        ours.register_stand_ins(ports)
        targets = [
            Target("direct", f"http://{HOST}:{ports[0]}", stand_ins.cpu_seconds),
            Target("nginx", f"http://{HOST}:{proxy_port}", nginx_proxy.cpu_seconds),
            Target("naive", f"http://{HOST}:{naive_port}", naive.cpu_seconds),
            Target("ours", ours.url, ours.service.cpu_seconds, LogWatch(ours.service.log_path)),
        ]
        say(f"proxy: stand-ins on {ports}, nginx :{proxy_port}, naive :{naive_port}, ours :{ours.port}")
        for target in targets:  # fill the connection pools before anything is timed
            for method in plan.methods:
                run_wrk(target.name, _url(target, method), method=method, connections=256, duration_s=plan.warmup_s)
        runs = []
        for method in plan.methods:
            for connections in plan.connections:
                for target in targets:  # side by side, so drift hits every target alike
                    runs.append(_measure(target, method, connections, plan.duration_s))
        single = [_measure(target, "GET", 1, plan.single_connection_s) for target in targets]
    by_name = {run["target"]: run for run in single}
    added = {
        f"{key}_ms": round(by_name["ours"][f"{key}_ms"] - by_name["direct"][f"{key}_ms"], 3) for key in ("p50", "p99")
    }
    return {
        "setup": {
            "stand_ins": f"{STAND_INS} ports on one nginx (worker_processes 1), fixed JSON, access_log off",
            "nginx": "worker_processes 1, round-robin upstream, keepalive 256, HTTP/1.1, access_log off",
            "naive": "gunicorn -k gevent -w 2, Flask + module-level requests.Session(), round-robin",
            "ours": "gunicorn -c deploy/gunicorn.conf.py app:app (1 gevent worker), LOG_LEVEL=INFO, 3 servers",
            "wrk": f"-t1, {plan.duration_s:g} s per run, --timeout 5s; POST bodies are 1 KiB JSON",
            "paths": {"GET": GET_PATH, "POST": POST_PATH},
        },
        "runs": runs,
        "single_connection": single,
        "added_latency_1conn": added,
    }


def _url(target: Target, method: str) -> str:
    return target.url + (POST_PATH if method == "POST" else GET_PATH)


def _measure(target: Target, method: str, connections: int, duration_s: float) -> dict[str, Any]:
    if target.log is not None:
        target.log.take()  # forget what came before this run
    result: LoadResult = run_wrk(
        target.name,
        _url(target, method),
        method=method,
        connections=connections,
        duration_s=duration_s,
        server_cpu=target.cpu,
    )
    row = result.as_row()
    if target.log is not None:
        row["gateway_log"] = target.log.take()
    say(
        f"  {target.name:<6} {method:<4} c={connections:<3} {result.requests_per_s:>9.0f} req/s  "
        f"p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
        f"cpu {result.cpu_us_per_request:8.1f} µs/req  errors {result.errors}"
    )
    return row


# -- 4 and 5: the sweep and the routing decision -----------------------------------------------


def bench_sweep(folder: Path, plan: Plan) -> dict[str, Any]:
    """bench/sweep_bench.py at each fleet size, 10% black-holed, with a short timeout."""
    sizes = []
    for servers in plan.sweep_sizes:
        out = folder / f"sweep-{servers}.json"
        argv = ["--servers", str(servers), "--blackholed-fraction", "0.1", "--timeout", f"{plan.sweep_timeout_s:g}"]
        argv += ["--repeat", str(plan.sweep_repeat), "--json-out", str(out)]
        say(f"sweep: {servers} servers")
        code = sweep_bench.main(argv)
        figures = json.loads(out.read_text())
        sizes.append({"servers": servers, "exit_code": code, "scenarios": figures["scenarios"]})
    return {
        "setup": {
            "timeout_s": plan.sweep_timeout_s,
            "blackholed_fraction": 0.1,
            "repeat": plan.sweep_repeat,
            "how": "bench/sweep_bench.py: in-process BackendManager, HealthChecker's thread pool (256)",
        },
        "sizes": sizes,
    }


def bench_routing(folder: Path, plan: Plan) -> dict[str, Any]:
    """bench/rotation_bench.py at each fleet size, the fleets loaded from a store in one go."""
    out = folder / "routing.json"
    argv = ["--sizes", ",".join(str(size) for size in plan.routing_sizes), "--repeat", str(plan.routing_repeat)]
    argv += ["--max-seconds", f"{plan.routing_max_seconds:g}", "--fill", "load", "--json-out", str(out)]
    say("routing: get_next_server by fleet size")
    code = rotation_bench.main(argv)
    figures = json.loads(out.read_text())
    return {"exit_code": code, "settings": figures["settings"], "rows": figures["rows"], "checks": figures["checks"]}


# -- the run -----------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Path, Plan], dict[str, Any]]] = {
    "proxy": bench_proxy,
    "streams": bench_streams,
    "sweep": bench_sweep,
    "routing": bench_routing,
    "registrations": bench_registrations,
    "jobs": jobs_bench.bench_jobs,
    "scaleout": scaleout_bench.bench_scaleout,
    "prefix": prefix_bench.bench_prefix,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"sections to run, of {','.join(SECTIONS)}")
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="with --only: keep the other sections' figures from the results already in --out",
    )
    parser.add_argument("--out", type=Path, default=BENCH / "results.json", help="where results go")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "benchmarks.md", help="the rendered report")
    parser.add_argument("--plot", type=Path, default=BENCH / "results.png", help="the rendered plot")
    parser.add_argument(
        "--note",
        default=os.environ.get("BENCH_NOTE", ""),
        help="a remark on this run for docs/benchmarks.md ($BENCH_NOTE)",
    )
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def earlier_results(path: Path, quick: bool) -> dict[str, Any]:
    """The results in `path`, for --keep-others; refused when they are missing or of the other kind of run."""
    try:
        earlier: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--keep-others: cannot read the earlier results in {path}: {exc}") from None
    if bool(earlier.get("meta", {}).get("quick")) != quick:
        raise SystemExit(f"--keep-others: {path} is {'not ' if quick else ''}a quick run, and this one would be")
    return earlier


def keep_others(results: dict[str, Any], earlier: dict[str, Any]) -> None:
    """Carry the sections this run did not measure over from `earlier`, saying so in meta.

    The suite's time becomes an estimate: the earlier run's, with the re-run sections' time replaced.
    """
    meta, kept_meta = results["meta"], earlier.get("meta", {})
    kept = [name for name in SECTIONS if name in earlier and name not in results]
    for name in kept:
        results[name] = earlier[name]
    rerun = [name for name in SECTIONS if name in results and name not in kept]
    earlier_wall = sum(earlier.get(name, {}).get("wall_s", 0.0) for name in rerun)
    meta["kept"] = {
        "sections": kept,
        "measured_now": rerun,
        **{key: kept_meta.get(key) for key in ("date", "command", "git", "suite_wall_s")},
    }
    meta["suite_wall_s"] = round(
        kept_meta.get("suite_wall_s", 0.0) - earlier_wall + sum(results[name]["wall_s"] for name in rerun), 1
    )
    say(f"kept {', '.join(kept) or 'nothing'} from the run of {kept_meta.get('date')}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    earlier = earlier_results(args.out, args.quick) if args.keep_others else None
    interrupt_on_sigterm()
    started, started_at = time.monotonic(), datetime.now(UTC)
    plan = QUICK if args.quick else Plan()
    soft, hard = raise_fd_limit()
    tools = ensure_tools()
    results: dict[str, Any] = {
        "meta": {
            "date": started_at.isoformat(timespec="seconds"),
            "command": shlex.join(sys.orig_argv),
            "via_make": "MAKELEVEL" in os.environ,
            "quick": args.quick,
            "note": args.note,
            "machine": machine_info(),
            "git": git_state(),
            "rlimit_nofile": [soft, hard],
            "load_average_start": load_average(),
            "tools_installed_by_suite": tools["installed"],
        },
        "plan": asdict(plan),
    }
    say(f"machine: {results['meta']['machine']['cpu_model']}, {results['meta']['machine']['cores']} cores")
    failed = []
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as temp:
        for name in args.sections:
            section_started = time.monotonic()
            say(f"\n== {name} ==")
            folder = Path(temp) / name
            folder.mkdir()
            try:
                results[name] = RUNNERS[name](folder, plan)
            except Exception as exc:  # one broken section must not lose the others' figures
                traceback.print_exc()
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            results[name]["wall_s"] = round(time.monotonic() - section_started, 1)
    results["meta"]["load_average_end"] = load_average()
    results["meta"]["suite_wall_s"] = round(time.monotonic() - started, 1)
    if earlier is not None:
        keep_others(results, earlier)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    say(f"\nwrote {args.out} after {results['meta']['suite_wall_s']:.0f}s")
    report.write(results, args.markdown, args.plot)
    say(f"wrote {args.markdown} and {args.plot}")
    if failed:
        say(f"failed sections: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process the suite started has been stopped", file=sys.stderr)
        sys.exit(130)
