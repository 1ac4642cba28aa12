"""The markdown of each part of docs/benchmarks.md, rendered from the suite's results."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

TARGETS = ("direct", "nginx", "naive", "ours")
ISSUE_ANCHORS = "nginx about 41k req/s and 22 µs CPU per request; naive about 1.75k req/s and 1.05 ms"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def ratio_text(value: float | None) -> str:
    """A ratio with three significant digits, trailing zeros kept (0.600, 57.7)."""
    return "-" if value is None else f"{value:#.3g}".rstrip(".")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def failure_list(failures: dict[str, int]) -> str:
    """`3x HTTP 503, 1x timeout`; empty when nothing failed."""
    return ", ".join(f"{n}x {reason}" for reason, n in failures.items())


def failed_section(section: dict[str, Any] | None, title: str) -> str | None:
    if section is None:
        return f"## {title}\n\nNot run.\n"
    if "error" in section:
        return f"## {title}\n\nThis part failed: `{section['error']}`\n"
    return None


def proxy_rows(proxy: dict[str, Any] | None) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """(method, connections) -> target -> run."""
    grouped: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for run in (proxy or {}).get("runs", []):
        grouped.setdefault((run["method"], run["connections"]), {})[run["target"]] = run
    return grouped


def proxy_section(proxy: dict[str, Any] | None, plot_link: str | None) -> str:
    failed = failed_section(proxy, "Proxying: throughput, latency, CPU")
    if failed or proxy is None:
        return failed or ""
    grouped = proxy_rows(proxy)
    rows = []
    for (method, conns), runs in grouped.items():
        for name in TARGETS:
            run = runs.get(name)
            if run:
                rows.append(
                    (
                        f"{method} c={conns}",
                        name,
                        run["requests_per_s"],
                        run["p50_ms"],
                        run["p99_ms"],
                        run["cpu_us_per_request"],
                        run["errors"],
                        run["requests"],
                    )
                )
    ratios = []
    for (method, conns), runs in grouped.items():
        ours, naive, nginx = runs.get("ours", {}), runs.get("naive", {}), runs.get("nginx", {})
        ratios.append(
            (
                f"{method} c={conns}",
                ratio_text(ratio(ours.get("requests_per_s"), naive.get("requests_per_s"))),
                ratio_text(ratio(ours.get("requests_per_s"), nginx.get("requests_per_s"))),
                ratio_text(ratio(ours.get("cpu_us_per_request"), naive.get("cpu_us_per_request"))),
                ratio_text(ratio(ours.get("cpu_us_per_request"), nginx.get("cpu_us_per_request"))),
            )
        )
    setup = proxy.get("setup", {})
    text = [
        "## Proxying: throughput, latency, CPU",
        "",
        "Small GET and 1 KiB POST through each configuration; CPU is the server's whole process tree "
        "(utime + stime from /proc, gunicorn master and workers, nginx master and worker) over the "
        "requests wrk completed. `direct` is wrk straight at one stand-in, the CPU being that nginx's. "
        f"The issue's anchors on this machine: {ISSUE_ANCHORS}.",
        "",
        table(("workload", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors", "requests"), rows),
        "Ratios (ours divided by the other; for req/s higher is better, for CPU lower is better):",
        "",
        table(("workload", "req/s ours/naive", "req/s ours/nginx", "CPU ours/naive", "CPU ours/nginx"), ratios),
    ]
    if plot_link:
        text += [f"![throughput and p99 latency per configuration]({plot_link})", ""]
    single = proxy.get("single_connection", [])
    if single:
        added = proxy.get("added_latency_1conn", {})
        text += [
            "### Added latency at one connection (`wrk -c1 -t1`, GET)",
            "",
            table(
                ("target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"),
                [
                    (r["target"], r["requests_per_s"], r["p50_ms"], r["p99_ms"], r["cpu_us_per_request"], r["errors"])
                    for r in single
                ],
            ),
            f"Ours minus direct: **p50 +{added.get('p50_ms', float('nan')):.3f} ms, "
            f"p99 +{added.get('p99_ms', float('nan')):.3f} ms**.",
            "",
        ]
    text += [_gateway_log(proxy), "Setup: " + "; ".join(f"{k}: {v}" for k, v in setup.items() if k != "paths"), ""]
    return "\n".join(text)


def _gateway_log(proxy: dict[str, Any]) -> str:
    """What our gateway logged at WARNING and above, and the statuses it answered, per run."""
    rows = []
    for run in [*proxy.get("runs", []), *proxy.get("single_connection", [])]:
        log = run.get("gateway_log")
        if not log:
            continue
        statuses = ", ".join(f"{code}: {count:,}" for code, count in sorted(log.get("statuses", {}).items()))
        levels = ", ".join(f"{level}: {count:,}" for level, count in sorted(log.get("levels", {}).items())) or "none"
        top = "; ".join(f"{m['count']:,}x {m['message']}" for m in log.get("top_messages", [])[:3])
        rows.append((f"{run['method']} c={run['connections']}", statuses, levels, top))
    if not rows:
        return ""
    return (
        "### What our gateway logged during those runs\n\n"
        "Statuses from its request log, and its lines at WARNING or above (numbers in messages shown as N):\n\n"
        + table(("workload", "statuses answered", "warnings/errors", "most frequent"), rows)
    )


def streams_section(streams: dict[str, Any] | None) -> str:
    failed = failed_section(streams, "Streaming")
    if failed or streams is None:
        return failed or ""
    first = table(
        ("path", "samples", "first token p50 ms", "first token max ms", "whole stream p50 ms", "failures"),
        [
            (
                t["target"],
                t["samples"],
                t["first_token_p50_ms"],
                t["first_token_max_ms"],
                t["complete_p50_ms"],
                t["failures"],
            )
            for t in streams.get("first_token", [])
        ],
    )
    steps = table(
        (
            "streams",
            "opened",
            "completed",
            "failed",
            "open s",
            "gateway RSS MiB",
            "worker fds",
            "KiB/stream",
            "RSS after MiB",
            "failures",
        ),
        [
            (
                s["streams"],
                s["opened"],
                s["completed"],
                s["failed"],
                s["open_s"],
                s["measured"].get("gateway_rss_mib"),
                s["measured"].get("worker_fds"),
                s.get("rss_per_stream_kib"),
                s.get("rss_after_release_mib"),
                failure_list(s.get("failures", {})),
            )
            for s in streams.get("hold_steps", [])
        ],
    )
    setup = streams.get("setup", {})
    idle = next((s["idle_rss_mib"] for s in streams.get("hold_steps", [])), None)
    return "\n".join(
        [
            "## Streaming",
            "",
            f"A stand-in LLM server ({setup.get('backend', '')}) streams `{setup.get('first_token_path', '')}`: "
            "the first event after 0.1 s, then 9 more 50 ms apart. Time to the first token, sequential requests:",
            "",
            first,
            f"Ours adds **{streams.get('added_first_token_p50_ms', float('nan')):.2f} ms** to the first token (p50).",
            "",
            f"Open streams held at once by one gateway (1 gevent worker, GATEWAY_WORKER_CONNECTIONS="
            f"{setup.get('gateway_worker_connections')}, raised from the shipped 2000 for this test): "
            "each client opens `/api/hold`, which sends one event and then waits; once all are open the "
            "gateway's memory is read, the backend releases them all and every stream must end whole. "
            "Gateway RSS (master + worker) when idle: "
            f"{idle} MiB; KiB/stream is (RSS holding - idle RSS) / streams; RSS after is read once they all ended.",
            "",
            steps,
            f"Most streams held cleanly: **{streams.get('max_streams_held', 0):,}**.",
            "",
        ]
    )


def sweep_section(sweep: dict[str, Any] | None) -> str:
    failed = failed_section(sweep, "Health sweep")
    if failed or sweep is None:
        return failed or ""
    setup = sweep.get("setup", {})
    timeout = setup.get("timeout_s", float("nan"))
    rows = []
    for size in sweep.get("sizes", []):
        for scenario in size.get("scenarios", []):
            rows.append(
                (
                    size["servers"],
                    scenario["blackholed"],
                    scenario["median_wall_s"],
                    scenario["median_wall_s"] / timeout,
                    len(scenario["sweeps"]),
                    "yes" if scenario["sane"] else "**no**",
                )
            )
    return (
        "## Health sweep\n\n"
        f"One sweep of the whole fleet, {setup.get('how', '')}; black-holed servers accept and never answer, "
        f"HEALTH_CHECK_TIMEOUT={timeout:g} s (short, to keep the run bounded). A sweep should take about one "
        "timeout per 256 black-holed servers, whatever the fleet size.\n\n"
        + table(("servers", "black-holed", "median s", "x timeout", "sweeps", "failed exactly the black-holed"), rows)
    )


def routing_section(routing: dict[str, Any] | None) -> str:
    failed = failed_section(routing, "Routing decision")
    if failed or routing is None:
        return failed or ""
    rows = [
        (r["operation"], r["fleet"], r["variant"], r["median_us"], r["min_us"], r["calls"], r["repeats"])
        for r in routing.get("rows", [])
    ]
    checks = routing.get("checks", [])
    verdict = "all OK" if checks and all(c.endswith("OK") for c in checks) else "; ".join(checks)
    return (
        "## Routing decision\n\n"
        "bench/rotation_bench.py on an in-memory BackendManager, fleets loaded from a store in one go; "
        f"µs per call. Rotation checks (a full turn visits each healthy server once, in order): {verdict}.\n\n"
        + table(("operation", "fleet", "variant", "median µs", "min µs", "calls/run", "runs"), rows)
    )


def registrations_section(registrations: dict[str, Any] | None) -> str:
    failed = failed_section(registrations, "Durable registrations")
    if failed or registrations is None:
        return failed or ""
    setup = registrations.get("setup", {})
    rows = [
        (
            p["phase"],
            p["succeeded"],
            p["attempted"],
            p["per_s"],
            p["latency_p50_ms"],
            p["latency_p99_ms"],
            p.get("gateway_cpu_ms_per_call"),
            failure_list(p.get("failures", {})),
        )
        for p in registrations.get("phases", [])
    ]
    check = registrations.get("file_check", {})
    where = f" ({setup['servers']})" if setup.get("servers") else ""
    return (
        "## Durable registrations\n\n"
        f"`POST /webhook/register` over HTTP to ours under gunicorn from {setup.get('clients')} clients on kept-alive "
        f"connections, {setup.get('fleet')} servers{where}; {setup.get('durability', '')}. "
        f"{setup.get('gateway', '')}.\n\n"
        + table(("phase", "ok", "sent", "per s", "p50 ms", "p99 ms", "gateway CPU ms/call", "failures"), rows)
        + f"\nThe saved file afterwards: {check.get('entries')} entries, {check.get('at_moved_port')} at their moved "
        f"port ({'as expected' if check.get('ok') else '**not as expected**'}).\n"
        + _interference(registrations.get("proxy_during_moves"))
    )


def _interference(found: dict[str, Any] | None) -> str:
    """Proxied GETs alone and beside a stream of moves: what a save costs the traffic."""
    if not found:
        return ""
    moves = found.get("moves") or {}
    rows = [
        (label, run["requests_per_s"], run["p50_ms"], run["p99_ms"], run["max_ms"], run["errors"])
        for label, run in (("alone", found["alone"]), ("beside the moves", found["during_moves"]))
    ]
    slowdown = ratio(found["alone"]["requests_per_s"], found["during_moves"]["requests_per_s"])
    return (
        f"\nProxied GETs ({found.get('wrk', '')}) through the same gateway, alone and while 2 clients keep moving "
        f"servers ({moves.get('succeeded', 0):,} moves at {moves.get('per_s', 0):.1f}/s). A save's JSON and fsyncs "
        f"run in gevent's thread pool, so proxied requests go on while the disk works; they share the one core "
        f"with the moves' own requests and each save's JSON of the whole fleet. Throughput alone / beside: "
        f"**{ratio_text(slowdown)}**.\n\n" + table(("proxy", "req/s", "p50 ms", "p99 ms", "max ms", "errors"), rows)
    )
