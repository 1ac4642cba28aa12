"""The scale-out part of docs/benchmarks.md, rendered from the suite's results (bench/scaleout_bench.py)."""

from __future__ import annotations

from typing import Any

from report_sections import failed_section, ratio_text, table

TITLE = "Scale-out: Redis mode"
TIMING_NAMES = {
    "routed_at_b_ms": "register sent at A → B routes to the server",
    "routed_after_reply_ms": "A's 200 read → B routes to the server",
    "register_reply_ms": "register sent at A → A's 200 read",
    "gone_at_b_ms": "unregister sent at A → B no longer routes there",
    "unregister_reply_ms": "unregister sent at A → A's 200 read",
}


def scaleout_section(scaleout: dict[str, Any] | None) -> str:
    failed = failed_section(scaleout, TITLE)
    if failed or scaleout is None:
        return failed or ""
    setup = scaleout.get("setup", {})
    parts = [
        f"## {TITLE}\n",
        "bench/scaleout_bench.py: "
        + "; ".join(str(setup.get(key, "")) for key in ("gateways", "redis", "servers"))
        + ". The machine's 2 cores are shared with wrk, the stand-ins, Redis and whatever else runs on it (other "
        "work shows as `others` below): each figure moves by tens of % from run to run, so read the ratios, "
        "which come from rounds run back to back.\n",
        _aims(scaleout.get("aims", [])),
        _cpu(scaleout.get("cpu", {})),
        _throughput(scaleout.get("throughput", []), scaleout.get("runs", []), scaleout.get("background_cores")),
        _propagation(scaleout.get("propagation", {}), setup),
    ]
    return "\n".join(part for part in parts if part)


def _aims(aims: list[dict[str, Any]]) -> str:
    rows = [(aim["aim"], aim["figure"], "**met**" if aim["met"] else "**missed**") for aim in aims]
    return "Issue 15's aims:\n\n" + table(("aim", "this run", "verdict"), rows)


def _cpu(cpu: dict[str, Any]) -> str:
    if not cpu:
        return ""
    rounds = zip(cpu.get("embedded_rounds", []), cpu.get("redis_rounds", []), strict=False)
    rows: list[tuple[Any, ...]] = [(n, embedded, redis) for n, (embedded, redis) in enumerate(rounds, start=1)]
    rows.append(("**median**", cpu.get("embedded_us"), cpu.get("redis_us")))
    return (
        "### CPU per plain request: Redis mode against embedded\n\n"
        f"wrk GETs at {cpu.get('connections')} connections, one gunicorn worker each, the two gateways taking "
        "turns; CPU µs per request of each gateway's process tree. A plain request makes no Redis round trip "
        "in Redis mode (the worker routes on its copy of the fleet), so the two should cost the same. "
        f"Redis / embedded: **{ratio_text(cpu.get('ratio'))}**. redis-server's own CPU over those runs (the "
        "followers' version checks twice a second, the leader's lease; /proc's clock tick is 10 ms, so a few "
        f"ticks a run) came to {cpu.get('redis_server_us')} µs per request (median), "
        f"{ratio_text(cpu.get('ratio_with_redis_server'))} x embedded with it added.\n\n"
        + table(("round", "embedded µs/req", "Redis mode µs/req"), rows)
    )


def _throughput(rows: list[dict[str, Any]], runs: list[dict[str, Any]], background: list[float] | None) -> str:
    if not rows:
        return ""
    idle = (
        f" With every process of ours started and none loaded, the machine was {background[0]} cores busy before "
        f"the rounds and {background[-1]} after them."
        if background
        else ""
    )
    summary = [
        (
            row["connections"],
            row.get("1w_per_s"),
            row.get("2w_per_s"),
            f"**{ratio_text(row.get('ratio'))}** ({', '.join(ratio_text(value) for value in row['round_ratios'])})",
            f"{row.get('1w_gateway_cores')} / {row.get('2w_gateway_cores')}",
            f"{row.get('1w_others_cores')} / {row.get('2w_others_cores')}",
            f"{row.get('1w_per_gateway_core') or 0:,.0f} / {row.get('2w_per_gateway_core') or 0:,.0f}",
            row.get("1w_errors", 0) + row.get("2w_errors", 0),
        )
        for row in rows
    ]
    header = ("conns", "1 worker req/s", "2 workers req/s", "2 / 1 (each round)", "gateway cores 1 / 2")
    first = rows[0]
    return (
        "### Throughput with 1 and 2 workers\n\n"
        "Redis mode, GATEWAY_WORKERS=1 against 2, taking turns round by round; medians. Cores are CPU seconds "
        "over each run's window (wrk's start, its run and the 0.3 s settle after it, so a few % under the rate "
        "under load): the gateway's whole tree, wrk (this process's reaped child), the stand-ins' nginx, "
        "redis-server, and `others`, the machine's busy time (/proc/stat) minus all of those, which is the "
        "other work on the machine. Two workers can only go faster if there is a core for the second: at "
        f"c={first['connections']} the gateway got {first.get('1w_gateway_cores')} cores with one worker and "
        f"{first.get('2w_gateway_cores')} with two, while other work took {first.get('1w_others_cores')} and "
        f"{first.get('2w_others_cores')} of the machine's 2. Requests per gateway core, the same for 1 and 2 "
        f"when the workers do not slow each other, say whether the design or the cores cap the ratio.{idle}\n\n"
        + table((*header, "others' cores 1 / 2", "req/s per gateway core 1 / 2", "errors"), summary)
        + "\nEvery run, in the order they ran (the cores each process used; workers one by one):\n\n"
        + _runs(runs)
    )


def _runs(runs: list[dict[str, Any]]) -> str:
    rows = [
        (
            run["connections"],
            run["round"],
            run["target"],
            run["requests_per_s"],
            run["p99_ms"],
            run["cpu_us_per_request"],
            f"{run['cores']['gateway']} ({' + '.join(str(value) for value in run['cores']['gateway_workers'])})",
            run["cores"]["wrk"],
            run["cores"]["stand_ins"],
            run["cores"]["redis"],
            run["cores"]["others"],
            run["cores"]["machine"],
            run["errors"],
        )
        for run in runs
    ]
    header = ("conns", "round", "gateway", "req/s", "p99 ms", "CPU µs/req", "gateway cores (workers)", "wrk")
    return table((*header, "stand-ins", "redis", "others", "machine", "errors"), rows)


def _propagation(found: dict[str, Any], setup: dict[str, Any]) -> str:
    if not found:
        return ""
    rows = [
        (
            label,
            found.get(f"{key}_median"),
            found.get(f"{key}_p95"),
            found.get(f"{key}_max"),
            found.get(f"{key}_missed", 0),
        )
        for key, label in TIMING_NAMES.items()
    ]
    samples = len(found.get("samples", []))
    return (
        "### From a registration at one gateway to routing at another\n\n"
        f"{setup.get('propagation', '')}. {samples} samples, each a new server id at one of the stand-ins, "
        "registered at A (`POST /webhook/register`) until B's `X-Backend-Server` names it, then unregistered at A "
        "until B answers 503 (no server). A change reaches the other processes by a pub/sub message, with a "
        "version check every 0.5 s as the backstop: times far under 500 ms are the message's.\n\n"
        + table(("from → to", "median ms", "p95 ms", "max ms", f"missed ({setup.get('deadline_s', '?')} s)"), rows)
    )
